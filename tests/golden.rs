#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Golden vaults of format v1 (made once by tests/golden/make.sh and committed): every later
//! build must keep mounting and reading them.
mod common;

use common::{run, Vault};
use std::path::Path;
use std::process::Command;

fn copy_tree(from: &Path, to: &Path) {
    let out = run(Command::new("cp").arg("-a").arg(from).arg(to));
    assert!(out.status.success());
}

fn check(suite: &str) {
    if !common::require_fuse() {
        return;
    }
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    // Reuse the harness for the temp dir and mount logic, with the golden tree and key.
    let mut v = Vault::create("aes-256-gcm");
    std::fs::remove_dir_all(&v.cipher).unwrap();
    copy_tree(&golden.join(format!("v1-{suite}")), &v.cipher);
    std::fs::copy(golden.join("key"), &v.key).unwrap();
    v.mount();
    assert_eq!(
        std::fs::read(v.p("hello.txt")).unwrap(),
        b"hello golden vault\n"
    );
    assert_eq!(std::fs::read(v.p("empty")).unwrap(), b"");
    assert_eq!(std::fs::read(v.p("tiny")).unwrap(), b"tiny5");
    let deep: Vec<u8> = (0..10000u32).map(|i| ((i * 7 + 3) % 256) as u8).collect();
    assert_eq!(std::fs::read(v.p("dir/nested/deep.bin")).unwrap(), deep);
    let mut sparse = vec![0u8; 20000];
    sparse.extend_from_slice(b"end");
    assert_eq!(std::fs::read(v.p("sparse")).unwrap(), sparse);
    assert!(v.p(&"L".repeat(200)).exists());
    assert_eq!(
        std::fs::read_link(v.p("link")).unwrap(),
        Path::new("dir/nested/deep.bin")
    );
    assert_eq!(std::fs::read(v.p("link")).unwrap(), deep);
    let mut names: Vec<String> = std::fs::read_dir(&v.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want = vec![
        "L".repeat(200),
        "dir".into(),
        "empty".into(),
        "hello.txt".into(),
        "link".into(),
        "sparse".into(),
        "tiny".into(),
    ];
    want.sort();
    assert_eq!(names, want);
    // Still writable with this build.
    std::fs::write(v.p("dir/new"), b"x").unwrap();
    v.remount();
    assert_eq!(std::fs::read(v.p("dir/new")).unwrap(), b"x");
}

#[test]
fn golden_v1_aes_256_gcm() {
    check("gcm");
}

#[test]
fn golden_v1_aes_256_xts() {
    check("xts");
}
