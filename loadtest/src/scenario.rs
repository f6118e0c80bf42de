//! The scenarios: several runs, modes and processes in one invocation, on top of the harness
//! and the modes. Each writes its own tables and files; none of them is a mode.
//!
//! - `attack`: the attack suite: attacks on the relay's front-ends beside legitimate traffic
//!   at a fixed rate, what they cost (memory, goodput, p99, audit bytes, log lines).
//! - `bench`: the repository's benchmarks (`scripts/bench*`): the stacks, alternating rounds and
//!   the markdown blocks of BENCHMARKS.md.
//! - `compare`: several modes one after the other at the same offered load (or each its own
//!   `--find-max`) against a running relay and NATS, one table with ratios to the baselines.
//! - `global`: nats-server and one relay per region behind `wan` proxies, loaded at once, one
//!   consumer; send→consumer per region against the delivery budget.
//! - `chaos`: the fault-injection suite: a ledger client, process control for nats-server
//!   (alone or a 3-node cluster) and relays, faults under load, and a verifier that reads the
//!   stream back against the ledger.
//! - `demo`: what `scripts/demo` shows: nats-server, a dev IdP and the relay with JWT auth,
//!   a refused cross-tenant publish, an HTTPS load with a consumer, then a drain.

pub mod attack;
pub mod bench;
pub mod chaos;
pub mod compare;
pub mod demo;
pub mod global;
