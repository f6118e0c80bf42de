//! `loadtest h3`: `POST /v1/publish/{subject}` over HTTP/3 on the relay's QUIC port (ALPN
//! `h3`), one event per request, requests multiplexed over a few connections. The answers
//! and statuses are those of `loadtest https`; only the transport differs.
//!
//! A connection that fails is not re-established: its workers count `transport` errors for
//! the rest of the run.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use edgerelay_client::H3Client;
use futures::future::try_join_all;
use tokio::time::timeout;

use super::quic::Target;
use super::{Connected, Mode};
use crate::events::{self, Events};
use crate::model::{Failure, Outcome, RunInfo};
use crate::schedule::{RunArgs, Worker};

/// Flags of `loadtest h3`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub(crate) target: Target,

    /// HTTP/3 connections to open.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) connections: u32,

    /// Requests in flight at most, in total, spread evenly over the connections.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) concurrency: u32,
}

/// One unit of concurrency: one request at a time on its connection.
pub struct H3Worker {
    client: Arc<H3Client>,
    events: Arc<Events>,
    timeout: Duration,
}

impl Worker for H3Worker {
    async fn send(&mut self, seq: u64, intended_unix_ns: u64) -> Outcome {
        let path = format!("/v1/publish/{}", self.events.subject(seq));
        let key = self.events.key(seq);
        let edge_time = events::now_unix_ms().to_string();
        let mut headers = vec![
            ("edge-timestamp", edge_time.as_str()),
            ("content-type", "application/octet-stream"),
        ];
        if let Some(key) = &key {
            headers.push(("idempotency-key", key.as_str()));
        }
        let payload = self.events.payload(seq, intended_unix_ns);
        match timeout(self.timeout, self.client.post(&path, &headers, payload)).await {
            Err(_) => Outcome::Failed(Failure::Timeout),
            Ok(Err(_)) => Outcome::Failed(Failure::Transport),
            Ok(Ok((status, _, _))) if status == 202 => Outcome::Accepted,
            Ok(Ok((status, _, _))) => Outcome::Failed(Failure::Status(status.as_u16())),
        }
    }
}

impl Mode for Args {
    type Worker = H3Worker;

    fn name(&self) -> &'static str {
        "h3"
    }

    async fn connect(&self, run: &RunArgs, events: Events) -> anyhow::Result<Connected<H3Worker>> {
        let events = Arc::new(events);
        let config = self.target.clone().client_config().await?;
        let server = config.server;
        let clients =
            try_join_all((0..self.connections).map(|_| H3Client::connect(config.clone())))
                .await
                .with_context(|| format!("connecting to {server} over HTTP/3"))?;
        let clients: Vec<Arc<H3Client>> = clients.into_iter().map(Arc::new).collect();
        let workers: Vec<H3Worker> = (0..self.concurrency as usize)
            .map(|w| H3Worker {
                client: Arc::clone(&clients[w % clients.len()]),
                events: Arc::clone(&events),
                timeout: run.timeout,
            })
            .collect();
        let info = RunInfo {
            mode: "h3",
            http: Some("3"),
            connections: clients.len(),
            concurrency: workers.len(),
            answer: "202",
            detail: None,
        };
        Ok(Connected::new(info, workers))
    }
}
