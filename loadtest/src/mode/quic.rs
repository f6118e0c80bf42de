//! `loadtest quic`: drives the native `edgerelay/1` protocol through [`edgerelay_client`].
//!
//! Shape: `--connections` clients (each its own UDP socket and QUIC connection), `--streams`
//! bidirectional streams on each, and up to `--in-flight` requests pipelined on each stream.
//! One task per stream owns its [`PublishStream`] (the *stream driver*); `--in-flight` workers
//! feed it. A worker hands its scheduled request to the driver and waits for the answer, so the
//! schedule's intended times, latency and coordinated-omission correction apply unchanged. The
//! driver sends requests as they come and at the same time reads answers (one `select!`:
//! `PublishStream` does not split into halves, but its `recv` is cancel-safe), matching each
//! answer to the oldest request still waiting ([`Pipeline`]): the relay answers a stream's
//! requests in order.
//!
//! A request of `--events-per-request` events counts for latency when every event was
//! accepted; a refused event counts as one error under its code (`queue_full`, ...), a refused
//! request as one error per event. A lost stream or connection fails the requests in flight on
//! it (`transport`); the next request opens a new stream, reconnecting first when needed (with
//! backoff; requests fail as `connect` meanwhile). An answer overdue by `--timeout` resets the
//! stream the same way.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use edgerelay::error::ErrorCode;
use edgerelay::proto;
use edgerelay_client::{self as client, Client, ClientConfig, ClientError, PublishStream};
use futures::future::{join_all, try_join_all};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};

use super::{Connected, Mode};
use crate::backoff::Backoff;
use crate::events::{self, Events};
use crate::model::{Failure, Outcome, RunInfo};
use crate::schedule::{RunArgs, Worker};

/// How long the stream drivers get to finish their streams once the run is over.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Flags of `loadtest quic`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub(crate) target: Target,

    /// Number of QUIC connections to open, each from its own UDP socket.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) connections: u32,

    /// Bidirectional streams per connection.
    #[arg(long, value_name = "M", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) streams: u32,

    /// Requests pipelined on each stream at most (their answers come back in order). Requests
    /// in flight in total: connections × streams × in-flight.
    #[arg(long, value_name = "K", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) in_flight: u32,

    /// Events per request. --rate stays in events per second (requests/s = rate / E).
    #[arg(long, value_name = "E", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) events_per_request: u32,
}

/// Builds the events of request `seq`; shared by all workers.
struct Requests {
    events: Events,
    per_request: u32,
}

/// A request handed from a worker to its stream's driver.
struct Job {
    events: Vec<proto::Event>,
    reply: oneshot::Sender<Outcome>,
}

/// A request sent on a stream, waiting for its answer.
struct Waiting {
    events: usize,
    reply: oneshot::Sender<Outcome>,
}

/// Requests sent on one stream and not answered yet, oldest first, with their send times. The
/// relay answers a stream's requests in the order they were sent, so each answer belongs to the
/// oldest one.
#[derive(Debug)]
struct Pipeline<T> {
    waiting: VecDeque<(Instant, T)>,
}

/// What a stream driver needs besides its stream.
struct Lane {
    client: Arc<Client>,
    jobs: mpsc::Receiver<Job>,
    in_flight: usize,
    timeout: Duration,
    notes: Arc<Notes>,
}

/// First-of-a-kind error messages, so a failing run prints each kind once and counts the rest.
#[derive(Debug, Default)]
struct Notes {
    stream: AtomicBool,
    connect: AtomicBool,
}

/// One unit of concurrency: one request at a time, through its stream's driver.
pub struct QuicWorker {
    jobs: mpsc::Sender<Job>,
    requests: Arc<Requests>,
    timeout: Duration,
}

impl Args {
    /// `connections` × `streams` lanes reaching `target`, with `concurrency` requests in flight
    /// spread over them (at least one per lane).
    pub fn spread(
        target: Target,
        connections: u32,
        streams: u32,
        concurrency: u32,
        events_per_request: u32,
    ) -> Self {
        let lanes = connections * streams;
        let in_flight = concurrency.div_ceil(lanes).max(1);
        Self { target, connections, streams, in_flight, events_per_request }
    }
}

impl Requests {
    /// Request `seq`: events `seq·E .. seq·E + E`, each with its own subject (round robin),
    /// idempotency key and the current time as the edge timestamp.
    fn build(&self, seq: u64, intended_unix_ns: u64) -> Vec<proto::Event> {
        let per_request = u64::from(self.per_request);
        let first = seq.saturating_mul(per_request);
        let now_ms = events::now_unix_ms();
        (first..first.saturating_add(per_request))
            .map(|n| {
                let mut event =
                    client::event(self.events.subject(n), self.events.payload(n, intended_unix_ns));
                event.id = self.events.key(n).unwrap_or_default();
                event.edge_time_unix_ms = now_ms;
                event
            })
            .collect()
    }
}

impl<T> Pipeline<T> {
    fn new() -> Self {
        Self { waiting: VecDeque::new() }
    }

    /// Records a request sent at `sent_at`.
    fn sent(&mut self, sent_at: Instant, item: T) {
        self.waiting.push_back((sent_at, item));
    }

    /// The request an answer that just arrived belongs to: the oldest one.
    fn answered(&mut self) -> Option<T> {
        self.waiting.pop_front().map(|(_, item)| item)
    }

    /// When the oldest request becomes overdue, if any is waiting.
    fn overdue_at(&self, timeout: Duration) -> Option<Instant> {
        self.waiting.front().map(|(sent_at, _)| *sent_at + timeout)
    }

    /// Every waiting request, oldest first, leaving the pipeline empty (the stream is lost).
    fn abandon(&mut self) -> impl Iterator<Item = T> + '_ {
        self.waiting.drain(..).map(|(_, item)| item)
    }

    fn len(&self) -> usize {
        self.waiting.len()
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

impl Lane {
    /// Runs one stream until every worker feeding it is gone.
    async fn drive(mut self) {
        let mut stream: Option<PublishStream> = None;
        let mut pipeline: Pipeline<Waiting> = Pipeline::new();
        let mut backoff = Backoff::default();
        loop {
            let overdue = pipeline.overdue_at(self.timeout);
            tokio::select! {
                biased;
                answer = next_answer(&mut stream), if !pipeline.is_empty() => match answer {
                    Ok(response) => {
                        if let Some(waiting) = pipeline.answered() {
                            // The worker may have timed out and left; nothing to tell then.
                            let _ = waiting.reply.send(outcome(&response, waiting.events));
                        }
                    }
                    Err(error) => {
                        self.notes.stream(&error);
                        fail_all(&mut pipeline, Failure::Transport);
                        stream = None;
                    }
                },
                () = sleep_until_some(overdue), if overdue.is_some() => {
                    // The oldest answer is overdue: the stream is stuck. Dropping it resets it.
                    fail_all(&mut pipeline, Failure::Timeout);
                    stream = None;
                }
                job = self.jobs.recv(), if pipeline.len() < self.in_flight => {
                    let Some(job) = job else { break };
                    if job.reply.is_closed() {
                        continue; // its worker timed out while it waited here
                    }
                    if stream.is_none() {
                        backoff.wait().await;
                        // A handshake with a relay that is down only ends at the idle timeout.
                        match timeout(self.timeout, self.client.stream()).await {
                            Ok(Ok(opened)) => {
                                backoff.succeeded();
                                stream = Some(opened);
                            }
                            failed => {
                                backoff.failed(Instant::now());
                                self.notes.connect(failed.ok().and_then(Result::err));
                                let _ = job.reply.send(Outcome::Failed(Failure::Connect));
                                continue;
                            }
                        }
                    }
                    let Some(open) = stream.as_mut() else { continue };
                    let events = job.events.len();
                    match open.send(job.events).await {
                        Ok(()) => pipeline.sent(Instant::now(), Waiting { events, reply: job.reply }),
                        Err(error) => {
                            self.notes.stream(&error);
                            let _ = job.reply.send(Outcome::Failed(Failure::Transport));
                            fail_all(&mut pipeline, Failure::Transport);
                            stream = None;
                        }
                    }
                }
            }
        }
        if let Some(mut open) = stream {
            open.finish();
        }
    }
}

impl Notes {
    /// Prints the first lost stream or connection of the run; later ones are only counted.
    fn stream(&self, error: &ClientError) {
        if !self.stream.swap(true, Ordering::Relaxed) {
            eprintln!("stream lost, opening a new one (further ones are only counted): {error}");
        }
    }

    /// Prints the first failure to open a stream or connection of the run: `error`, or `None`
    /// for no handshake within `--timeout`.
    fn connect(&self, error: Option<ClientError>) {
        if !self.connect.swap(true, Ordering::Relaxed) {
            let why = match error {
                Some(error) => error.to_string(),
                None => "no QUIC handshake within --timeout".to_owned(),
            };
            eprintln!(
                "cannot open a stream (retrying with backoff; further failures are only \
                 counted): {why}"
            );
        }
    }
}

impl Worker for QuicWorker {
    async fn send(&mut self, seq: u64, intended_unix_ns: u64) -> Outcome {
        let deadline = Instant::now() + self.timeout;
        let (reply, answer) = oneshot::channel();
        let job = Job { events: self.requests.build(seq, intended_unix_ns), reply };
        let exchange = async {
            if self.jobs.send(job).await.is_err() {
                // The driver is gone, which only happens when the run ends.
                return Outcome::Failed(Failure::Transport);
            }
            answer.await.unwrap_or(Outcome::Failed(Failure::Transport))
        };
        timeout_at(deadline, exchange).await.unwrap_or(Outcome::Failed(Failure::Timeout))
    }
}

impl Mode for Args {
    type Worker = QuicWorker;

    fn name(&self) -> &'static str {
        "quic"
    }

    fn events_per_request(&self) -> u32 {
        self.events_per_request
    }

    async fn connect(
        &self,
        run: &RunArgs,
        events: Events,
    ) -> anyhow::Result<Connected<QuicWorker>> {
        let requests = Arc::new(Requests { events, per_request: self.events_per_request });
        let config = self.target.clone().client_config().await?;
        let server = config.server;
        let connect = try_join_all((0..self.connections).map(|_| Client::connect(config.clone())));
        let clients = timeout(run.timeout, connect)
            .await
            .map_err(|_| anyhow::anyhow!("no QUIC handshake with {server} within --timeout"))?
            .with_context(|| format!("connecting to {server} over QUIC"))?;

        let notes = Arc::new(Notes::default());
        let in_flight = self.in_flight as usize;
        let mut drivers: Vec<JoinHandle<()>> = Vec::new();
        let mut workers = Vec::new();
        let clients: Vec<Arc<Client>> = clients.into_iter().map(Arc::new).collect();
        for client in &clients {
            for _ in 0..self.streams {
                let (tx, rx) = mpsc::channel(in_flight);
                let lane = Lane {
                    client: Arc::clone(client),
                    jobs: rx,
                    in_flight,
                    timeout: run.timeout,
                    notes: Arc::clone(&notes),
                };
                drivers.push(tokio::spawn(lane.drive()));
                workers.extend((0..in_flight).map(|_| QuicWorker {
                    jobs: tx.clone(),
                    requests: Arc::clone(&requests),
                    timeout: run.timeout,
                }));
            }
        }
        let info = RunInfo {
            mode: "quic",
            http: None,
            connections: clients.len(),
            concurrency: workers.len(),
            answer: "answer",
            detail: Some(format!("streams={} in_flight={in_flight}", self.streams)),
        };
        Ok(Connected::new(info, workers).closing_with(async move {
            // The workers are gone with the run, so each driver finishes its stream and ends.
            let _ = timeout(DRAIN_GRACE, join_all(drivers)).await;
            for client in &clients {
                client.close();
            }
        }))
    }
}

/// The next answer on `stream`; never resolves without a stream. Cancel-safe: an answer read
/// in part stays buffered in the stream.
async fn next_answer(
    stream: &mut Option<PublishStream>,
) -> Result<proto::PublishResponse, ClientError> {
    match stream.as_mut() {
        Some(stream) => stream.recv().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`; never resolves for `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Answers every request waiting on a lost stream with `failure`.
fn fail_all(pipeline: &mut Pipeline<Waiting>, failure: Failure) {
    for waiting in pipeline.abandon() {
        let _ = waiting.reply.send(Outcome::Failed(failure));
    }
}

/// What the relay's answer says about a request of `events` events.
fn outcome(response: &proto::PublishResponse, events: usize) -> Outcome {
    if let Some(refused) = &response.error {
        return Outcome::Failed(Failure::Refused(code(&refused.code)));
    }
    if response.results.len() != events {
        return Outcome::Failed(Failure::Protocol);
    }
    let mut refused = Vec::new();
    for result in &response.results {
        match &result.outcome {
            Some(
                proto::event_result::Outcome::Accepted(_)
                | proto::event_result::Outcome::Queued(_)
                | proto::event_result::Outcome::Spooled(_),
            ) => {}
            Some(proto::event_result::Outcome::Refused(r)) => {
                refused.push(Failure::Refused(code(&r.code)))
            }
            None => refused.push(Failure::Protocol),
        }
    }
    Outcome::from_refusals(refused)
}

/// The relay's refusal code as a static string for the error counts.
fn code(code: &str) -> &'static str {
    ErrorCode::parse(code).map_or("unknown_code", ErrorCode::as_str)
}

/// The relay's QUIC port and how to reach it: flags shared by `loadtest quic` and `loadtest h3`.
#[derive(Clone, Debug, clap::Args)]
pub struct Target {
    /// UDP address of the relay's QUIC listener.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8443")]
    pub(crate) addr: String,

    /// TLS server name for SNI and certificate verification [default: the host of --addr; an
    /// IP address is verified as an IP]
    #[arg(long, value_name = "NAME")]
    pub(crate) server_name: Option<String>,

    /// PEM file with the CA certificate(s) to trust.
    #[arg(long, value_name = "FILE")]
    pub(crate) ca: PathBuf,

    #[command(flatten)]
    pub(crate) token: crate::token::TokenArgs,
}

impl Target {
    /// The client config: `--addr` resolved, `--server-name` or the host of `--addr`, the CA
    /// read from `--ca`, and the token.
    pub(crate) async fn client_config(self) -> anyhow::Result<ClientConfig> {
        let addr = &self.addr;
        let server = tokio::net::lookup_host(addr)
            .await
            .with_context(|| format!("resolving --addr {addr}"))?
            .next()
            .with_context(|| format!("--addr {addr} resolves to no address"))?;
        let server_name = self.server_name.unwrap_or_else(|| addr_host(addr).to_owned());
        let ca_pem = std::fs::read_to_string(&self.ca)
            .with_context(|| format!("reading {}", self.ca.display()))?;
        let token = self.token.resolve().await?;
        Ok(ClientConfig { server, server_name, ca_pem: Some(ca_pem), token, client_cert: None })
    }
}

/// The host part of `HOST:PORT` (without IPv6 brackets), for the default server name.
fn addr_host(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _port)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mode::args::ModeArgs;
    use crate::mode::RELAY_SUBJECT_PREFIX;
    use crate::testing;
    use edgerelay::proto::event_result::Outcome as Result_;

    fn parse(extra: &[&str]) -> ModeArgs<Args> {
        let base = ["loadtest", "--ca", "ca.pem", "--token", "t", "--rate", "100"];
        testing::parse(&[&base[..], extra].concat()).unwrap()
    }

    fn accepted() -> proto::EventResult {
        proto::EventResult {
            outcome: Some(Result_::Accepted(proto::Accepted {
                stream: "EDGE".into(),
                seq: 1,
                batch: "b".into(),
                index: 0,
                duplicate: false,
                cluster: "default".into(),
            })),
        }
    }

    fn refused(code: &str) -> proto::Refused {
        proto::Refused { code: code.into(), message: "no".into(), ..Default::default() }
    }

    #[test]
    fn answers_match_the_oldest_request_in_flight() {
        let t0 = Instant::now();
        let mut p = Pipeline::new();
        assert_eq!(p.overdue_at(Duration::from_secs(1)), None);
        p.sent(t0, "a");
        p.sent(t0 + Duration::from_millis(5), "b");
        p.sent(t0 + Duration::from_millis(9), "c");
        assert_eq!(p.len(), 3);
        assert_eq!(p.overdue_at(Duration::from_secs(1)), Some(t0 + Duration::from_secs(1)));
        assert_eq!(p.answered(), Some("a"));
        // The next deadline is the next-oldest request's.
        assert_eq!(p.overdue_at(Duration::from_secs(1)), Some(t0 + Duration::from_millis(1005)));
        p.sent(t0 + Duration::from_millis(12), "d");
        assert_eq!(p.answered(), Some("b"));
        // A lost stream abandons the rest in send order.
        assert_eq!(p.abandon().collect::<Vec<_>>(), ["c", "d"]);
        assert!(p.is_empty());
        assert_eq!(p.answered(), None);
    }

    #[test]
    fn answers_become_outcomes_per_event() {
        let all = proto::PublishResponse { results: vec![accepted(), accepted()], error: None };
        assert_eq!(outcome(&all, 2), Outcome::Accepted);

        let queued = proto::EventResult { outcome: Some(Result_::Queued(proto::Queued {})) };
        let queued = proto::PublishResponse { results: vec![queued], error: None };
        assert_eq!(outcome(&queued, 1), Outcome::Accepted);

        let partial = proto::PublishResponse {
            results: vec![
                accepted(),
                proto::EventResult { outcome: Some(Result_::Refused(refused("queue_full"))) },
                proto::EventResult { outcome: None },
            ],
            error: None,
        };
        let o = outcome(&partial, 3);
        assert_eq!(o, Outcome::Partial(vec![Failure::Refused("queue_full"), Failure::Protocol]));
        assert_eq!(o.accepted(3), 1);

        let whole =
            proto::PublishResponse { results: vec![], error: Some(refused("unauthorized")) };
        assert_eq!(outcome(&whole, 16), Outcome::Failed(Failure::Refused("unauthorized")));

        // One result too few does not fit the request.
        assert_eq!(outcome(&all, 3), Outcome::Failed(Failure::Protocol));
        assert_eq!(code("made_up"), "unknown_code");
        assert_eq!(code("ack_timeout"), "ack_timeout");
    }

    #[test]
    fn requests_carry_consecutive_events() {
        let flags = parse(&["--events-per-request", "4", "--subjects", "3"]);
        let requests = Requests {
            events: testing::events(&flags.events, RELAY_SUBJECT_PREFIX),
            per_request: flags.mode.events_per_request,
        };
        let events = requests.build(2, 0);
        assert_eq!(events.len(), 4);
        // Events 8..12: subjects 8 mod 3 = 2, 0, 1, 2.
        let subjects: Vec<&str> = events.iter().map(|e| e.subject.as_str()).collect();
        assert_eq!(subjects, ["edge.load.2", "edge.load.0", "edge.load.1", "edge.load.2"]);
        assert!(events[0].id.ends_with("-8") && events[3].id.ends_with("-11"));
        assert!(events.iter().all(|e| e.payload.len() == 256 && e.edge_time_unix_ms > 0));
    }

    #[test]
    fn defaults_and_server_names() {
        let args = parse(&[]).mode;
        assert_eq!(args.target.addr, "127.0.0.1:8443");
        assert_eq!((args.connections, args.streams, args.in_flight), (4, 4, 8));
        assert_eq!(args.events_per_request, 1);
        assert!(
            testing::parse::<ModeArgs<Args>>(&["loadtest", "--token", "t", "--rate", "1"]).is_err()
        );
        assert_eq!(addr_host("127.0.0.1:8443"), "127.0.0.1");
        assert_eq!(addr_host("[::1]:8443"), "::1");
        assert_eq!(addr_host("relay.example:443"), "relay.example");
    }
}
