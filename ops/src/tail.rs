//! `edgerelay tail`: reads what the relay published and prints one JSON line per event. Either
//! a plain NATS subscription (what flows from now on) or an ordered JetStream consumer from a
//! stream sequence (what is stored). The tool an SRE uses to see traffic, and the tests'
//! independent reader.

use std::io::Write;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use base64::Engine;
use futures::StreamExt;
use prost::Message;
use serde::Serialize;

use edgerelay_proto as proto;

/// What to read.
#[derive(Clone, Debug)]
pub struct TailOptions {
    pub nats_url: String,
    /// Subject filter (NATS wildcards allowed).
    pub subject: String,
    /// Read this stream from `from_seq` instead of subscribing to live traffic.
    pub stream: Option<String>,
    pub from_seq: u64,
    /// Stop after this many events.
    pub count: Option<u64>,
    /// Stop when nothing arrived for this long.
    pub idle_timeout: Option<Duration>,
}

/// One decoded event, as printed.
#[derive(Debug, Serialize)]
pub struct Line {
    /// Stream sequence of the NATS message (0 for live subscriptions).
    pub stream_seq: u64,
    /// The batch's `Nats-Msg-Id`.
    pub batch: String,
    pub index: usize,
    pub subject: String,
    pub id: String,
    pub publisher: String,
    pub edge_time_unix_ms: u64,
    pub ingest_time_unix_us: u64,
    #[serde(skip_serializing_if = "std::collections::HashMap::is_empty")]
    pub headers: std::collections::HashMap<String, String>,
    /// The payload as text when it is UTF-8…
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// …and base64 otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
}

/// Errors of `tail`.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("connecting to NATS: {0}")]
    Connect(String),
    #[error("reading: {0}")]
    Read(String),
    /// A message on the subject is not an edgerelay batch.
    #[error("message {seq} on {subject} is not an edgerelay Batch: {error}")]
    Decode { subject: String, seq: u64, error: String },
}

/// Decodes one NATS message body into printable lines.
pub fn decode(
    subject: &str,
    stream_seq: u64,
    msg_id: &str,
    body: &[u8],
) -> Result<Vec<Line>, TailError> {
    let batch = proto::Batch::decode(body).map_err(|e| TailError::Decode {
        subject: subject.to_owned(),
        seq: stream_seq,
        error: e.to_string(),
    })?;
    Ok(batch
        .events
        .into_iter()
        .enumerate()
        .map(|(index, e)| {
            let (payload, payload_base64) = match String::from_utf8(e.payload.to_vec()) {
                Ok(s) => (Some(s), None),
                Err(_) => {
                    (None, Some(base64::engine::general_purpose::STANDARD.encode(&e.payload)))
                }
            };
            Line {
                stream_seq,
                batch: msg_id.to_owned(),
                index,
                subject: e.subject,
                id: e.id,
                publisher: e.publisher,
                edge_time_unix_ms: e.edge_time_unix_ms,
                ingest_time_unix_us: e.ingest_time_unix_us,
                headers: e.headers,
                payload,
                payload_base64,
            }
        })
        .collect())
}

/// Runs `tail`, writing lines to `out`; returns how many events it printed.
pub async fn run(opts: TailOptions, out: &mut (impl Write + Send)) -> Result<u64, TailError> {
    let client =
        async_nats::connect(&opts.nats_url).await.map_err(|e| TailError::Connect(e.to_string()))?;
    let mut printed = 0u64;
    let idle = opts.idle_timeout.unwrap_or(Duration::MAX);
    let mut emit = |lines: Vec<Line>| -> bool {
        for line in lines {
            if let Ok(text) = serde_json::to_string(&line) {
                let _ = writeln!(out, "{text}");
            }
            printed += 1;
            if opts.count.is_some_and(|c| printed >= c) {
                return false;
            }
        }
        true
    };
    match &opts.stream {
        None => {
            let mut sub = client
                .subscribe(opts.subject.clone())
                .await
                .map_err(|e| TailError::Read(e.to_string()))?;
            while let Ok(Some(msg)) = tokio::time::timeout(idle, sub.next()).await {
                let id = msg_id(msg.headers.as_ref());
                if !emit(decode(msg.subject.as_str(), 0, &id, &msg.payload)?) {
                    break;
                }
            }
        }
        Some(stream) => {
            let js = async_nats::jetstream::new(client);
            let stream = js.get_stream(stream).await.map_err(|e| TailError::Read(e.to_string()))?;
            let consumer = stream
                .create_consumer(pull::OrderedConfig {
                    filter_subject: opts.subject.clone(),
                    deliver_policy: if opts.from_seq <= 1 {
                        DeliverPolicy::All
                    } else {
                        DeliverPolicy::ByStartSequence { start_sequence: opts.from_seq }
                    },
                    ..Default::default()
                })
                .await
                .map_err(|e| TailError::Read(e.to_string()))?;
            let mut messages =
                consumer.messages().await.map_err(|e| TailError::Read(e.to_string()))?;
            while let Ok(Some(msg)) = tokio::time::timeout(idle, messages.next()).await {
                let msg = msg.map_err(|e| TailError::Read(e.to_string()))?;
                let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                let id = msg_id(msg.headers.as_ref());
                if !emit(decode(msg.subject.as_str(), seq, &id, &msg.payload)?) {
                    break;
                }
            }
        }
    }
    let _ = out.flush();
    Ok(printed)
}

fn msg_id(headers: Option<&async_nats::HeaderMap>) -> String {
    headers.and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.as_str().to_owned()).unwrap_or_default()
}
