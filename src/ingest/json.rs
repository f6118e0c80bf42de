//! The JSON shapes of the HTTP API: the multi-event request body, and the answers.
//!
//! ```text
//! request  {"events":[{"subject":"edge.click","data":"text" | "data_base64":"…",
//!                      "id":"key","headers":{"k":"v"},"edge_time_unix_ms":1700000000000}]}
//! accepted {"stream":"EDGE","seq":42,"batch":"pop1.k3x9.17","index":3,"duplicate":false}
//! queued   {"queued":true}                       (ack mode `accepted`)
//! refused  {"error":{"code":"forbidden","message":"…"}}
//! many     {"results":[<accepted | queued | refused>, …]}
//! ```

use std::collections::HashMap;

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::EventIn;
use crate::error::{excerpt, ErrorCode, Refusal};
use crate::event::{Ack, Names, Outcome};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    events: Vec<JsonEvent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEvent {
    subject: String,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    data_base64: Option<String>,
    #[serde(default)]
    id: String,
    #[serde(default)]
    headers: HashMap<String, String>,
    #[serde(default)]
    edge_time_unix_ms: u64,
}

/// One event's answer.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Answer<'a> {
    Stored {
        stream: &'a str,
        cluster: &'a str,
        seq: u64,
        batch: String,
        index: u32,
        duplicate: bool,
    },
    Queued {
        queued: bool,
    },
    Spooled {
        spooled: bool,
    },
    Refused {
        error: ErrorBody<'a>,
    },
}

#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub code: &'static str,
    pub reason: &'static str,
    pub message: &'a str,
}

#[derive(Debug, Serialize)]
struct Many<'a> {
    results: Vec<Answer<'a>>,
}

/// Decodes a multi-event JSON body.
pub fn decode_request(body: &[u8]) -> Result<Vec<EventIn>, Refusal> {
    let req: Request = serde_json::from_slice(body).map_err(|e| invalid_json(&e))?;
    req.events
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let payload = match (e.data, e.data_base64) {
                (Some(text), None) => Bytes::from(text),
                (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                    .decode(b64.as_bytes())
                    .map(Bytes::from)
                    .map_err(|err| {
                        Refusal::new(
                            ErrorCode::BadRequest,
                            format!("events[{i}].data_base64: {err}"),
                        )
                    })?,
                _ => {
                    return Err(Refusal::new(
                        ErrorCode::BadRequest,
                        format!("events[{i}]: give exactly one of data, data_base64"),
                    ))
                }
            };
            Ok(EventIn {
                subject: e.subject,
                payload,
                headers: e.headers,
                id: e.id,
                edge_time_unix_ms: e.edge_time_unix_ms,
            })
        })
        .collect()
}

/// The refusal of a body serde_json could not read. Its messages quote the offending value
/// (`invalid type: string "…"`), which the edge chose: only an [`excerpt`] of it is kept, and
/// the position is said once, whatever the value's length.
fn invalid_json(e: &serde_json::Error) -> Refusal {
    let text = e.to_string();
    let at = format!(" at line {} column {}", e.line(), e.column());
    let what = text.strip_suffix(&at).unwrap_or(&text);
    Refusal::new(
        ErrorCode::BadRequest,
        format!("invalid JSON body (line {}, column {}): {}", e.line(), e.column(), excerpt(what)),
    )
}

impl<'a> Answer<'a> {
    pub fn of(outcome: &'a Outcome, names: &'a Names) -> Self {
        match outcome {
            Ok(Ack::Stored(s)) => Answer::Stored {
                stream: &names.stream,
                cluster: names.cluster(s.cluster),
                seq: s.seq,
                batch: names.batch(s.batch),
                index: s.index,
                duplicate: s.duplicate,
            },
            Ok(Ack::Queued) => Answer::Queued { queued: true },
            Ok(Ack::Spooled) => Answer::Spooled { spooled: true },
            Err(r) => Answer::refused(r),
        }
    }

    pub fn refused(r: &'a Refusal) -> Self {
        Answer::Refused {
            error: ErrorBody { code: r.code.as_str(), reason: r.reason, message: &r.message },
        }
    }
}

/// Encodes one answer.
pub fn encode(answer: &Answer<'_>) -> Vec<u8> {
    serde_json::to_vec(answer).unwrap_or_default()
}

/// Encodes the answers of a multi-event request.
pub fn encode_many(outcomes: &[Outcome], names: &Names) -> Vec<u8> {
    let results = outcomes.iter().map(|o| Answer::of(o, names)).collect();
    serde_json::to_vec(&Many { results }).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ECHO_BYTES;
    use crate::event::Stored;

    #[test]
    fn decodes_text_and_base64_events() {
        let body = br#"{"events":[{"subject":"edge.a","data":"hi","id":"k1"},
                       {"subject":"edge.b","data_base64":"AAEC","headers":{"x":"y"}}]}"#;
        let evs = decode_request(body).unwrap();
        assert_eq!(evs[0].payload, Bytes::from_static(b"hi"));
        assert_eq!(evs[0].id, "k1");
        assert_eq!(evs[1].payload, Bytes::from_static(&[0, 1, 2]));
        assert_eq!(evs[1].headers["x"], "y");
    }

    #[test]
    fn refuses_malformed_bodies() {
        for body in [
            &br#"{"events":[{"subject":"a"}]}"#[..],
            br#"{"events":[{"subject":"a","data":"x","data_base64":"eA=="}]}"#,
            br#"{"events":[{"subject":"a","data_base64":"!!"}]}"#,
            br#"{"events":[{"subject":"a","data":"x","extra":1}]}"#,
            br#"{"events":"#,
            b"",
        ] {
            let err = decode_request(body).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest);
        }
    }

    #[test]
    fn decode_errors_quote_a_bounded_excerpt_of_the_input() {
        let huge = "z".repeat(1 << 20);
        for body in [
            format!(r#"{{"events":[{{"subject":"a","data":"x","edge_time_unix_ms":"{huge}"}}]}}"#),
            format!(r#"{{"events":[{{"subject":"a","data":"x","{huge}":1}}]}}"#),
            format!(r#"{{"events":[{{"subject":"a","data":"x","headers":{{"k":{huge}}}}}]}}"#),
        ] {
            let err = decode_request(body.as_bytes()).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest);
            let zs = err.message.matches('z').count();
            assert!(zs <= ECHO_BYTES, "{} bytes of input echoed: {}", zs, err.message);
            assert!(
                err.message.starts_with("invalid JSON body (line 1, column "),
                "{}",
                err.message
            );
        }
        let short =
            decode_request(br#"{"events":[{"subject":"a","data":"x","n":1}]}"#).unwrap_err();
        assert!(short.message.contains("unknown field `n`"), "{}", short.message);
        assert!(!short.message.contains("at line"), "{}", short.message);
    }

    #[test]
    fn answers_have_the_documented_shape() {
        let names = Names::new("EDGE", vec!["default".into()], "r", "b");
        let ok: Outcome =
            Ok(Ack::Stored(Stored { seq: 4, batch: 1, index: 2, cluster: 0, duplicate: false }));
        let v: serde_json::Value =
            serde_json::from_slice(&encode(&Answer::of(&ok, &names))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"stream":"EDGE","cluster":"default","seq":4,"batch":"r.b.1","index":2,"duplicate":false})
        );
        let err: Outcome = Err(Refusal::new(ErrorCode::Forbidden, "no").because("no_rule_allows"));
        let v: serde_json::Value =
            serde_json::from_slice(&encode(&Answer::of(&err, &names))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error":{"code":"forbidden","reason":"no_rule_allows","message":"no"}})
        );
    }
}
