#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Tampering with the ciphertext directory: with aes-256-gcm every case below reads as EIO (with
//! a log line naming the file and block), never as wrong plaintext; a tampered metadata file is
//! refused at mount. And nothing readable leaks into the ciphertext directory.
mod common;

use common::{bin, run, Vault};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const HDR: u64 = 18;
const DBS: u64 = 4096 + 28;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A GCM vault holding a (3 blocks) and b (3 blocks), unmounted; returns backing paths of a, b.
fn two_files() -> Option<(Vault, PathBuf, PathBuf)> {
    if !common::require_fuse() {
        return None;
    }
    let mut v = Vault::create("aes-256-gcm");
    v.mount();
    std::fs::write(v.p("a"), pattern(1, 3 * 4096)).unwrap();
    let a_ino = std::fs::metadata(v.p("a")).unwrap();
    std::fs::write(v.p("b"), pattern(2, 3 * 4096)).unwrap();
    v.unmount();
    let files: Vec<PathBuf> = v
        .backing_files()
        .into_iter()
        .filter(|p| {
            !p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vaultfs.")
        })
        .collect();
    assert_eq!(files.len(), 2);
    // Tell a from b by inode number (the mount reports backing inode numbers).
    use std::os::unix::fs::MetadataExt;
    let (a, b) = if std::fs::metadata(&files[0]).unwrap().ino() == a_ino.ino() {
        (files[0].clone(), files[1].clone())
    } else {
        (files[1].clone(), files[0].clone())
    };
    Some((v, a, b))
}

fn read_at(p: &Path, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(p)?;
    f.seek(SeekFrom::Start(off))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

fn disk_block(p: &Path, i: u64) -> Vec<u8> {
    let f = std::fs::File::open(p).unwrap();
    let mut b = vec![0u8; DBS as usize];
    f.read_exact_at(&mut b, HDR + i * DBS).unwrap();
    b
}

fn put_disk(p: &Path, off: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(data, off).unwrap();
}

fn assert_eio(r: std::io::Result<Vec<u8>>) {
    match r {
        Ok(_) => panic!("tampered data was returned instead of EIO"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
}

#[test]
fn flipped_bit_gives_eio_and_log_line() {
    let Some((mut v, a, _b)) = two_files() else {
        return;
    };
    let mut blk = disk_block(&a, 1);
    blk[500] ^= 0x01;
    put_disk(&a, HDR + DBS, &blk);
    v.mount();
    assert_eio(read_at(&v.p("a"), 4096, 10));
    // Untouched blocks of the same file still read.
    assert_eq!(
        read_at(&v.p("a"), 0, 4096).unwrap(),
        pattern(1, 3 * 4096)[..4096].to_vec()
    );
    assert_eq!(
        read_at(&v.p("a"), 8192, 4096).unwrap(),
        pattern(1, 3 * 4096)[8192..].to_vec()
    );
    let log = v.log_text();
    let name = a.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        log.lines()
            .any(|l| l.contains("block 1") && l.contains(&name)),
        "no log line naming file {name} and block 1 in:\n{log}"
    );
}

#[test]
fn block_moved_within_file_gives_eio() {
    let Some((mut v, a, _b)) = two_files() else {
        return;
    };
    let b0 = disk_block(&a, 0);
    put_disk(&a, HDR + 2 * DBS, &b0);
    v.mount();
    assert_eio(read_at(&v.p("a"), 2 * 4096, 4096));
    assert_eq!(read_at(&v.p("a"), 0, 4096).unwrap(), pattern(1, 4096));
}

#[test]
fn block_moved_between_files_gives_eio() {
    let Some((mut v, a, b)) = two_files() else {
        return;
    };
    let blk = disk_block(&a, 1);
    put_disk(&b, HDR + DBS, &blk);
    v.mount();
    assert_eio(read_at(&v.p("b"), 4096, 4096));
    assert_eq!(
        read_at(&v.p("a"), 4096, 4096).unwrap(),
        pattern(1, 3 * 4096)[4096..8192].to_vec()
    );
}

#[test]
fn swapped_headers_give_eio() {
    let Some((mut v, a, b)) = two_files() else {
        return;
    };
    let ha = read_at(&a, 0, HDR as usize).unwrap();
    let hb = read_at(&b, 0, HDR as usize).unwrap();
    put_disk(&a, 0, &hb);
    put_disk(&b, 0, &ha);
    v.mount();
    assert_eio(read_at(&v.p("a"), 0, 100));
    assert_eio(read_at(&v.p("b"), 0, 100));
}

#[test]
fn truncated_inside_block_gives_eio() {
    let Some((mut v, a, _b)) = two_files() else {
        return;
    };
    // Keep block 0 whole and 100 bytes of block 1.
    let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
    f.set_len(HDR + DBS + 100).unwrap();
    v.mount();
    assert_eq!(read_at(&v.p("a"), 0, 4096).unwrap(), pattern(1, 4096));
    let mut f = std::fs::File::open(v.p("a")).unwrap();
    let mut all = Vec::new();
    let r = f.read_to_end(&mut all);
    assert_eq!(r.map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)));
}

#[test]
fn tampered_metadata_is_refused() {
    let Some((v, _a, _b)) = two_files() else {
        return;
    };
    let conf = v.cipher.join("vaultfs.conf");
    let orig = std::fs::read_to_string(&conf).unwrap();
    let mount = |v: &Vault| {
        run(Command::new(bin("vaultfs"))
            .arg("--key-file")
            .arg(&v.key)
            .arg(&v.cipher)
            .arg(&v.mnt))
    };
    // A changed cipher suite: the metadata MAC fails.
    std::fs::write(&conf, orig.replace("aes-256-gcm", "aes-256-xts")).unwrap();
    let out = mount(&v);
    assert_eq!(
        out.status.code(),
        Some(24),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("authentication"));
    // A removed feature flag.
    std::fs::write(&conf, orig.replace("\"long-names\",", "")).unwrap();
    let out = mount(&v);
    assert_eq!(
        out.status.code(),
        Some(23),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An unknown feature flag.
    std::fs::write(
        &conf,
        orig.replace("\"long-names\",", "\"long-names\", \"future\","),
    )
    .unwrap();
    let out = mount(&v);
    assert_eq!(out.status.code(), Some(23));
    assert!(String::from_utf8_lossy(&out.stderr).contains("future"));
    // A newer version.
    std::fs::write(&conf, orig.replace("\"version\": 1", "\"version\": 2")).unwrap();
    assert_eq!(mount(&v).status.code(), Some(23));
    // Truncated.
    std::fs::write(&conf, &orig[..orig.len() / 3]).unwrap();
    assert_eq!(mount(&v).status.code(), Some(23));
    // Nothing got mounted by any of these, and the original still works.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(v.mnt.to_str().unwrap()));
    std::fs::write(&conf, &orig).unwrap();
    let out = mount(&v);
    assert!(out.status.success());
    let data = std::fs::read(v.p("a"));
    let _ = run(Command::new("fusermount3").arg("-u").arg(&v.mnt));
    assert_eq!(data.unwrap(), pattern(1, 3 * 4096));
}

#[test]
fn wrong_key_is_refused_and_writes_nothing() {
    if !common::require_fuse() {
        return;
    }
    let v = Vault::create("aes-256-gcm");
    let before = std::fs::read(v.cipher.join("vaultfs.conf")).unwrap();
    let bad = v.tmp.path().join("bad");
    std::fs::write(&bad, [9u8; 32]).unwrap();
    let out = run(Command::new(bin("vaultfs"))
        .arg("--key-file")
        .arg(&bad)
        .arg(&v.cipher)
        .arg(&v.mnt));
    assert_eq!(out.status.code(), Some(12));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong key"));
    std::fs::write(&bad, [9u8; 31]).unwrap();
    let out = run(Command::new(bin("vaultfs"))
        .arg("--key-file")
        .arg(&bad)
        .arg(&v.cipher)
        .arg(&v.mnt));
    assert_eq!(out.status.code(), Some(13));
    assert_eq!(
        std::fs::read(v.cipher.join("vaultfs.conf")).unwrap(),
        before
    );
    assert_eq!(
        v.backing_files().len(),
        2,
        "only vaultfs.conf and vaultfs.diriv"
    );
}

/// Markers written through the mount must not appear in any backing file name, content,
/// symlink target or xattr.
#[test]
fn ciphertext_reveals_no_plaintext() {
    if !common::require_fuse() {
        return;
    }
    for suite in ["aes-256-gcm", "aes-256-xts"] {
        let mut v = Vault::create(suite);
        v.mount();
        let marker = "SECRETMARKERxyzzy";
        std::fs::create_dir(v.p(&format!("dir-{marker}"))).unwrap();
        std::fs::write(
            v.p(&format!("dir-{marker}/file-{marker}")),
            marker.repeat(1000),
        )
        .unwrap();
        std::fs::write(v.p("tiny"), "SECRETMAR").unwrap();
        std::os::unix::fs::symlink(format!("/target/{marker}"), v.p("link")).unwrap();
        let long = format!("{}{marker}", "n".repeat(200));
        std::fs::write(v.p(&long), marker).unwrap();
        rustix::fs::setxattr(
            v.p("tiny").as_path(),
            format!("user.{marker}").as_str(),
            marker.as_bytes(),
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        v.unmount();
        let needles = [marker.as_bytes(), b"SECRETMAR"];
        let mut checked = 0;
        fn walk(d: &Path, f: &mut dyn FnMut(&Path)) {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                f(&p);
                if p.symlink_metadata().unwrap().is_dir() {
                    walk(&p, f);
                }
            }
        }
        walk(&v.cipher, &mut |p: &Path| {
            checked += 1;
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            assert!(
                !name.contains("SECRET") && !name.contains('n'.to_string().repeat(20).as_str()),
                "{name}"
            );
            let md = p.symlink_metadata().unwrap();
            let mut blobs: Vec<Vec<u8>> = Vec::new();
            if md.file_type().is_symlink() {
                blobs.push(
                    std::fs::read_link(p)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                );
            } else if md.is_file() {
                blobs.push(std::fs::read(p).unwrap());
            }
            let out = Command::new("getfattr")
                .args(["-d", "-m", "-", "--absolute-names"])
                .arg(p)
                .output();
            if let Ok(o) = out {
                blobs.push(o.stdout);
            }
            for b in &blobs {
                for n in needles {
                    assert!(
                        !b.windows(n.len()).any(|w| w == n),
                        "{suite}: plaintext in {}",
                        p.display()
                    );
                }
            }
        });
        assert!(checked >= 6, "walked {checked} entries");
    }
}
