//! `edgerelay top`, the real binary, under a pseudo-terminal: it draws a live relay's numbers,
//! shows an unreachable relay and keeps polling it, quits on `q` and Ctrl-C with exit 0, and
//! leaves the terminal as it found it (cooked mode, main screen, cursor shown).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::termios::{LocalModes, Winsize};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_edgerelay");
const ROWS: u16 = 40;
const COLS: u16 = 120;
/// Generous: the first frame needs a debug binary to start and two polls.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// `edgerelay top` running on the slave side of a pty whose master this test holds.
struct Top {
    child: Child,
    master: File,
    /// Our handle on the slave, to read its termios; dropped at the end so the reader sees EOF.
    slave: Option<OwnedFd>,
    screen: Arc<Mutex<vt100::Parser>>,
    reader: Option<JoinHandle<()>>,
}

impl Top {
    fn spawn(args: &[&str]) -> Self {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let name = ptsname(&master, Vec::new()).expect("ptsname");
        let slave = rustix::fs::open(
            name.as_c_str(),
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY,
            rustix::fs::Mode::empty(),
        )
        .expect("open the pty slave");
        rustix::termios::tcsetwinsize(
            &slave,
            Winsize { ws_row: ROWS, ws_col: COLS, ws_xpixel: 0, ws_ypixel: 0 },
        )
        .expect("set the window size");
        let stdio = || Stdio::from(slave.try_clone().expect("dup the pty slave"));
        // `setsid` gives top a session of its own, without a controlling terminal, so that a
        // test run from a developer's terminal does not lend top that terminal's /dev/tty.
        let child = Command::new("setsid")
            .arg("--wait")
            .arg(BIN)
            .arg("top")
            .args(args)
            .env("TERM", "xterm-256color")
            .stdin(stdio())
            .stdout(stdio())
            .stderr(stdio())
            .spawn()
            .expect("spawn setsid edgerelay top");
        let master = File::from(master);
        let screen = Arc::new(Mutex::new(vt100::Parser::new(ROWS, COLS, 0)));
        let reader = {
            let mut master = master.try_clone().expect("dup the pty master");
            let screen = screen.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                // Ends with EOF or EIO once every slave handle is closed.
                while let Ok(n @ 1..) = master.read(&mut buf) {
                    screen.lock().unwrap().process(&buf[..n]);
                }
            })
        };
        Self { child, master, slave: Some(slave), screen, reader: Some(reader) }
    }

    fn contents(&self) -> String {
        self.screen.lock().unwrap().screen().contents()
    }

    /// Waits until the screen satisfies `done`; returns it.
    fn wait_for(&mut self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + FRAME_TIMEOUT;
        loop {
            let text = self.contents();
            if done(&text) {
                return text;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("top exited ({status}) before showing {what}; screen:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {FRAME_TIMEOUT:?}; screen:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn send(&mut self, keys: &[u8]) {
        self.master.write_all(keys).expect("write to the pty");
    }

    /// Waits for the exit, then checks the terminal was restored.
    fn exit_status(mut self) -> ExitStatus {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for top") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("top did not exit within {EXIT_TIMEOUT:?}:\n{}", self.contents());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let slave = self.slave.take().expect("slave handle");
        let modes = rustix::termios::tcgetattr(&slave).expect("tcgetattr").local_modes;
        assert!(
            modes.contains(LocalModes::ICANON | LocalModes::ECHO),
            "raw mode left on: {modes:?}"
        );
        drop(slave);
        if let Some(reader) = self.reader.take() {
            reader.join().expect("pty reader");
        }
        let parser = self.screen.lock().unwrap();
        let screen = parser.screen();
        assert!(!screen.alternate_screen(), "still on the alternate screen");
        assert!(!screen.hide_cursor(), "cursor left hidden");
        status
    }
}

impl Drop for Top {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `N` of "N failed polls" on the screen, 0 if absent.
fn failed_polls(screen: &str) -> u32 {
    let Some(end) = screen.find(" failed poll") else { return 0 };
    let digits = screen[..end].rsplit(|c: char| !c.is_ascii_digit()).next().unwrap_or("");
    digits.parse().unwrap_or(0)
}

fn line_with<'a>(screen: &'a str, needle: &str) -> Option<&'a str> {
    screen.lines().find(|l| l.contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_a_live_relay_and_quits_on_q() {
    let (_nats, _setup, relay) = start_relay(|_| {}).await;
    for i in 0..5 {
        let resp = relay.publish(&relay.h2, &format!("edge.top.{i}"), "x").send().await.unwrap();
        assert_eq!(resp.status(), 202);
    }
    let admin = relay.admin_url("");
    // The relay runs on this runtime; the waits below block, so keep them off its workers.
    let admin_shown = admin.clone();
    let status = tokio::task::spawn_blocking(move || {
        let mut top = Top::spawn(&["--admin", &admin, "--interval-ms", "200"]);
        let screen = top.wait_for("the accepted events", |s| {
            line_with(s, "accepted").is_some_and(|l| l.contains("total 5"))
                && line_with(s, "accepted").is_some_and(|l| l.contains("/s"))
        });
        for needle in [
            "edgerelay top",
            admin_shown.as_str(),
            "● connected",
            "Throughput",
            "Pipeline",
            "Latency",
            "SLO p99 < 100 ms",
            "ingest_to_ack distribution",
            "0 events",
            "0 batches",
        ] {
            assert!(screen.contains(needle), "missing {needle:?} in\n{screen}");
        }
        assert!(!screen.contains("unreachable"), "{screen}");
        if !screen.contains("serves no /debug/latency") {
            // A relay with /debug/latency: the ingest→ack percentiles of the five events.
            top.wait_for("ingest_to_ack percentiles", |s| {
                line_with(s, "ingest_to_ack ").is_some_and(|l| l.contains("ms") || l.contains("µs"))
            });
        }
        top.send(b"q");
        top.exit_status()
    })
    .await
    .unwrap();
    assert!(status.success(), "{status}");
    relay.shutdown().await;
}

#[test]
fn top_shows_an_unreachable_relay_keeps_polling_and_quits_on_ctrl_c() {
    let port = free_port();
    let admin = format!("http://127.0.0.1:{port}");
    let mut top = Top::spawn(&["--admin", &admin, "--interval-ms", "100"]);
    // Polling goes on: the count of failed polls climbs.
    let screen = top.wait_for("three failed polls", |s| failed_polls(s) >= 3);
    assert!(screen.contains("relay unreachable: connect:"), "{screen}");
    assert!(screen.contains("Latency") && screen.contains("Throughput"), "{screen}");
    top.send(b"\x03");
    let status = top.exit_status();
    assert!(status.success(), "{status}");
}
