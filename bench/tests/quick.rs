//! Runs `vaultfs-bench --quick --strict` on plain and vaultfs-gcm and checks that the JSON has a
//! positive median for every workload of both systems (mount-time of plain is "not
//! applicable"). Needs FUSE, root (to drop caches) and the vaultfs binaries
//! (`cargo build --workspace --bins`). A missing prerequisite
//! fails the test under CI=true, and skips it, saying why, on a developer machine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const WORKLOADS: [&str; 10] = [
    "mount-time",
    "seq-write",
    "seq-read",
    "rand-read",
    "rand-write",
    "untar",
    "ls-lR",
    "stat-all",
    "rm-rf",
    "create-delete",
];
const SYSTEMS: [&str; 2] = ["plain", "vaultfs-gcm"];

fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Why the test cannot run here, if it cannot.
fn missing_prerequisite(bin_dir: &Path) -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse missing".into());
    }
    let fusermount = Command::new("fusermount3")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !fusermount {
        return Some("fusermount3 missing".into());
    }
    // The harness runs with --strict, which needs to drop caches.
    if std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/sys/vm/drop_caches")
        .is_err()
    {
        return Some("cannot write /proc/sys/vm/drop_caches (not root)".into());
    }
    for b in ["vaultfs", "vaultctl"] {
        if !bin_dir.join(b).exists() {
            return Some(format!(
                "{} not built: run `cargo build --workspace --bins` first",
                bin_dir.join(b).display()
            ));
        }
    }
    None
}

#[test]
fn quick_run_reports_every_workload_of_plain_and_vaultfs_gcm() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_vaultfs-bench"));
    let bin_dir = bench.parent().unwrap().to_path_buf();
    if let Some(why) = missing_prerequisite(&bin_dir) {
        if in_ci() {
            panic!("prerequisite missing and CI=true: {why}");
        }
        eprintln!("SKIP: {why}");
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("vaultfs-bench-test")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    let json = tmp.path().join("results.json");
    let svg = tmp.path().join("results.svg");
    let out = Command::new(&bench)
        .args(["--quick", "--strict", "--systems", "plain,vaultfs-gcm"])
        .arg("--dir")
        .arg(tmp.path().join("work"))
        .arg("--json")
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .stdin(Stdio::null())
        .output()
        .expect("running vaultfs-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "vaultfs-bench failed ({}):\n{stderr}",
        out.status
    );

    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["errors"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(v["interrupted"], false);
    let results = v["results"].as_array().unwrap();
    let not_applicable = v["not_applicable"].as_array().unwrap();
    for s in SYSTEMS {
        for w in WORKLOADS {
            let row = results
                .iter()
                .find(|r| r["system"] == s && r["workload"] == w);
            if s == "plain" && w == "mount-time" {
                assert!(row.is_none(), "plain has no mount step: {row:?}");
                assert!(not_applicable
                    .iter()
                    .any(|p| p["system"] == s && p["workload"] == w));
                continue;
            }
            let row = row.unwrap_or_else(|| panic!("no result for {s} {w}:\n{stderr}"));
            let median = row["median"].as_f64().unwrap();
            assert!(
                median.is_finite() && median > 0.0,
                "{s} {w}: median {median}"
            );
            assert!(row["values"].as_array().unwrap().len() == 1);
        }
    }
    // The vaultfs daemon's memory was sampled during seq-write.
    let mem = v["memory"].as_array().unwrap();
    assert!(
        mem.iter()
            .any(|m| m["system"] == "vaultfs-gcm" && m["max_rss_mib"].as_f64().unwrap() > 0.0),
        "{mem:?}"
    );
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.contains("vaultfs-gcm"));
    // Nothing is left mounted under the work directory.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(tmp.path().to_str().unwrap()),
        "{mountinfo}"
    );
}
