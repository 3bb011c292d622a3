#![allow(clippy::unwrap_used, clippy::expect_used)]
//! kill -9 of vaultfs in the middle of writes, then remount: other files and the directory tree
//! read back intact, and the synced part of the file being written too.
mod common;

use common::{run, Vault};
use std::io::Write;
use std::process::Command;

fn content(i: usize) -> Vec<u8> {
    (0..(i * 977 + 10)).map(|j| (j * 7 + i) as u8).collect()
}

#[test]
fn kill_9_mid_write_then_remount() {
    if !common::require_fuse() {
        return;
    }
    for suite in ["aes-256-gcm", "aes-256-xts"] {
        let mut v = Vault::create(suite);
        v.mount();
        // A tree of synced files.
        for d in 0..5 {
            std::fs::create_dir(v.p(&format!("d{d}"))).unwrap();
            for f in 0..10 {
                let i = d * 10 + f;
                let mut fh = std::fs::File::create(v.p(&format!("d{d}/f{i}"))).unwrap();
                fh.write_all(&content(i)).unwrap();
                fh.sync_all().unwrap();
            }
        }
        // A file with a synced 4 MiB prefix, then a writer that keeps going.
        let prefix: Vec<u8> = (0..4 << 20).map(|j: u32| (j % 251) as u8).collect();
        let mut big = std::fs::File::create(v.p("big")).unwrap();
        big.write_all(&prefix).unwrap();
        big.sync_all().unwrap();
        drop(big);
        let big_path = v.p("big");
        let writer = std::thread::spawn(move || {
            let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&big_path) else {
                return 0u64;
            };
            let chunk = vec![0xeeu8; 128 * 1024];
            let mut n = 0u64;
            // Ends when the daemon dies (ENOTCONN) or after a bounded amount.
            while n < (2u64 << 30) && f.write_all(&chunk).is_ok() {
                n += chunk.len() as u64;
            }
            n
        });
        // Kill once the writer has demonstrably written past the prefix.
        let pid = common::vaultfs_pid_for(&v.mnt).expect("no vaultfs serving the mount");
        loop {
            let grown = v.backing_files().iter().any(|p| {
                std::fs::metadata(p)
                    .map(|m| m.len() > (5 << 20))
                    .unwrap_or(false)
            });
            if grown {
                break;
            }
            std::thread::yield_now();
        }
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        let _ = writer.join();
        // The dead mount must be cleaned up before remounting.
        let _ = run(Command::new("fusermount3").arg("-uz").arg(&v.mnt));
        v.mounted = false;
        v.mount();
        for d in 0..5 {
            let mut names: Vec<String> = std::fs::read_dir(v.p(&format!("d{d}")))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            assert_eq!(names.len(), 10, "{suite}: d{d} lists {names:?}");
            for f in 0..10 {
                let i = d * 10 + f;
                assert_eq!(
                    std::fs::read(v.p(&format!("d{d}/f{i}"))).unwrap(),
                    content(i),
                    "{suite}: f{i}"
                );
            }
        }
        let mut f = std::fs::File::open(v.p("big")).unwrap();
        let mut head = vec![0u8; prefix.len()];
        std::io::Read::read_exact(&mut f, &mut head).unwrap();
        assert!(
            head == prefix,
            "{suite}: the synced prefix of the file being written changed"
        );
        drop(f);
        v.unmount();
    }
}
