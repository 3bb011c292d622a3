#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The command-line contract: protectors, passphrases, exit codes, daemon and foreground modes,
//! clean unmount on SIGTERM.
mod common;

use common::{bin, run, Vault};
use std::process::{Command, Stdio};

fn mounted(mnt: &std::path::Path) -> bool {
    let m = std::fs::read_to_string("/proc/self/mounts").unwrap();
    m.lines()
        .any(|l| l.split(' ').nth(1) == Some(mnt.to_str().unwrap()))
}

#[test]
fn protectors_add_list_remove() {
    if !common::require_fuse() {
        return;
    }
    let mut v = Vault::create("aes-256-gcm");
    v.mount();
    std::fs::write(v.p("f"), b"data").unwrap();
    v.unmount();
    let pw = v.tmp.path().join("pw");
    std::fs::write(&pw, "correct horse battery\n").unwrap();
    let out = run(Command::new(bin("vaultctl"))
        .args(["protector", "add"])
        .arg(&v.cipher)
        .arg("--key-file")
        .arg(&v.key)
        .arg("--new-passphrase-file")
        .arg(&pw)
        .args([
            "--label",
            "recovery",
            "--kdf-memory-kib",
            "8192",
            "--kdf-iterations",
            "1",
        ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = run(Command::new(bin("vaultctl"))
        .args(["protector", "list", "--json"])
        .arg(&v.cipher));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    let raw_id = list.iter().find(|p| p["type"] == "raw").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(list
        .iter()
        .any(|p| p["id"] == new_id.as_str() && p["label"] == "recovery"));
    // The passphrase mounts and reads the same data (no re-encryption happened).
    let out = run(Command::new(bin("vaultfs"))
        .arg("--passphrase-file")
        .arg(&pw)
        .arg(&v.cipher)
        .arg(&v.mnt));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    v.mounted = true;
    assert_eq!(std::fs::read(v.p("f")).unwrap(), b"data");
    v.unmount();
    // Remove the raw protector, authenticating with the passphrase; the key file stops working.
    let out = run(Command::new(bin("vaultctl"))
        .args(["protector", "remove"])
        .arg(&v.cipher)
        .args(["--id", &raw_id])
        .arg("--passphrase-file")
        .arg(&pw));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(Command::new(bin("vaultfs"))
        .arg("--key-file")
        .arg(&v.key)
        .arg(&v.cipher)
        .arg(&v.mnt));
    assert_eq!(out.status.code(), Some(12));
    // The last protector cannot be removed.
    let out = run(Command::new(bin("vaultctl"))
        .args(["protector", "remove"])
        .arg(&v.cipher)
        .args(["--id", &new_id])
        .arg("--passphrase-file")
        .arg(&pw));
    assert_eq!(out.status.code(), Some(25));
    // A wrong passphrase is refused.
    std::fs::write(&pw, "wrong\n").unwrap();
    let out = run(Command::new(bin("vaultfs"))
        .arg("--passphrase-file")
        .arg(&pw)
        .arg(&v.cipher)
        .arg(&v.mnt));
    assert_eq!(out.status.code(), Some(12));
    assert!(!mounted(&v.mnt));
}

#[test]
fn exit_codes_for_bad_paths_and_usage() {
    if !common::require_fuse() {
        return;
    }
    let v = Vault::create("aes-256-xts");
    let nowhere = v.tmp.path().join("nowhere");
    let out = run(Command::new(bin("vaultfs"))
        .arg("--key-file")
        .arg(&v.key)
        .arg(&v.cipher)
        .arg(&nowhere));
    assert_eq!(out.status.code(), Some(10));
    let out = run(Command::new(bin("vaultfs"))
        .arg("--key-file")
        .arg(&v.key)
        .arg(&nowhere)
        .arg(&v.mnt));
    assert_eq!(out.status.code(), Some(6));
    let out = run(Command::new(bin("vaultfs"))
        .arg("-o")
        .arg("bogus")
        .arg("--key-file")
        .arg(&v.key)
        .arg(&v.cipher)
        .arg(&v.mnt));
    assert_eq!(out.status.code(), Some(2));
    let out = run(Command::new(bin("vaultctl"))
        .arg("init")
        .arg("--key-file")
        .arg(&v.key)
        .arg(&v.cipher));
    assert_eq!(
        out.status.code(),
        Some(6),
        "init into a non-empty directory"
    );
    // No key given and stdin is not a terminal: a usage error, not a hang.
    let out = run(Command::new(bin("vaultfs")).arg(&v.cipher).arg(&v.mnt));
    assert_eq!(out.status.code(), Some(2));
    // A directory that is not a vault.
    let empty = v.tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = run(Command::new(bin("vaultfs"))
        .arg("--key-file")
        .arg(&v.key)
        .arg(&empty)
        .arg(&v.mnt));
    assert_eq!(out.status.code(), Some(23));
    assert!(!mounted(&v.mnt));
}

#[test]
fn sigterm_unmounts_cleanly_in_foreground_and_daemon_mode() {
    if !common::require_fuse() {
        return;
    }
    let mut v = Vault::create("aes-256-gcm");
    // Daemon mode: find the daemon and TERM it.
    v.mount();
    std::fs::write(v.p("kept"), b"persisted").unwrap();
    let pid = rustix::process::Pid::from_raw(common::vaultfs_pid_for(&v.mnt).expect("no daemon"))
        .unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    wait_gone(pid);
    assert!(!mounted(&v.mnt), "daemon exit left the mount behind");
    v.mounted = false;
    // Foreground mode: the process itself; it must exit 0 after SIGTERM and unmount.
    let mut child = Command::new(bin("vaultfs"))
        .arg("-f")
        .arg("--key-file")
        .arg(&v.key)
        .arg(&v.cipher)
        .arg(&v.mnt)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // -f has no readiness pipe: the mount appears in /proc/self/mounts once ready.
    let start = std::time::Instant::now();
    while !mounted(&v.mnt) {
        assert!(
            start.elapsed().as_secs() < 30,
            "foreground mount never appeared"
        );
        std::thread::yield_now();
    }
    assert_eq!(std::fs::read(v.p("kept")).unwrap(), b"persisted");
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(!mounted(&v.mnt));
}

fn wait_gone(pid: rustix::process::Pid) {
    let start = std::time::Instant::now();
    while std::path::Path::new(&format!("/proc/{}", pid.as_raw_nonzero())).exists() {
        // A zombie still has its /proc entry; the daemon's parent exited, so init reaps it.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero()))
            .unwrap_or_default();
        if stat.contains(") Z ") {
            break;
        }
        assert!(
            start.elapsed().as_secs() < 30,
            "daemon did not exit after SIGTERM"
        );
        std::thread::yield_now();
    }
}
