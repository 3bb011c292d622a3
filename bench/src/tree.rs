//! The source tree of the untar workloads: a deterministic, uncompressed tarball of the first
//! N regular files (by sorted path, each at most 1 MiB) of a tree every Debian build machine
//! has: /usr/include (C headers), then the cargo registry sources, then /usr/share/doc. It is
//! made once per size and kept in the work directory.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::util::run;

const MAX_FILE: u64 = 1 << 20;

/// What the tarball holds; saved next to it as JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TreeInfo {
    pub tarball: PathBuf,
    pub sources: Vec<PathBuf>,
    pub files: usize,
    pub dirs: usize,
    pub bytes: u64,
}

fn default_sources() -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from("/usr/include")];
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(c) = cargo_home {
        v.push(c.join("registry").join("src"));
    }
    v.push(PathBuf::from("/usr/share/doc"));
    v
}

/// Returns the tarball of `files` files in `work`, making it if needed.
pub fn ensure_tarball(work: &Path, files: usize, source: Option<&Path>) -> Result<TreeInfo> {
    let tarball = work.join(format!("tree-{files}.tar"));
    let meta = work.join(format!("tree-{files}.json"));
    if tarball.exists() {
        if let Ok(info) = fs::read(&meta)
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(serde_json::from_slice::<TreeInfo>(&b)?))
        {
            if source.is_none_or(|s| info.sources.first().map(PathBuf::as_path) == Some(s)) {
                return Ok(info);
            }
        }
    }
    let sources = match source {
        Some(s) => vec![s.to_path_buf()],
        None => default_sources(),
    };
    let mut chosen = Vec::new();
    let mut used = Vec::new();
    let mut bytes = 0u64;
    for src in &sources {
        if chosen.len() >= files {
            break;
        }
        if !src.is_dir() {
            continue;
        }
        let before = chosen.len();
        walk(src, files, &mut chosen, &mut bytes)?;
        if chosen.len() > before {
            used.push(src.clone());
        }
    }
    if chosen.len() < files {
        bail!(
            "found only {} regular files of at most 1 MiB in {:?}; need {files} (use --tree-source)",
            chosen.len(),
            sources
        );
    }
    // Entries relative to /, directories before their contents.
    let mut entries = BTreeSet::new();
    for f in &chosen {
        let rel = f.strip_prefix("/").unwrap_or(f).to_path_buf();
        let mut p = rel.parent();
        while let Some(d) = p {
            if d.as_os_str().is_empty() {
                break;
            }
            entries.insert(d.to_path_buf());
            p = d.parent();
        }
        entries.insert(rel);
    }
    let dirs = entries.len() - chosen.len();
    let list = work.join(format!("tree-{files}.list"));
    let mut buf = Vec::new();
    for e in &entries {
        buf.extend_from_slice(e.as_os_str().as_encoded_bytes());
        buf.push(0);
    }
    fs::File::create(&list)
        .and_then(|mut f| f.write_all(&buf))
        .with_context(|| format!("writing {}", list.display()))?;
    let tmp = work.join(format!("tree-{files}.tar.tmp"));
    run(Command::new("tar")
        .args([
            "--create",
            "--format=gnu",
            "--no-recursion",
            "--null",
            "--sort=name",
            "--mtime=@1700000000",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mode=u+rw,go+r",
            "-C",
            "/",
            "--file",
        ])
        .arg(&tmp)
        .arg("--files-from")
        .arg(&list))?;
    fs::rename(&tmp, &tarball).context("renaming the tarball")?;
    fs::remove_file(&list).ok();
    let info = TreeInfo {
        tarball,
        sources: used,
        files: chosen.len(),
        dirs,
        bytes,
    };
    fs::write(&meta, serde_json::to_vec_pretty(&info)?)
        .with_context(|| format!("writing {}", meta.display()))?;
    Ok(info)
}

/// Depth-first walk in sorted order, regular files only (no symlinks), until `cap` files.
fn walk(dir: &Path, cap: usize, out: &mut Vec<PathBuf>, bytes: &mut u64) -> Result<()> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(()); // unreadable directories are skipped
    };
    let mut entries: Vec<_> = rd.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if out.len() >= cap {
            return Ok(());
        }
        let Ok(ft) = e.file_type() else { continue };
        let path = e.path();
        if ft.is_dir() {
            walk(&path, cap, out, bytes)?;
        } else if ft.is_file() {
            let Ok(md) = e.metadata() else { continue };
            if md.len() <= MAX_FILE && fs::File::open(&path).is_ok() {
                *bytes += md.len();
                out.push(path);
            }
        }
    }
    Ok(())
}
