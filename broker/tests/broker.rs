#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The broker end to end: a real swtpm, a real vault-broker process, real vaultfs mounts.
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use vault_broker::tpm::Tpm;
use vaultfs_core::protocol::{Client, Request, Response, VaultState, VaultStatus};

fn bin(name: &str) -> PathBuf {
    let mut p = std::env::current_exe().unwrap();
    p.pop();
    if p.ends_with("deps") {
        p.pop();
    }
    let b = p.join(name);
    assert!(
        b.exists(),
        "{} not built: run cargo build --workspace --bins",
        b.display()
    );
    b
}

struct Broker {
    child: Child,
    dir: PathBuf,
    tcti: String,
}

impl Broker {
    fn socket(&self) -> PathBuf {
        self.dir.join("run/broker.sock")
    }
    fn mnt(&self, vault: &str) -> PathBuf {
        self.dir.join("vault").join(vault)
    }
    fn start(dir: &Path, tcti: &str) -> Broker {
        std::fs::write(dir.join("broker.toml"), "key_uids = [0]\n").unwrap();
        let mut child = Command::new(bin("vault-broker"))
            .arg("--config")
            .arg(dir.join("broker.toml"))
            .arg("--socket")
            .arg(dir.join("run/broker.sock"))
            .arg("--mount-root")
            .arg(dir.join("vault"))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--tcti")
            .arg(tcti)
            .arg("--vaultfs")
            .arg(bin("vaultfs"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("broker.log")).unwrap())
            .spawn()
            .unwrap();
        // Readiness: the broker prints "ready" once every vault has been handled.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "broker log:\n{}",
            std::fs::read_to_string(dir.join("broker.log")).unwrap_or_default()
        );
        Broker {
            child,
            dir: dir.to_path_buf(),
            tcti: tcti.into(),
        }
    }
    fn client(&self) -> Client {
        Client::connect(&self.socket(), std::time::Duration::from_secs(60)).unwrap()
    }
    fn status(&self, vault: &str) -> VaultStatus {
        match self.client().call(&Request::Status).unwrap() {
            Response::Status(l) => l.into_iter().find(|s| s.name == vault).unwrap(),
            r => panic!("{r:?}"),
        }
    }
    fn call_ok(&self, req: Request) {
        let r = self.client().call(&req).unwrap();
        assert_eq!(r, Response::Ok, "{req:?}");
    }
    /// SIGKILL: no clean-up at all, the vaultfs processes it launched keep running.
    fn crash(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.dir = PathBuf::new(); // Drop must not unmount anything
    }

    fn stop(mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let st = self.child.wait().unwrap();
        assert!(st.success(), "broker exit {st:?}");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.dir.as_os_str().is_empty() {
            return;
        }
        for v in ["config", "apps"] {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(self.mnt(v))
                .output();
        }
        let _ = &self.tcti;
    }
}

fn mounted(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(p.to_str().unwrap()))
}

/// Searches every readable mapping of a process for `needle`.
fn memory_contains(pid: u32, needle: &[u8]) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    use std::io::Seek;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let range = f.next().unwrap();
        let perms = f.next().unwrap();
        if !perms.starts_with('r') || line.contains("[vvar]") || line.contains("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        if mem.seek(std::io::SeekFrom::Start(a)).is_err() {
            continue;
        }
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.read_exact(&mut buf).is_err() {
            continue;
        }
        if buf.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

fn vaultfs_pid_for(mnt: &Path) -> Option<u32> {
    for e in std::fs::read_dir("/proc").unwrap() {
        let e = e.unwrap();
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.first().is_some_and(|a| a.ends_with(b"/vaultfs"))
            && args.contains(&mnt.to_str().unwrap().as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

fn simulate_measured_boot(tcti: &str) {
    let mut t = Tpm::open(tcti).unwrap();
    for pcr in [0u8, 1, 2, 3, 4, 7] {
        t.extend_pcr(pcr, format!("firmware stage {pcr}").as_bytes())
            .unwrap();
    }
}

#[test]
fn broker_end_to_end() {
    let Some(tpm) = common::Swtpm::start() else {
        return;
    };
    let tcti = tpm.tcti();
    simulate_measured_boot(&tcti);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // Boot: default vaults created, sealed, unsealed and mounted.
    let b = Broker::start(dir, &tcti);
    for v in ["config", "apps"] {
        let s = b.status(v);
        assert_eq!(s.state, VaultState::Unlocked, "{s:?}");
        assert!(s.mounted && mounted(&b.mnt(v)), "{s:?}");
        assert_eq!(s.unlock_method, "tpm-local-sealed");
    }
    std::fs::write(b.mnt("config").join("datastore-credentials"), b"s3cr3t").unwrap();
    std::fs::write(b.mnt("apps").join("volume.img"), vec![7u8; 1 << 20]).unwrap();
    assert_eq!(
        std::fs::read(b.mnt("config").join("datastore-credentials")).unwrap(),
        b"s3cr3t"
    );
    // No key file anywhere under the broker's directories.
    let conf = std::fs::read_to_string(dir.join("data/config/vaultfs.conf")).unwrap();
    assert!(conf.contains("\"tpm\""));

    // A peer not on the allow-list is refused before the broker reads its request. The socket is
    // 0600 in a 0700 directory, so open both up first to reach the credentials check itself.
    let sock = b.socket();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        sock.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let py = "import socket,struct,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\nd=b''\nwhile True:\n  c=s.recv(4096)\n  if not c: break\n  d+=c\nprint(d.hex())";
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            py,
        ])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hex = String::from_utf8(out.stdout).unwrap();
    // Without sending a byte, the peer gets Response::Error (variant 6) with ErrorCode::NotAllowed
    // (variant 2), then the connection closes: the credentials were checked before any read.
    assert_eq!(&hex.trim()[8..12], "0602", "reply {hex}");
    std::fs::set_permissions(
        sock.parent().unwrap(),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Bad frames: oversized, truncated, garbage; the broker answers or closes, and keeps serving.
    for bad in [
        &[0xffu8, 0xff, 0xff, 0xff][..],
        &[0, 0, 0, 9, 1, 2][..],
        &[0, 0, 0, 3, 0xfe, 0xfe, 0xfe][..],
    ] {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        s.write_all(bad).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        if !reply.is_empty() {
            let body = &reply[4..];
            let r: Response = vaultfs_core::protocol::decode(body).unwrap();
            assert!(matches!(r, Response::Error { .. }), "{r:?}");
        }
    }
    assert_eq!(b.status("config").state, VaultState::Unlocked);

    // Lock: unmounted, vaultfs gone, and the key no longer anywhere in the broker's memory.
    let key = match b
        .client()
        .call(&Request::GetVaultKey {
            vault: "config".into(),
        })
        .unwrap()
    {
        Response::VaultKey(k) => k.0.clone(),
        r => panic!("{r:?}"),
    };
    assert_eq!(key.len(), 32);
    let fs_pid = vaultfs_pid_for(&b.mnt("config")).unwrap();
    assert!(
        memory_contains(b.child.id(), &key),
        "sanity: the unlocked key is in the broker"
    );
    b.call_ok(Request::Lock {
        vault: "config".into(),
    });
    let s = b.status("config");
    assert_eq!(s.state, VaultState::Locked);
    assert!(!mounted(&b.mnt("config")));
    assert!(
        !Path::new(&format!("/proc/{fs_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{fs_pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
    );
    assert!(
        !memory_contains(b.child.id(), &key),
        "the key survived lock in the broker's memory"
    );
    // Unlock again: same data.
    b.call_ok(Request::Unlock {
        vault: "config".into(),
    });
    assert_eq!(
        std::fs::read(b.mnt("config").join("datastore-credentials")).unwrap(),
        b"s3cr3t"
    );

    // vaultfs killed: restarted and remounted by the broker.
    let pid = vaultfs_pid_for(&b.mnt("apps")).unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let mut ev = b.client();
    // Wait for a status event saying it is mounted again by a new process.
    ev.call(&Request::Watch).unwrap();
    loop {
        if let Some(p) = vaultfs_pid_for(&b.mnt("apps")) {
            let st = b.status("apps");
            let noted = st.error.as_deref().unwrap_or("").contains("restarted");
            if p != pid && mounted(&b.mnt("apps")) && st.mounted && noted {
                break;
            }
        }
        let _ = ev.next_message();
    }
    assert_eq!(
        std::fs::read(b.mnt("apps").join("volume.img")).unwrap(),
        vec![7u8; 1 << 20]
    );
    assert!(b
        .status("apps")
        .error
        .as_deref()
        .unwrap_or("")
        .contains("restarted"));

    // Broker crash with vaults mounted: the mounts stay served meanwhile, and a new broker takes
    // them over with vaultfs processes of its own.
    let old_fs = vaultfs_pid_for(&b.mnt("config")).unwrap();
    b.crash();
    assert!(mounted(&dir.join("vault/config")));
    assert_eq!(
        std::fs::read(dir.join("vault/config/datastore-credentials")).unwrap(),
        b"s3cr3t"
    );
    let b = Broker::start(dir, &tcti);
    let new_fs = vaultfs_pid_for(&b.mnt("config")).unwrap();
    assert_ne!(new_fs, old_fs);
    assert_eq!(b.status("config").state, VaultState::Unlocked);
    assert_eq!(
        std::fs::read(b.mnt("config").join("datastore-credentials")).unwrap(),
        b"s3cr3t"
    );

    // Broker restart: vaults come back.
    b.stop();
    assert!(!mounted(&tmp.path().join("vault/config")));
    let b = Broker::start(dir, &tcti);
    assert_eq!(
        std::fs::read(b.mnt("config").join("datastore-credentials")).unwrap(),
        b"s3cr3t"
    );

    // Delete: crypto-erase then data gone; the wrapped key is unrecoverable.
    b.call_ok(Request::Delete {
        vault: "apps".into(),
    });
    assert!(!dir.join("data/apps").exists());
    assert_eq!(b.status("apps").state, VaultState::Absent);

    // Changed boot measurements: the vault stays locked and says why.
    b.stop();
    Tpm::open(&tcti)
        .unwrap()
        .extend_pcr(7, b"tampered bootloader")
        .unwrap();
    let b = Broker::start(dir, &tcti);
    let s = b.status("config");
    assert_eq!(s.state, VaultState::Error, "{s:?}");
    assert_eq!(s.status, vaultfs_core::protocol::DataSecStatus::Error);
    assert_eq!(s.mismatching_pcrs, vec![7]);
    assert_eq!(s.unlock_method, "none");
    assert!(!mounted(&b.mnt("config")));
    assert!(s.error.unwrap().contains("mismatching PCR"));
    b.stop();
}
