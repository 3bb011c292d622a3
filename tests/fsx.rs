#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The fsx file-system exerciser (crates.io `fsx`) on real mounts, fixed seeds, both suites.
mod common;

use common::{in_ci, run, Vault};
use std::path::PathBuf;
use std::process::Command;

const OPS: &str = "100000";

fn fsx_bin() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/fsx")),
        Some(PathBuf::from("/usr/local/bin/fsx")),
    ];
    if let Some(p) = candidates.into_iter().flatten().find(|p| p.exists()) {
        return Some(p);
    }
    if Command::new("fsx")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Some(PathBuf::from("fsx"));
    }
    assert!(
        !in_ci(),
        "fsx is not installed (cargo install fsx) and CI=true"
    );
    eprintln!("SKIP: fsx not installed (cargo install fsx)");
    None
}

const CONFIG: &str = r#"
flen = 1048576
[opsize]
max = 131072
[weights]
close_open = 2
read = 10
write = 10
mapread = 5
mapwrite = 5
invalidate = 1
truncate = 3
fsync = 1
fdatasync = 1
posix_fallocate = 1
punch_hole = 1
sendfile = 1
copy_file_range = 1
"#;

fn exercise(suite: &str, seed: &str) {
    if !common::require_fuse() {
        return;
    }
    let Some(fsx) = fsx_bin() else { return };
    let mut v = Vault::create(suite);
    v.mount();
    let cfg = v.tmp.path().join("fsx.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let artifacts = v.tmp.path().join("artifacts");
    std::fs::create_dir(&artifacts).unwrap();
    let out = run(Command::new(fsx)
        .args(["-q", "-N", OPS, "-S", seed, "-f"])
        .arg(&cfg)
        .arg("-P")
        .arg(&artifacts)
        .arg(v.p("fsx-file")));
    assert!(
        out.status.success(),
        "fsx failed on {suite} (seed {seed}):\n{}\n{}\nvaultfs log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        v.log_text()
    );
    // The file survives a remount intact (fsx leaves its final expected image in memory only, so
    // compare the size and that every byte still reads).
    let before = std::fs::read(v.p("fsx-file")).unwrap();
    v.remount();
    assert_eq!(std::fs::read(v.p("fsx-file")).unwrap(), before);
}

#[test]
fn fsx_aes_256_gcm() {
    exercise("aes-256-gcm", "20261130");
}

#[test]
fn fsx_aes_256_xts() {
    exercise("aes-256-xts", "7");
}
