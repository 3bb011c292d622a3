//! Shared helpers for broker integration tests: a real software TPM (swtpm) per test.
//!
//! `Swtpm::start()` runs `swtpm socket --tpm2` as a child process on two free consecutive TCP
//! ports (the swtpm TCTI talks to the control channel on `port + 1`), with its state in a fresh
//! temporary directory, and waits until the server port accepts connections. The process is
//! killed when the `Swtpm` is dropped.
//!
//! If swtpm is not installed, `start()` panics when `CI=true` and otherwise prints `SKIP` and
//! returns `None` (use the [`swtpm_or_skip!`] macro).
#![allow(dead_code)]

use std::fs::File;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long swtpm may take to start listening.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a start is retried when swtpm loses a race for its ports.
const START_ATTEMPTS: usize = 5;

/// Starts a swtpm for this test, or returns from the test (skip) when swtpm is not installed and
/// `CI` is not `true`.
#[macro_export]
macro_rules! swtpm_or_skip {
    () => {
        match common::Swtpm::start() {
            Some(swtpm) => swtpm,
            None => return,
        }
    };
}

/// A running swtpm child process; killed on drop.
pub struct Swtpm {
    child: Child,
    port: u16,
    state: tempfile::TempDir,
}

impl Swtpm {
    /// Starts swtpm, or returns `None` (after printing why) when it is not installed and `CI` is
    /// not `true`. Any other failure panics.
    pub fn start() -> Option<Swtpm> {
        if !swtpm_installed() {
            let why = "swtpm is not installed (apt-get install swtpm)";
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("CI=true and {why}");
            }
            eprintln!("SKIP: {why}");
            return None;
        }
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start() {
                Ok(swtpm) => return Some(swtpm),
                Err(e) => last_error = e,
            }
        }
        panic!("cannot start swtpm after {START_ATTEMPTS} attempts: {last_error}");
    }

    /// TCTI string for `vault_broker::tpm::Tpm::open`.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The server (command) port; the control port is `port() + 1`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the TPM state (and `swtpm.log`).
    pub fn state_dir(&self) -> PathBuf {
        self.state.path().to_path_buf()
    }

    fn try_start() -> Result<Swtpm, String> {
        let state = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let port = free_port_pair()?;
        let log = File::create(state.path().join("swtpm.log")).map_err(|e| format!("log: {e}"))?;
        let mut child = Command::new("swtpm")
            .arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", state.path().display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .arg("--flags")
            .arg("not-need-init,startup-clear")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("spawning swtpm: {e}"))?;

        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log =
                    std::fs::read_to_string(state.path().join("swtpm.log")).unwrap_or_default();
                return Err(format!("swtpm exited early ({status}): {log}"));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(Swtpm { child, port, state });
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "swtpm not listening on {addr} after {READY_TIMEOUT:?}"
                ));
            }
            // Poll interval while waiting for the port (bounded by the deadline above).
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn swtpm_installed() -> bool {
    match Command::new("swtpm")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => true,
        Err(e) => e.kind() != ErrorKind::NotFound,
    }
}

/// A port `p` such that `p` and `p + 1` were both free on 127.0.0.1 a moment ago.
fn free_port_pair() -> Result<u16, String> {
    let (first, _second) = bind_port_pair()?;
    first
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

/// A recording TCP proxy in front of a [`Swtpm`]: everything the TSS sends to the TPM and every
/// answer passes through it, so a test can check what crosses the "bus" in clear.
pub struct BusTap {
    port: u16,
    to_tpm: Recording,
    from_tpm: Recording,
}

type Recording = std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

impl BusTap {
    /// Listens on two free consecutive ports and forwards them to the swtpm's server and control
    /// ports. The proxy threads live until the test process exits.
    pub fn start(swtpm: &Swtpm) -> BusTap {
        let (server, ctrl) = bind_port_pair().unwrap_or_else(|e| panic!("bus tap: {e}"));
        let port = server
            .local_addr()
            .unwrap_or_else(|e| panic!("bus tap: {e}"))
            .port();
        let to_tpm = Recording::default();
        let from_tpm = Recording::default();
        spawn_forwarder(
            server,
            swtpm.port(),
            Some((to_tpm.clone(), from_tpm.clone())),
        );
        spawn_forwarder(ctrl, swtpm.port() + 1, None);
        BusTap {
            port,
            to_tpm,
            from_tpm,
        }
    }

    /// TCTI string that talks to the TPM through the tap.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The bytes sent to the TPM on the command channel, one entry per connection.
    pub fn sent(&self) -> Vec<Vec<u8>> {
        snapshot(&self.to_tpm)
    }

    /// The bytes the TPM answered on the command channel, one entry per connection.
    pub fn received(&self) -> Vec<Vec<u8>> {
        snapshot(&self.from_tpm)
    }
}

fn snapshot(recording: &Recording) -> Vec<Vec<u8>> {
    match recording.lock() {
        Ok(guard) => guard.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

fn bind_port_pair() -> Result<(TcpListener, TcpListener), String> {
    for _ in 0..100 {
        let first =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("bind: {e}"))?;
        let port = first
            .local_addr()
            .map_err(|e| format!("local_addr: {e}"))?
            .port();
        let Some(next) = port.checked_add(1) else {
            continue;
        };
        if let Ok(second) = TcpListener::bind((Ipv4Addr::LOCALHOST, next)) {
            return Ok((first, second));
        }
    }
    Err("no two consecutive free ports found".into())
}

fn spawn_forwarder(
    listener: TcpListener,
    target_port: u16,
    record: Option<(Recording, Recording)>,
) {
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(upstream) = TcpStream::connect((Ipv4Addr::LOCALHOST, target_port)) else {
                continue;
            };
            let (up_rec, down_rec) = match &record {
                Some((to_tpm, from_tpm)) => (Some(new_entry(to_tpm)), Some(new_entry(from_tpm))),
                None => (None, None),
            };
            let (Ok(client2), Ok(upstream2)) = (client.try_clone(), upstream.try_clone()) else {
                continue;
            };
            std::thread::spawn(move || pump(client, upstream, up_rec));
            std::thread::spawn(move || pump(upstream2, client2, down_rec));
        }
    });
}

/// Adds an empty per-connection entry and returns (recording, its index).
fn new_entry(recording: &Recording) -> (Recording, usize) {
    let mut guard = match recording.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    guard.push(Vec::new());
    (recording.clone(), guard.len() - 1)
}

fn pump(mut from: TcpStream, mut to: TcpStream, record: Option<(Recording, usize)>) {
    use std::io::{Read, Write};
    let mut buf = [0u8; 8192];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Record before forwarding, so a test that has its answer has the recording too.
        if let Some((recording, index)) = &record {
            let mut guard = match recording.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            if let Some(entry) = guard.get_mut(*index) {
                entry.extend_from_slice(&buf[..n]);
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}
