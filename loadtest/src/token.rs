//! The bearer token of a run: given (`--token`, `EDGERELAY_TOKEN`), or minted by a dev
//! identity provider (`edgerelay dev-idp`) with chosen claims and lifetime (`--token-from`).

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(clap::Args, Clone, Debug)]
pub struct TokenArgs {
    /// Bearer token (HTTP `Authorization`; QUIC: the first request of every stream).
    #[arg(long, value_name = "TOKEN", env = "EDGERELAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Mint the token from a dev identity provider instead (`POST <URL>/token`), e.g.
    /// `http://127.0.0.1:9400`. Takes precedence over --token.
    #[arg(long, value_name = "URL")]
    pub token_from: Option<String>,

    /// Claims of the minted token, a JSON object; the IdP fills in iss, aud, iat and exp.
    #[arg(
        long,
        value_name = "JSON",
        default_value = r#"{"sub":"loadtest","tenant":"load","scope":"edge:publish"}"#
    )]
    pub token_claims: String,

    /// Lifetime of the minted token, seconds (it must outlive the run).
    #[arg(long, value_name = "SECS", default_value_t = 3_600)]
    pub token_lifetime_secs: u64,
}

impl TokenArgs {
    /// The token to send.
    pub async fn resolve(&self) -> anyhow::Result<String> {
        match (&self.token_from, &self.token) {
            (Some(url), _) => mint(url, &self.token_claims, self.token_lifetime_secs).await,
            (None, Some(token)) => Ok(token.clone()),
            (None, None) => bail!("no token: give --token (or EDGERELAY_TOKEN) or --token-from"),
        }
    }
}

/// `POST <url>/token` on a dev IdP (plain HTTP on loopback).
async fn mint(url: &str, claims: &str, lifetime_secs: u64) -> anyhow::Result<String> {
    let claims: serde_json::Value =
        serde_json::from_str(claims).context("--token-claims is not JSON")?;
    let authority = url
        .strip_prefix("http://")
        .context("--token-from must be an http:// URL of a dev IdP")?
        .trim_end_matches('/');
    let body = serde_json::json!({ "claims": claims, "lifetime_secs": lifetime_secs }).to_string();
    let tcp = TcpStream::connect(authority)
        .await
        .with_context(|| format!("connecting to the dev IdP at {authority}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::post("/token")
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let resp = send.send_request(req).await.context("POST /token")?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&bytes).context("dev IdP answer")?;
    if !status.is_success() {
        bail!("dev IdP refused to mint: {status} {answer}");
    }
    answer["access_token"].as_str().map(str::to_owned).context("dev IdP answer has no access_token")
}
