//! What reading a request costs, per event, by events per request (1, 16, 64), 256 B payloads:
//!
//! - `frame_decode/frame`: splitting a buffer of native-protocol (`edgerelay/1`) frames with
//!   the sans-IO [`FrameDecoder`], as a QUIC stream does after each read;
//! - `frame_decode/frame+protobuf`: the same, then decoding each frame as a `PublishRequest`
//!   and taking its events, as the QUIC front-end does;
//! - `publish_request_decode`: decoding one `PublishRequest` body into events, as the HTTP
//!   routes (`application/x-protobuf`) do.
//!
//! Every request carries a 600-byte token, as the first request of a stream does. The inputs
//! are built here, so the `unwrap`s cannot fail.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use edgerelay::ingest::framing::{self, FrameDecoder};
use edgerelay::ingest::{decode_publish_request, events_of};
use edgerelay::proto;
use prost::Message;

/// Requests in the buffer the frame decoder works through.
const REQUESTS: usize = 64;
const EVENTS_PER_REQUEST: [usize; 3] = [1, 16, 64];
const MAX_FRAME: usize = 1 << 20;

fn request(events: usize) -> proto::PublishRequest {
    let payload = Bytes::from(vec![b'x'; 256]);
    proto::PublishRequest {
        events: (0..events)
            .map(|i| proto::Event {
                subject: format!("edge.acme.click{}", i % 8),
                payload: payload.clone(),
                id: format!("key-{i}"),
                edge_time_unix_ms: 1_700_000_000_000,
                ..Default::default()
            })
            .collect(),
        token: "t".repeat(600),
    }
}

fn frame_decode(c: &mut Criterion) {
    let decoder = FrameDecoder::new(MAX_FRAME);
    let mut group = c.benchmark_group("frame_decode");
    for n in EVENTS_PER_REQUEST {
        let req = request(n);
        let mut wire = BytesMut::new();
        for _ in 0..REQUESTS {
            framing::encode(&req, &mut wire);
        }
        let wire = wire.freeze();
        group.throughput(Throughput::Elements((REQUESTS * n) as u64));
        // The copy into a fresh buffer is setup, not timed: the stream reads into its buffer.
        let buffer = || BytesMut::from(&wire[..]);
        group.bench_with_input(BenchmarkId::new("frame", n), &n, |b, _| {
            b.iter_batched(
                buffer,
                |mut buf| {
                    let mut frames = Vec::with_capacity(REQUESTS);
                    while let Some(f) = decoder.decode(&mut buf).unwrap() {
                        frames.push(f);
                    }
                    frames
                },
                BatchSize::SmallInput,
            )
        });
        group.bench_with_input(BenchmarkId::new("frame+protobuf", n), &n, |b, _| {
            b.iter_batched(
                buffer,
                |mut buf| {
                    let mut events = Vec::with_capacity(REQUESTS * n);
                    while let Some(f) = decoder.decode(&mut buf).unwrap() {
                        events.extend(events_of(proto::PublishRequest::decode(f).unwrap()));
                    }
                    events
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn publish_request_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish_request_decode");
    for n in EVENTS_PER_REQUEST {
        let body = request(n).encode_to_vec();
        let body = Bytes::from(body);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &body, |b, body| {
            b.iter(|| decode_publish_request(body.clone(), n).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, frame_decode, publish_request_decode);
criterion_main!(benches);
