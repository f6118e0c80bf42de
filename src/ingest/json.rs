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

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use base64::Engine;
use bytes::Bytes;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::EventIn;
use crate::error::{excerpt, ErrorCode, Refusal};
use crate::event::{Ack, Names, Outcome};

/// The request body `{"events":[…]}`, read with its events counted as they come: past `max`
/// the body is refused before the rest are allocated (a 1 MiB body holds ~40,000 minimal
/// events, forty times `max_events_per_request`).
///
/// Every shape is read by hand through `deserialize_any`, so that input in the wrong place is
/// refused by the visitors here with an [`excerpt`] of it: serde_json's own errors format the
/// whole offending string (`invalid type: string "…"`, `unknown field `…``) and then scan the
/// message, more work per byte than reading the body (a 1 MiB string where a number belongs
/// cost ~5 ms of CPU per request).
struct Request {
    max: usize,
}

/// The `events` array of a [`Request`], at most `0` of them.
struct Events(usize);

/// One element of `events`.
struct Event;

/// An event's `headers` object.
struct Headers;

/// An event's `edge_time_unix_ms`.
struct Millis;

/// The fields of an event, for messages.
const EVENT_FIELDS: &[&str] =
    &["subject", "data", "data_base64", "id", "headers", "edge_time_unix_ms"];

#[derive(Debug, Default)]
struct JsonEvent {
    subject: Option<String>,
    data: Option<String>,
    data_base64: Option<String>,
    id: Option<String>,
    headers: Option<HashMap<String, String>>,
    edge_time_unix_ms: Option<u64>,
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

/// Decodes a multi-event JSON body of at most `max_events` events (more: 413, refused as soon
/// as the one over the limit is read).
pub fn decode_request(body: &[u8], max_events: usize) -> Result<Vec<EventIn>, Refusal> {
    let mut reader = serde_json::Deserializer::from_slice(body);
    let events = Request { max: max_events }
        .deserialize(&mut reader)
        .and_then(|events| reader.end().map(|()| events))
        .map_err(|e| match e.is_data() && e.to_string().starts_with(TOO_MANY) {
            true => Refusal::new(
                ErrorCode::TooLarge,
                format!("more than {max_events} events in one request"),
            ),
            false => invalid_json(&e),
        })?;
    events
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
                subject: e.subject.unwrap_or_default(),
                payload,
                headers: e.headers.unwrap_or_default(),
                id: e.id.unwrap_or_default(),
                edge_time_unix_ms: e.edge_time_unix_ms.unwrap_or_default(),
            })
        })
        .collect()
}

/// How a [`Request`] says it has too many events (turned into a 413).
const TOO_MANY: &str = "too many events";

/// A visitor's `expecting`, and its `visit_str` for a place where a string does not belong:
/// refused with an excerpt of it.
macro_rules! expecting_no_strings {
    ($expecting:literal) => {
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str($expecting)
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            Err(E::custom(format_args!(
                "invalid type: string \"{}\", expected {}",
                excerpt(s),
                $expecting
            )))
        }
    };
}

/// The seeds read through `deserialize_any`, each by the visitor of the same type.
macro_rules! read_by_visitor {
    ($($seed:ty),*) => {$(
        impl<'de> DeserializeSeed<'de> for $seed {
            type Value = <$seed as Visitor<'de>>::Value;

            fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_any(self)
            }
        }
    )*};
}

read_by_visitor!(Request, Events, Event, Headers, Millis);

/// An object's key, borrowed from the body unless it holds escapes (serde's own `Cow<str>`
/// always copies: an allocation per key of every event).
struct Name<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Name<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }

            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(s)))
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// `key` is none of `fields`: refused with an excerpt of it.
fn unknown_field<E: de::Error>(key: &str, fields: &[&str]) -> E {
    E::custom(format_args!("unknown field `{}`, expected one of {fields:?}", excerpt(key)))
}

/// Sets a field read once.
fn once<'de, T: Deserialize<'de>, A: MapAccess<'de>>(
    slot: &mut Option<T>,
    name: &'static str,
    map: &mut A,
) -> Result<(), A::Error> {
    once_seed(slot, name, map, std::marker::PhantomData)
}

/// Sets a field read once, through `seed`.
fn once_seed<'de, S: DeserializeSeed<'de>, A: MapAccess<'de>>(
    slot: &mut Option<S::Value>,
    name: &'static str,
    map: &mut A,
    seed: S,
) -> Result<(), A::Error> {
    if slot.is_some() {
        return Err(de::Error::duplicate_field(name));
    }
    *slot = Some(map.next_value_seed(seed)?);
    Ok(())
}

impl<'de> Visitor<'de> for Request {
    type Value = Vec<JsonEvent>;

    expecting_no_strings!("an object with an `events` array");

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut events = None;
        while let Some(key) = map.next_key::<Name<'de>>()? {
            match &*key.0 {
                "events" => once_seed(&mut events, "events", &mut map, Events(self.max))?,
                _ => return Err(unknown_field(&key.0, &["events"])),
            }
        }
        events.ok_or_else(|| de::Error::missing_field("events"))
    }
}

impl<'de> Visitor<'de> for Events {
    type Value = Vec<JsonEvent>;

    expecting_no_strings!("an array of events");

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut events = Vec::new();
        while let Some(event) = seq.next_element_seed(Event)? {
            if events.len() == self.0 {
                return Err(de::Error::custom(TOO_MANY));
            }
            events.push(event);
        }
        Ok(events)
    }
}

impl<'de> Visitor<'de> for Event {
    type Value = JsonEvent;

    expecting_no_strings!("an event object");

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut e = JsonEvent::default();
        while let Some(key) = map.next_key::<Name<'de>>()? {
            match &*key.0 {
                "subject" => once(&mut e.subject, "subject", &mut map)?,
                "data" => once(&mut e.data, "data", &mut map)?,
                "data_base64" => once(&mut e.data_base64, "data_base64", &mut map)?,
                "id" => once(&mut e.id, "id", &mut map)?,
                "headers" => once_seed(&mut e.headers, "headers", &mut map, Headers)?,
                "edge_time_unix_ms" => {
                    once_seed(&mut e.edge_time_unix_ms, "edge_time_unix_ms", &mut map, Millis)?
                }
                _ => return Err(unknown_field(&key.0, EVENT_FIELDS)),
            }
        }
        if e.subject.is_none() {
            return Err(de::Error::missing_field("subject"));
        }
        Ok(e)
    }
}

impl<'de> Visitor<'de> for Headers {
    type Value = HashMap<String, String>;

    expecting_no_strings!("an object of string headers");

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut headers = HashMap::new();
        while let Some((k, v)) = map.next_entry::<String, String>()? {
            headers.insert(k, v);
        }
        Ok(headers)
    }
}

impl<'de> Visitor<'de> for Millis {
    type Value = u64;

    expecting_no_strings!("milliseconds since the Unix epoch, an unsigned integer");

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }
}

/// The refusal of a body serde_json could not read, its position said once. The visitors
/// above quote input only as an [`excerpt`]; what serde_json itself says about a value in the
/// wrong place is short (`invalid type: integer `5``), and [`Refusal::new`] bounds the whole.
fn invalid_json(e: &serde_json::Error) -> Refusal {
    let text = e.to_string();
    let at = format!(" at line {} column {}", e.line(), e.column());
    let what = text.strip_suffix(&at).unwrap_or(&text);
    Refusal::new(
        ErrorCode::BadRequest,
        format!("invalid JSON body (line {}, column {}): {what}", e.line(), e.column()),
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
        let evs = decode_request(body, 1000).unwrap();
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
            let err = decode_request(body, 1000).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest);
        }
    }

    #[test]
    fn events_past_the_limit_are_refused_as_they_are_read() {
        let event = r#"{"subject":"a","data":""}"#;
        let body = |n: usize| format!(r#"{{"events":[{}]}}"#, vec![event; n].join(","));
        assert_eq!(decode_request(body(3).as_bytes(), 3).unwrap().len(), 3);
        let err = decode_request(body(40_000).as_bytes(), 3).unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge, "{err}");
        assert_eq!(err.message, "more than 3 events in one request");
        // The object's own rules hold as before.
        for (body, want) in [
            (r#"{"events":[],"x":1}"#, "unknown field `x`"),
            (r#"{"events":[],"events":[]}"#, "duplicate field `events`"),
            (r#"{}"#, "missing field `events`"),
            (r#"{"events":[]} 1"#, "trailing characters"),
        ] {
            let err = decode_request(body.as_bytes(), 3).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{body}");
            assert!(err.message.contains(want), "{body}: {}", err.message);
        }
    }

    #[test]
    fn decode_errors_quote_a_bounded_excerpt_of_the_input() {
        let huge = "z".repeat(1 << 20);
        for body in [
            format!(r#"{{"events":[{{"subject":"a","data":"x","edge_time_unix_ms":"{huge}"}}]}}"#),
            format!(r#"{{"events":[{{"subject":"a","data":"x","{huge}":1}}]}}"#),
            format!(r#"{{"events":[{{"subject":"a","data":"x","headers":{{"k":{huge}}}}}]}}"#),
            // A string wherever one does not belong, and as an unknown key at the top.
            format!(r#""{huge}""#),
            format!(r#"{{"events":"{huge}"}}"#),
            format!(r#"{{"events":["{huge}"]}}"#),
            format!(r#"{{"events":[{{"subject":"a","data":"x","headers":"{huge}"}}]}}"#),
            format!(r#"{{"{huge}":[]}}"#),
        ] {
            let err = decode_request(body.as_bytes(), 1000).unwrap_err();
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
            decode_request(br#"{"events":[{"subject":"a","data":"x","n":1}]}"#, 1000).unwrap_err();
        assert!(short.message.contains("unknown field `n`"), "{}", short.message);
        assert!(!short.message.contains("at line"), "{}", short.message);
        let millis =
            format!(r#"{{"events":[{{"subject":"a","data":"x","edge_time_unix_ms":"{huge}"}}]}}"#);
        let err = decode_request(millis.as_bytes(), 1000).unwrap_err();
        assert!(
            err.message.ends_with("(+1048512 bytes)\", expected milliseconds since the Unix epoch, an unsigned integer"),
            "{}",
            err.message
        );
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
