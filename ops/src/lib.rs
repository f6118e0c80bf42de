//! edgerelay's operator tools, outside the relay's data path: the `edgerelay` binary's
//! `top`, `tail`, `dev-idp` and `dev-certs` subcommands, and the same pieces in-process for
//! tests and the load generator. The relay's library does not depend on this crate, so a
//! program linking the relay does not build a terminal UI or a certificate generator.
//!
//! | subcommand | module |
//! |---|---|
//! | a live terminal view of one relay | [`top`] |
//! | reading published batches back as JSON lines | [`tail`] |
//! | a development identity provider (OIDC discovery, JWKS, minting) | [`dev_idp`] |
//! | a throw-away CA and server certificate | [`dev_certs`] |
//!
//! [`private_file`] writes files holding secrets (keys, configs with tokens) with mode 0600
//! from the start, for `dev-certs`, the test kit and the load generator.

#![forbid(unsafe_code)]

pub mod dev_certs;
pub mod dev_idp;
pub mod private_file;
pub mod tail;
pub mod top;
