//! `edgerelay top`: a live full-screen view of one relay, read from its admin listener
//! (`/metrics` and `/debug/latency`) every interval: rates, queue depth, batches in flight,
//! connections, the active NATS cluster and its RTT, per-stage percentiles of the last window
//! against the 100 ms SLO, and the ingest→ack distribution as bars.
//!
//! The pieces: [`prom`] reads the Prometheus text, [`latency`] the percentile document,
//! [`state`] turns scrapes into rates (all three sans-IO), [`render`] draws a frame from the
//! state. This file is the I/O: the HTTP polls and the terminal. An unreachable relay is
//! shown in the frame and polled again; only a terminal that cannot be drawn on ends `top`
//! with an error. The terminal is restored (raw mode off, main screen, cursor shown) on every
//! way out, a panic included.

pub mod latency;
pub mod prom;
pub mod render;
pub mod state;

use std::io::{IsTerminal, Stdout};
use std::sync::Once;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossterm::event::{Event, EventStream, KeyCode, KeyEventKind, KeyModifiers};
use futures::StreamExt;
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use self::state::{Scrape, View};

/// Largest `/metrics` or `/debug/latency` body read.
const MAX_BODY_BYTES: usize = 8 << 20;

/// How `top` runs.
#[derive(Clone, Debug)]
pub struct TopOptions {
    /// The relay's admin listener, e.g. `http://127.0.0.1:9090` (`http://` may be left out).
    pub admin: String,
    /// Time between two polls (and frames).
    pub interval: Duration,
}

/// Why `top` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// The admin URL is not one `top` can poll (bad usage; retrying does not help).
    #[error("--admin {url:?}: {why}")]
    BadAdmin { url: String, why: &'static str },
    /// Standard input or output is not a terminal: `top` draws a full screen.
    #[error("standard input and output must be a terminal (top draws a full screen)")]
    NotATerminal,
    /// The terminal could not be set up or drawn on.
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
}

/// Where the admin listener is.
#[derive(Clone, Debug)]
pub struct AdminTarget {
    host: String,
    port: u16,
    /// `host:port`, for the `Host` header and the title.
    authority: String,
    /// Path prefix the admin listener sits under (empty, or e.g. `/relay1` behind a proxy).
    base: String,
}

/// Why one poll failed: shown in the frame, and polled again.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("{path} answered {status}")]
    Status { path: &'static str, status: StatusCode },
    #[error("reading {path}: {why}")]
    Body { path: &'static str, why: String },
}

impl AdminTarget {
    /// Parses `http://host:port[/prefix]` (or `host:port`).
    pub fn parse(url: &str) -> Result<Self, TopError> {
        let bad = |why| TopError::BadAdmin { url: url.to_owned(), why };
        let with_scheme =
            if url.contains("://") { url.to_owned() } else { format!("http://{url}") };
        let uri: Uri = with_scheme.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("the admin listener speaks plain http://"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(80);
        let authority = uri.authority().map(|a| a.to_string()).ok_or_else(|| bad("no host"))?;
        let base = uri.path().trim_end_matches('/').to_owned();
        Ok(Self { host, port, authority, base })
    }

    /// The URL as shown.
    pub fn display(&self) -> String {
        format!("http://{}{}", self.authority, self.base)
    }

    /// Polls `/metrics` and `/debug/latency` once, on one connection, within `timeout`.
    pub async fn scrape(&self, timeout: Duration) -> Scrape {
        let fetched = tokio::time::timeout(timeout, self.fetch_both()).await;
        let (at, metrics, latency) = match fetched {
            Ok(Ok((at, metrics, latency))) => (at, Ok(metrics), latency.map_err(|e| e.to_string())),
            Ok(Err(e)) => (Instant::now(), Err(e.to_string()), Err(e.to_string())),
            Err(_) => {
                let e = FetchError::Timeout(timeout).to_string();
                (Instant::now(), Err(e.clone()), Err(e))
            }
        };
        Scrape { at, metrics, latency }
    }

    /// The metrics text with the instant it arrived, and the latency document (`None` when
    /// the relay has none).
    async fn fetch_both(
        &self,
    ) -> Result<(Instant, String, Result<Option<Vec<u8>>, FetchError>), FetchError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(FetchError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        let conn = tokio::spawn(conn);
        let result = async {
            let (status, body) = self.get(&mut send, "/metrics").await?;
            let at = Instant::now();
            if status != StatusCode::OK {
                return Err(FetchError::Status { path: "/metrics", status });
            }
            let metrics = String::from_utf8(body)
                .map_err(|_| FetchError::Body { path: "/metrics", why: "not UTF-8".into() })?;
            let latency = match self.get(&mut send, "/debug/latency").await {
                Ok((StatusCode::NOT_FOUND, _)) => Ok(None),
                Ok((StatusCode::OK, body)) => Ok(Some(body)),
                Ok((status, _)) => Err(FetchError::Status { path: "/debug/latency", status }),
                Err(e) => Err(e),
            };
            Ok((at, metrics, latency))
        }
        .await;
        conn.abort();
        result
    }

    async fn get(
        &self,
        send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        path: &'static str,
    ) -> Result<(StatusCode, Vec<u8>), FetchError> {
        send.ready().await?;
        let req = http::Request::get(format!("{}{path}", self.base))
            .header(http::header::HOST, self.authority.as_str())
            .body(Empty::new())
            .map_err(|e| FetchError::Body { path, why: e.to_string() })?;
        let resp = send.send_request(req).await?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| FetchError::Body { path, why: e.to_string() })?
            .to_bytes();
        Ok((status, body.to_vec()))
    }
}

/// Runs `top` until `q`, Ctrl-C, SIGINT or SIGTERM.
pub async fn run(opts: TopOptions) -> Result<(), TopError> {
    let target = AdminTarget::parse(&opts.admin)?;
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        return Err(TopError::NotATerminal);
    }
    let interval = opts.interval.max(Duration::from_millis(50));
    let mut view = View::new(target.display(), interval);
    let mut screen = Screen::enter()?;
    let (tx, mut scrapes) = mpsc::channel(1);
    let poller = tokio::spawn(poll(target, interval, tx));
    let mut keys = EventStream::new();
    let mut signals = Signals::new();
    screen.draw(&view)?;
    let outcome = loop {
        tokio::select! {
            scrape = scrapes.recv() => match scrape {
                Some(scrape) => {
                    view.observe(scrape);
                    screen.draw(&view)?;
                }
                None => break Ok(()),
            },
            event = keys.next() => match event {
                Some(Ok(Event::Key(k))) if k.kind == KeyEventKind::Press && is_quit(k.code, k.modifiers) => break Ok(()),
                Some(Ok(Event::Resize(..))) => screen.draw(&view)?,
                Some(Ok(_)) => {}
                Some(Err(e)) => break Err(TopError::Terminal(e)),
                None => break Ok(()),
            },
            () = signals.recv() => break Ok(()),
        }
    };
    poller.abort();
    drop(screen);
    outcome
}

fn is_quit(code: KeyCode, modifiers: KeyModifiers) -> bool {
    matches!(code, KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc)
        || (code == KeyCode::Char('c') && modifiers.contains(KeyModifiers::CONTROL))
}

/// Polls every `interval` (each poll bounded by it, and by 5 s at most) until the screen
/// goes away.
async fn poll(target: AdminTarget, interval: Duration, tx: mpsc::Sender<Scrape>) {
    let timeout = interval.clamp(Duration::from_millis(500), Duration::from_secs(5));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let scrape = target.scrape(timeout).await;
        if tx.send(scrape).await.is_err() {
            return;
        }
    }
}

/// SIGINT and SIGTERM (Ctrl-C itself arrives as a key in raw mode).
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Self {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    async fn recv(&mut self) {
        async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = one(&mut self.term) => {}
            () = one(&mut self.int) => {}
        }
    }
}

/// The terminal in raw mode on the alternate screen with the cursor hidden; dropping it (or a
/// panic) puts everything back.
struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl Screen {
    fn enter() -> std::io::Result<Self> {
        install_panic_hook();
        crossterm::terminal::enable_raw_mode()?;
        let entered = crossterm::execute!(
            std::io::stdout(),
            crossterm::terminal::EnterAlternateScreen,
            crossterm::cursor::Hide
        )
        .and_then(|()| Terminal::new(CrosstermBackend::new(std::io::stdout())));
        match entered {
            Ok(terminal) => Ok(Self { terminal }),
            Err(e) => {
                restore_terminal();
                Err(e)
            }
        }
    }

    fn draw(&mut self, view: &View) -> std::io::Result<()> {
        self.terminal.draw(|f| render::render(f, view)).map(|_| ())
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Raw mode off, main screen back, cursor shown. Safe to call more than once.
fn restore_terminal() {
    let _ = crossterm::terminal::disable_raw_mode();
    let _ = crossterm::execute!(
        std::io::stdout(),
        crossterm::terminal::LeaveAlternateScreen,
        crossterm::cursor::Show
    );
}

/// A panic restores the terminal before its message is printed, so the message is readable.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls() {
        let t = AdminTarget::parse("http://127.0.0.1:9090").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.base.as_str()), ("127.0.0.1", 9090, ""));
        assert_eq!(t.display(), "http://127.0.0.1:9090");
        let t = AdminTarget::parse("relay-7.pop:9090/admin/").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.base.as_str()), ("relay-7.pop", 9090, "/admin"));
        let t = AdminTarget::parse("http://[::1]:9090").unwrap();
        assert_eq!((t.host.as_str(), t.authority.as_str()), ("::1", "[::1]:9090"));
        assert_eq!(AdminTarget::parse("http://localhost").unwrap().port, 80);
        for bad in ["https://127.0.0.1:9090", "http://", "not a url at all", ""] {
            assert!(matches!(AdminTarget::parse(bad), Err(TopError::BadAdmin { .. })), "{bad}");
        }
    }

    #[test]
    fn quit_keys() {
        assert!(is_quit(KeyCode::Char('q'), KeyModifiers::NONE));
        assert!(is_quit(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert!(!is_quit(KeyCode::Char('c'), KeyModifiers::NONE));
        assert!(!is_quit(KeyCode::Char('x'), KeyModifiers::NONE));
    }

    #[tokio::test]
    async fn an_unreachable_relay_is_a_scrape_error_not_a_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let t = AdminTarget::parse(&format!("http://{addr}")).unwrap();
        let s = t.scrape(Duration::from_secs(5)).await;
        assert!(s.metrics.unwrap_err().contains("connect"));
    }
}
