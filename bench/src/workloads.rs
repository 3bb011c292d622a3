//! The workloads. Each one first creates its input if an earlier workload has not (untimed),
//! then syncs and drops the caches, then runs timed. Data is written from a fixed-seed
//! pseudo-random pattern, random offsets come from a fixed seed, so every system and every
//! repetition does exactly the same operations.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{Sizes, Workload, MIB, RAND_BLOCK};
use crate::progress::Progress;
use crate::systems::Instance;
use crate::tree::TreeInfo;
use crate::util::{self, Interrupt, SplitMix64};

const SEED_PATTERN: u64 = 0x7661_756c_7466_7300;
const SEED_RAND_READ: u64 = 0x7661_756c_7466_7301;
const SEED_RAND_WRITE: u64 = 0x7661_756c_7466_7302;

/// What the workloads share.
pub struct Ctx<'a> {
    pub sizes: &'a Sizes,
    pub tree: Option<&'a TreeInfo>,
    pub interrupt: &'a Interrupt,
    pub progress: &'a Progress,
    /// Whether caches can be dropped (root); otherwise "cold" workloads run warm.
    pub can_drop_caches: bool,
    pattern: Vec<u8>,
}

impl<'a> Ctx<'a> {
    pub fn new(
        sizes: &'a Sizes,
        tree: Option<&'a TreeInfo>,
        interrupt: &'a Interrupt,
        progress: &'a Progress,
        can_drop_caches: bool,
    ) -> Ctx<'a> {
        let mut rng = SplitMix64::new(SEED_PATTERN);
        let mut pattern = vec![0u8; sizes.seq_request.max(RAND_BLOCK)];
        for chunk in pattern.chunks_mut(8) {
            let v = rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        Ctx {
            sizes,
            tree,
            interrupt,
            progress,
            can_drop_caches,
            pattern,
        }
    }

    fn cold(&self) {
        if self.can_drop_caches {
            util::sync_and_drop_caches();
        } else {
            rustix::fs::sync();
        }
    }
}

/// Resident memory of a FUSE daemon during seq-write.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemStats {
    pub pid: u32,
    /// Largest VmRSS sampled (every 50 ms), MiB.
    pub max_rss_mib: f64,
    /// VmHWM at the end (peak RSS over the daemon's life), MiB.
    pub hwm_mib: f64,
    /// (MiB written so far, VmRSS MiB), at most 64 points: is the RSS flat as the file grows?
    pub samples: Vec<[f64; 2]>,
}

/// The result of one workload on one system in one repetition.
pub struct Measurement {
    /// MB/s, IOPS or seconds (see `Workload::unit`).
    pub value: f64,
    pub memory: Option<MemStats>,
}

/// Runs `w` on `inst`. `Ok(None)`: the workload does not apply to this system (mount-time of
/// a system without a mount step).
pub fn run(w: Workload, inst: &Instance, ctx: &Ctx) -> Result<Option<Measurement>> {
    ctx.interrupt.check()?;
    let d = &inst.data;
    if inst.direct && !matches!(w, Workload::SeqWrite | Workload::SeqRead) {
        return Ok(None);
    }
    let direct = inst.direct;
    let value = match w {
        Workload::MountTime => match inst.mount_time {
            Some(t) => t.as_secs_f64(),
            None => return Ok(None),
        },
        Workload::SeqWrite => {
            let path = d.join("seq.bin");
            ctx.cold();
            let written = Arc::new(AtomicU64::new(0));
            let sampler = inst
                .daemon
                .map(|pid| MemSampler::start(pid, Arc::clone(&written)));
            let t = seq_write(&path, ctx.sizes.seq_bytes, ctx, &written, direct);
            let memory = sampler.map(MemSampler::finish);
            let t = t?;
            return Ok(Some(Measurement {
                value: mb_per_s(ctx.sizes.seq_bytes, t),
                memory,
            }));
        }
        Workload::SeqRead => {
            let path = d.join("seq.bin");
            if file_len(&path) != Some(ctx.sizes.seq_bytes) {
                seq_write(&path, ctx.sizes.seq_bytes, ctx, &AtomicU64::new(0), direct)?;
            }
            ctx.cold();
            let t = seq_read(&path, ctx, direct)?;
            fs::remove_file(&path).ok();
            mb_per_s(ctx.sizes.seq_bytes, t)
        }
        Workload::RandRead | Workload::RandWrite => {
            let path = d.join("rand.bin");
            if file_len(&path) != Some(ctx.sizes.rand_file_bytes) {
                seq_write(
                    &path,
                    ctx.sizes.rand_file_bytes,
                    ctx,
                    &AtomicU64::new(0),
                    false,
                )?;
            }
            ctx.cold();
            let t = rand_io(&path, w == Workload::RandWrite, ctx)?;
            ctx.sizes.rand_ops as f64 / t.as_secs_f64()
        }
        Workload::Untar => {
            let tree = d.join("tree");
            if tree.exists() {
                fs::remove_dir_all(&tree).context("removing the old tree")?;
            }
            ctx.cold();
            warm_tarball(ctx)?;
            untar(&tree, ctx)?.as_secs_f64()
        }
        Workload::LsLr => {
            let tree = ensure_tree(d, ctx)?;
            ctx.cold();
            ctx.progress.sub_start("ls -lR", 1);
            let mut cmd = Command::new("ls");
            cmd.arg("-lR").arg(&tree).env("LC_ALL", "C");
            timed_command(&mut cmd)?.as_secs_f64()
        }
        Workload::StatAll => {
            let tree = ensure_tree(d, ctx)?;
            ctx.cold();
            ctx.progress.sub_start("stat every file", 1);
            let t0 = Instant::now();
            let n = stat_all(&tree)?;
            let t = t0.elapsed();
            if let Some(info) = ctx.tree {
                ensure!(
                    n >= info.files,
                    "stat-all saw {n} entries, fewer than {}",
                    info.files
                );
            }
            t.as_secs_f64()
        }
        Workload::RmRf => {
            let tree = ensure_tree(d, ctx)?;
            ctx.cold();
            ctx.progress.sub_start("rm -rf", 1);
            let t = timed_command(Command::new("rm").arg("-rf").arg(&tree))?;
            ensure!(!tree.exists(), "rm -rf left {}", tree.display());
            t.as_secs_f64()
        }
        Workload::CreateDelete => {
            let dir = d.join("create-delete");
            fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            ctx.cold();
            let t = create_delete(&dir, ctx)?;
            fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
            t.as_secs_f64()
        }
    };
    Ok(Some(Measurement {
        value,
        memory: None,
    }))
}

fn mb_per_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / 1e6 / t.as_secs_f64()
}

/// A page-aligned buffer, as `O_DIRECT` needs: a slice of an over-allocated vector.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    const ALIGN: usize = 4096;

    fn zeroed(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + Self::ALIGN];
        let start = storage.as_ptr().align_offset(Self::ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    fn copy_of(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

fn file_len(p: &Path) -> Option<u64> {
    fs::metadata(p).ok().map(|m| m.len())
}

/// Writes `size` bytes in `seq_request` requests, then fsync and close; all timed. `direct`:
/// with `O_DIRECT` from a page-aligned copy of the pattern.
fn seq_write(
    path: &Path,
    size: u64,
    ctx: &Ctx,
    written: &AtomicU64,
    direct: bool,
) -> Result<Duration> {
    let req = ctx.sizes.seq_request as u64;
    let aligned = direct.then(|| AlignedBuf::copy_of(&ctx.pattern[..req as usize]));
    let pattern: &[u8] = aligned.as_ref().map_or(&ctx.pattern, |b| b.as_slice());
    ctx.progress.sub_start("write", size / MIB);
    let t0 = Instant::now();
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let mut done = 0u64;
    while done < size {
        let n = req.min(size - done) as usize;
        f.write_all(&pattern[..n])
            .with_context(|| format!("writing {} at {done}", path.display()))?;
        done += n as u64;
        written.store(done, Ordering::Relaxed);
        if done % (16 * MIB) < req {
            ctx.interrupt.check()?;
            ctx.progress.sub_set(done / MIB);
        }
    }
    f.sync_all()
        .with_context(|| format!("fsync {}", path.display()))?;
    drop(f);
    Ok(t0.elapsed())
}

/// Reads the whole file in `seq_request` requests (with `O_DIRECT` if `direct`); checks the
/// length.
fn seq_read(path: &Path, ctx: &Ctx, direct: bool) -> Result<Duration> {
    let size = ctx.sizes.seq_bytes;
    let mut buf = AlignedBuf::zeroed(ctx.sizes.seq_request);
    ctx.progress.sub_start("read", size / MIB);
    let t0 = Instant::now();
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut done = 0u64;
    loop {
        let n = f
            .read(buf.as_mut_slice())
            .with_context(|| format!("reading {} at {done}", path.display()))?;
        if n == 0 {
            break;
        }
        done += n as u64;
        if done % (16 * MIB) < n as u64 {
            ctx.interrupt.check()?;
            ctx.progress.sub_set(done / MIB);
        }
    }
    drop(f);
    let t = t0.elapsed();
    ensure!(done == size, "read {done} bytes of {size}");
    Ok(t)
}

/// `rand_ops` 4 KiB preads or pwrites at fixed-seed, 4 KiB-aligned offsets (POSIX_FADV_RANDOM,
/// as fio does); writes end with an fsync, which is timed.
fn rand_io(path: &Path, write: bool, ctx: &Ctx) -> Result<Duration> {
    let blocks = ctx.sizes.rand_file_bytes / RAND_BLOCK as u64;
    ensure!(blocks > 0, "random-I/O file smaller than one block");
    let mut rng = SplitMix64::new(if write {
        SEED_RAND_WRITE
    } else {
        SEED_RAND_READ
    });
    let offsets: Vec<u64> = (0..ctx.sizes.rand_ops)
        .map(|_| rng.next_u64() % blocks * RAND_BLOCK as u64)
        .collect();
    let mut buf = vec![0u8; RAND_BLOCK];
    ctx.progress.sub_start(
        if write { "random write" } else { "random read" },
        offsets.len() as u64,
    );
    let t0 = Instant::now();
    let f = OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::Random)
        .with_context(|| format!("fadvise {}", path.display()))?;
    for (i, &off) in offsets.iter().enumerate() {
        if write {
            let p = (i * RAND_BLOCK) % (ctx.pattern.len() - RAND_BLOCK + 1);
            f.write_all_at(&ctx.pattern[p..p + RAND_BLOCK], off)
        } else {
            f.read_exact_at(&mut buf, off)
        }
        .with_context(|| format!("{} at {off}", path.display()))?;
        if i % 1024 == 0 {
            ctx.interrupt.check()?;
            ctx.progress.sub_set(i as u64);
        }
    }
    if write {
        f.sync_all()
            .with_context(|| format!("fsync {}", path.display()))?;
    }
    drop(f);
    Ok(t0.elapsed())
}

fn untar(tree: &Path, ctx: &Ctx) -> Result<Duration> {
    let Some(info) = ctx.tree else {
        bail!("no source tree tarball");
    };
    fs::create_dir(tree).with_context(|| format!("creating {}", tree.display()))?;
    ctx.progress.sub_start("untar", 1);
    timed_command(
        Command::new("tar")
            .arg("-xf")
            .arg(&info.tarball)
            .arg("-C")
            .arg(tree),
    )
}

/// Reads the tarball into the page cache, so that untar measures the destination file system
/// and not a cold read of the source from the work directory's disk.
fn warm_tarball(ctx: &Ctx) -> Result<()> {
    let Some(info) = ctx.tree else {
        bail!("no source tree tarball");
    };
    let mut f =
        File::open(&info.tarball).with_context(|| format!("opening {}", info.tarball.display()))?;
    std::io::copy(&mut f, &mut std::io::sink())
        .with_context(|| format!("reading {}", info.tarball.display()))?;
    Ok(())
}

/// The untarred tree, untarring it (untimed) if an earlier workload has not.
fn ensure_tree(d: &Path, ctx: &Ctx) -> Result<PathBuf> {
    let tree = d.join("tree");
    if !tree.exists() {
        untar(&tree, ctx)?;
    }
    Ok(tree)
}

/// Runs a command with its output discarded and returns how long it took.
fn timed_command(cmd: &mut Command) -> Result<Duration> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    let t = t0.elapsed();
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(t)
}

/// readdir + lstat of every entry below `dir`; returns the number of non-directories.
fn stat_all(dir: &Path) -> Result<usize> {
    let mut files = 0;
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        let p = e.path();
        let md = fs::symlink_metadata(&p).with_context(|| format!("lstat {}", p.display()))?;
        if md.is_dir() {
            files += stat_all(&p)?;
        } else {
            files += 1;
        }
    }
    Ok(files)
}

/// Creates `create_files` empty files in `dir`, then deletes them; both timed together.
fn create_delete(dir: &Path, ctx: &Ctx) -> Result<Duration> {
    let n = ctx.sizes.create_files;
    let names: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("f{i:06}"))).collect();
    ctx.progress.sub_start("create, delete", 2 * n as u64);
    let t0 = Instant::now();
    for (i, p) in names.iter().enumerate() {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(p)
            .with_context(|| format!("creating {}", p.display()))?;
        if i % 500 == 0 {
            ctx.interrupt.check()?;
            ctx.progress.sub_set(i as u64);
        }
    }
    for (i, p) in names.iter().enumerate() {
        fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
        if i % 500 == 0 {
            ctx.interrupt.check()?;
            ctx.progress.sub_set((n + i) as u64);
        }
    }
    Ok(t0.elapsed())
}

/// Samples VmRSS/VmHWM of a daemon every 50 ms in a thread.
struct MemSampler {
    pid: u32,
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<MemStats>,
}

impl MemSampler {
    fn start(pid: u32, written: Arc<AtomicU64>) -> MemSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut max_rss = 0u64;
            let mut hwm = 0u64;
            let mut samples = Vec::new();
            loop {
                let last = stop2.load(Ordering::Relaxed);
                if let Some((rss, h)) = util::proc_memory_kib(pid) {
                    max_rss = max_rss.max(rss);
                    hwm = hwm.max(h);
                    let w = written.load(Ordering::Relaxed) as f64 / MIB as f64;
                    samples.push([w, rss as f64 / 1024.0]);
                }
                if last {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            MemStats {
                pid,
                max_rss_mib: max_rss as f64 / 1024.0,
                hwm_mib: hwm as f64 / 1024.0,
                samples: downsample(samples, 64),
            }
        });
        MemSampler { pid, stop, handle }
    }

    fn finish(self) -> MemStats {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or(MemStats {
            pid: self.pid,
            max_rss_mib: 0.0,
            hwm_mib: 0.0,
            samples: Vec::new(),
        })
    }
}

/// Keeps at most `max` evenly spaced points, always the first and the last.
fn downsample(v: Vec<[f64; 2]>, max: usize) -> Vec<[f64; 2]> {
    if v.len() <= max || max < 2 {
        return v;
    }
    let last = v.len() - 1;
    (0..max)
        .map(|i| v[i * last / (max - 1)])
        .collect::<Vec<_>>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsample_keeps_ends() {
        let v: Vec<[f64; 2]> = (0..1000).map(|i| [i as f64, 0.0]).collect();
        let d = downsample(v, 64);
        assert_eq!(d.len(), 64);
        assert_eq!(d[0][0], 0.0);
        assert_eq!(d[63][0], 999.0);
    }
}
