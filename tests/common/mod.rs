//! Shared test harness: real binaries, real FUSE mounts. A test whose prerequisite is missing
//! fails under CI=true and skips (saying why) on a developer machine.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of a binary built by `cargo build --workspace --bins` (same profile as the tests).
pub fn bin(name: &str) -> PathBuf {
    let mut p = std::env::current_exe().expect("current_exe");
    p.pop(); // deps/
    if p.ends_with("deps") {
        p.pop();
    }
    let b = p.join(name);
    assert!(
        b.exists(),
        "{} not built: run `cargo build --workspace --bins` first",
        b.display()
    );
    b
}

pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Returns false (test should return early) when FUSE is unusable outside CI; panics in CI.
pub fn require_fuse() -> bool {
    let ok = Path::new("/dev/fuse").exists()
        && Command::new("fusermount3")
            .arg("-V")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    if !ok {
        if in_ci() {
            panic!("FUSE prerequisite missing (/dev/fuse or fusermount3) and CI=true");
        }
        eprintln!("SKIP: /dev/fuse or fusermount3 missing");
    }
    ok
}

/// Which FUSE transport the mounts of this test run use: `VAULTFS_TEST_TRANSPORT=devfuse`
/// mounts with `-o nouring` (the /dev/fuse path, what kernels without FUSE over io_uring get);
/// anything else leaves vaultfs's default (io_uring when the kernel offers it).
pub fn devfuse_only() -> bool {
    std::env::var("VAULTFS_TEST_TRANSPORT").is_ok_and(|v| v == "devfuse")
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(std::process::Stdio::null())
        .output()
        .expect("spawn")
}

/// A vault in a temporary directory, with its key file, mount point and log file.
pub struct Vault {
    pub tmp: tempfile::TempDir,
    pub cipher: PathBuf,
    pub mnt: PathBuf,
    pub key: PathBuf,
    pub log: PathBuf,
    pub mounted: bool,
}

impl Vault {
    /// `suite` is "aes-256-gcm" or "aes-256-xts".
    pub fn create(suite: &str) -> Vault {
        let tmp = tempfile::Builder::new()
            .prefix("vaultfs-test")
            .tempdir_in(test_root())
            .expect("tempdir");
        let cipher = tmp.path().join("cipher");
        let mnt = tmp.path().join("mnt");
        let key = tmp.path().join("key");
        let log = tmp.path().join("vaultfs.log");
        std::fs::create_dir(&cipher).unwrap();
        std::fs::create_dir(&mnt).unwrap();
        let mut k = [0u8; 32];
        getrandom(&mut k);
        std::fs::write(&key, k).unwrap();
        let out = run(Command::new(bin("vaultctl"))
            .args(["init", "--cipher", suite, "--key-file"])
            .arg(&key)
            .arg(&cipher));
        assert!(
            out.status.success(),
            "vaultctl init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Vault {
            tmp,
            cipher,
            mnt,
            key,
            log,
            mounted: false,
        }
    }

    /// Mounts (vaultfs returns once the mount is ready) with extra `-o` options.
    pub fn mount_with(&mut self, opts: &[&str]) {
        self.mount_under(&[], opts);
    }

    /// [`Vault::mount_with`], with vaultfs started by the command `wrapper` (e.g. `prlimit`
    /// with its arguments; empty: directly).
    pub fn mount_under(&mut self, wrapper: &[&str], opts: &[&str]) {
        let mut c = match wrapper.split_first() {
            Some((cmd, args)) => {
                let mut c = Command::new(cmd);
                c.args(args).arg(bin("vaultfs"));
                c
            }
            None => Command::new(bin("vaultfs")),
        };
        c.arg("--key-file")
            .arg(&self.key)
            .arg("--log-file")
            .arg(&self.log);
        for o in opts {
            c.args(["-o", o]);
        }
        if devfuse_only() {
            c.args(["-o", "nouring"]);
        }
        c.arg(&self.cipher).arg(&self.mnt);
        let out = run(&mut c);
        assert!(
            out.status.success(),
            "vaultfs mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounted = true;
    }

    pub fn mount(&mut self) {
        self.mount_with(&[]);
    }

    pub fn unmount(&mut self) {
        if self.mounted {
            let out = run(Command::new("fusermount3").arg("-u").arg(&self.mnt));
            assert!(
                out.status.success(),
                "fusermount3 -u: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            self.mounted = false;
        }
    }

    pub fn remount(&mut self) {
        self.unmount();
        self.mount();
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every backing file under the cipher directory (recursively), excluding directories.
    pub fn backing_files(&self) -> Vec<PathBuf> {
        fn walk(d: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.symlink_metadata().unwrap().is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
        let mut v = Vec::new();
        walk(&self.cipher, &mut v);
        v
    }
}

impl Drop for Vault {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.mnt)
                .output();
        }
    }
}

/// Where test vaults live: $VAULTFS_TEST_DIR or the system temp dir.
pub fn test_root() -> PathBuf {
    std::env::var_os("VAULTFS_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

pub fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(buf)
        .unwrap();
}

/// PID of the vaultfs process serving `mnt` (its command line names the mount point).
pub fn vaultfs_pid_for(mnt: &Path) -> Option<i32> {
    let m = mnt.to_str()?.as_bytes();
    for e in std::fs::read_dir("/proc").ok()? {
        let e = e.ok()?;
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.first().is_some_and(|a| a.ends_with(b"/vaultfs")) && args.contains(&m) {
            return Some(pid);
        }
    }
    None
}
