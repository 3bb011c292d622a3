//! Encrypted file contents on one backing file descriptor: reads, writes and truncation in whole
//! blocks, each request handled in one pass (one pread, one pwrite) under the caller's lock.
//!
//! Invariants: the backing file is empty or holds a valid header; every block but the last is a
//! full block; an all-zero on-disk block is a hole and reads as zeros.

use parking_lot::Mutex;
use rustix::fd::{AsFd, AsRawFd, OwnedFd};
use rustix::fs::{Mode, OFlags};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use vaultfs_core::format::blocks::{self, Layout};
use vaultfs_core::format::{FileHeader, BLOCK_SIZE, HEADER_LEN};
use vaultfs_core::{CipherSuite, ContentCipher, SecretKey};

const BS: u64 = BLOCK_SIZE as u64;

/// A sequential write stream hands its backing range to the kernel's write-back each time this
/// much has accumulated, so the disk writes while later requests are still being encrypted
/// (instead of all at the final fsync), and dirty memory stays bounded.
const WRITEBACK_CHUNK: u64 = 8 << 20;

/// Read-around window, in backing bytes: a small request that does not continue the previous
/// one also asks the kernel to read the aligned window around it into the backing file's page
/// cache, as the kernel does around a page fault in a mapped file. Random 4 KiB requests then
/// mostly find their data cached; and a partial-page write to a backing page (every vaultfs
/// block straddles two pages) need not wait for the page to be read first.
const RA_WINDOW: u64 = 128 << 10;

/// Read-around applies only to files up to this size (an eighth of RAM): such a file can stay
/// in the page cache, so at worst it is read once in windows; for larger files, random requests
/// would mostly pull in data that is evicted before use, so they read exactly what they need.
fn read_around_limit() -> u64 {
    static LIMIT: OnceLock<u64> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let si = rustix::system::sysinfo();
        (si.totalram as u64).saturating_mul(u64::from(si.mem_unit.max(1))) / 8
    })
}

/// What the content layer reports; the filesystem maps it to an errno.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("I/O error: {0}")]
    Io(#[from] rustix::io::Errno),
    #[error("block {block} failed authentication")]
    Auth { block: u64 },
    #[error("corrupt file: {0}")]
    Corrupt(String),
    #[error("file too large")]
    TooLarge,
}

impl ContentError {
    pub fn errno(&self) -> i32 {
        match self {
            ContentError::Io(e) => e.raw_os_error(),
            ContentError::Auth { .. } | ContentError::Corrupt(_) => libc::EIO,
            ContentError::TooLarge => libc::EFBIG,
        }
    }
}

type Result<T> = std::result::Result<T, ContentError>;

/// Largest plaintext size (keeps all offset arithmetic far from overflow; ext4's limit is 16 TiB).
pub const MAX_FILE_SIZE: u64 = 1 << 46;

/// The cipher state of one open file.
pub struct Content {
    fd: OwnedFd,
    suite: CipherSuite,
    layout: Layout,
    contents_key: Arc<SecretKey<32>>,
    cipher: Option<Arc<dyn ContentCipher>>,
    /// Bumped whenever `cipher` changes (a new header after truncation to zero), so that blocks
    /// sealed outside the lock under the old one are never written (see [`SealPlan`]).
    epoch: u64,
    /// Plaintext size, kept in step with the backing file (only we write it while it is open).
    size: u64,
    /// Plaintext end of the last read and of the last write: a request starting there continues
    /// a sequential stream.
    read_end: AtomicU64,
    write_end: u64,
    /// Backing offset from which a sequential write stream has not yet been handed to
    /// write-back.
    writeback_from: Option<u64>,
    /// Start of the chunk last handed to write-back, to be dropped from the backing page cache
    /// when the next one is.
    dropped_from: Option<u64>,
    /// Read-around windows already requested (bit per window), allocated at the first
    /// non-sequential request.
    around: Mutex<Vec<u64>>,
    /// The backing file may have holes (unallocated ranges) inside it: sparse when opened, or
    /// made so since (a write or truncate past the end, a punched range). A write into a hole
    /// needs new space, so a full disk can stop it part way through a block, leaving a block
    /// that no longer authenticates; such writes reserve their range first
    /// ([`Content::reserve`]).
    holes: bool,
    /// Block ranges `[a, b)` known to be holes: skipped by a write that began past the end of
    /// the file, and not written since. At most [`MAX_GAPS`]; beyond that `holes` is set.
    gaps: Vec<(u64, u64)>,
    /// A read through the mount has brought the access time up to date since the file last
    /// changed (see [`Content::note_read`]).
    atime_done: AtomicBool,
}

/// Gaps tracked one by one (see [`Content::gaps`]): a stream's requests that commit out of order
/// leave a few at a time.
const MAX_GAPS: usize = 32;

thread_local! {
    /// Per-thread buffer for on-disk (ciphertext) bytes, reused across requests so that no
    /// request pays for allocating and zeroing it. It only ever holds ciphertext.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Per-thread buffer for the plaintext of a read reply, reused for the same reason: zeroing
    /// a fresh 1 MiB reply buffer was 5 % of the CPU time of a sequential read. Every byte handed
    /// out has been written by the request it belongs to (the blocks tile the range).
    static PLAIN: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` bytes of a reused per-thread buffer (contents unspecified).
fn with_buffer<T>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<Vec<u8>>>,
    len: usize,
    f: impl FnOnce(&mut [u8]) -> Result<T>,
) -> Result<T> {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            f(&mut buf[..len])
        }
        // Re-entered on this thread (not expected): fall back to a fresh buffer.
        Err(_) => f(&mut vec![0u8; len]),
    })
}

/// Runs `f` on `len` bytes of the thread's ciphertext scratch buffer (contents unspecified).
pub(crate) fn with_scratch<T>(len: usize, f: impl FnOnce(&mut [u8]) -> Result<T>) -> Result<T> {
    with_buffer(&SCRATCH, len, f)
}

/// Seals consecutive blocks from `first` (one plaintext slice each) into `disk`, their on-disk
/// form back to back. Large requests split the work across two threads.
fn seal_blocks(
    c: &dyn ContentCipher,
    layout: &Layout,
    first: u64,
    srcs: &[&[u8]],
    disk: &mut [u8],
) -> Result<()> {
    let dbs = layout.disk_block() as usize;
    let work = |(i, (p, d)): (usize, (&&[u8], &mut [u8]))| {
        c.seal(first + i as u64, p, d)
            .map_err(|e| ContentError::Corrupt(e.to_string()))
    };
    let n_blocks = srcs.len();
    if n_blocks >= PARALLEL_BLOCKS {
        let half = n_blocks / 2;
        let (pa, pb) = srcs.split_at(half);
        let (da, db) = disk.split_at_mut(half * dbs);
        both(
            || {
                pa.iter()
                    .zip(da.chunks_mut(dbs))
                    .enumerate()
                    .try_for_each(work)
            },
            || {
                pb.iter()
                    .zip(db.chunks_mut(dbs))
                    .enumerate()
                    .try_for_each(|(i, x)| work((i + half, x)))
            },
        )
        .map(|_| ())
    } else {
        srcs.iter()
            .zip(disk.chunks_mut(dbs))
            .enumerate()
            .try_for_each(work)
    }
}

/// Requests of at least this many blocks are encrypted or decrypted by two threads.
const PARALLEL_BLOCKS: usize = 64;

/// Runs `a` on this thread and `b` on a second one, or both here when this thread may run on
/// one CPU only (the helper would inherit that and only take turns with it).
fn both<A, B: Send>(
    a: impl FnOnce() -> Result<A>,
    b: impl FnOnce() -> Result<B> + Send,
) -> Result<(A, B)> {
    if rustix::thread::sched_getaffinity(None).is_ok_and(|m| m.count() == 1) {
        let ra = a()?;
        return Ok((ra, b()?));
    }
    std::thread::scope(|s| {
        let h = s.spawn(b);
        let ra = a();
        let rb = h
            .join()
            .map_err(|_| ContentError::Corrupt("crypto thread panicked".into()))?;
        Ok((ra?, rb?))
    })
}

/// On-disk bytes of whole blocks holding `plain_len` plaintext bytes.
fn disk_len_of(layout: &Layout, plain_len: usize) -> usize {
    plain_len + plain_len.div_ceil(BLOCK_SIZE) * layout.overhead()
}

/// Smallest write sealed outside the file's lock: below it the lock is held only briefly anyway.
const PARALLEL_MIN: usize = 64 << 10;

/// Whether a write of `len` bytes at `off` may be sealed outside the file's lock (it starts at a
/// block boundary and is large); checked before taking the lock, so small writes pay nothing.
pub fn may_seal_ahead(off: u64, len: usize) -> bool {
    off.is_multiple_of(BS) && len >= PARALLEL_MIN
}

/// How far out of order the requests of one sequential stream may be handled and still count
/// as continuing it (several workers seal a stream's requests at once and commit them in the
/// order they finish).
const STREAM_SLACK: u64 = 16 << 20;

/// A large write at a block boundary, to be sealed without the file's lock (see
/// [`Content::seal_plan`]). What it seals depends only on the data, the block indices and the
/// file's cipher: whole blocks, and a last block as long as the write leaves it.
pub struct SealPlan {
    cipher: Arc<dyn ContentCipher>,
    epoch: u64,
    layout: Layout,
    off: u64,
    end: u64,
}

impl SealPlan {
    /// On-disk length of the sealed write.
    pub fn disk_len(&self) -> usize {
        disk_len_of(&self.layout, (self.end - self.off) as usize)
    }

    /// Seals `data` (the write's bytes) into `disk` ([`SealPlan::disk_len`] bytes).
    pub fn seal(&self, data: &[u8], disk: &mut [u8]) -> Result<()> {
        let srcs: Vec<&[u8]> = data.chunks(BLOCK_SIZE).collect();
        seal_blocks(
            self.cipher.as_ref(),
            &self.layout,
            blocks::block_of(self.off),
            &srcs,
            disk,
        )
    }
}

fn pread_exact(fd: impl AsFd, buf: &mut [u8], off: u64) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = rustix::io::pread(&fd, &mut buf[done..], off + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

fn pwrite_all(fd: impl AsFd, buf: &[u8], off: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = rustix::io::pwrite(&fd, &buf[done..], off + done as u64)?;
        if n == 0 {
            return Err(ContentError::Io(rustix::io::Errno::NOSPC));
        }
        done += n;
    }
    Ok(())
}

impl Content {
    /// Wraps an open backing file (read-write, or read-only for a read-only mount).
    pub fn open(fd: OwnedFd, suite: CipherSuite, contents_key: Arc<SecretKey<32>>) -> Result<Self> {
        let layout = Layout::new(suite.overhead());
        let st = rustix::fs::fstat(&fd)?;
        let len = st.st_size as u64;
        let size = layout.plain_size_lossy(len);
        // Fewer bytes allocated than the length: there are holes (delayed allocations count).
        let holes = (st.st_blocks as u64).saturating_mul(512) < len;
        let mut c = Content {
            fd,
            suite,
            layout,
            contents_key,
            cipher: None,
            epoch: 0,
            size,
            read_end: AtomicU64::new(0),
            write_end: 0,
            writeback_from: None,
            dropped_from: None,
            around: Mutex::new(Vec::new()),
            holes,
            gaps: Vec::new(),
            atime_done: AtomicBool::new(false),
        };
        if len > 0 {
            c.load_header()?;
        }
        Ok(c)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// After a read through the mount: lets the backing file system apply its access-time rule
    /// (relatime, noatime, ...) as for a read of the file itself, by reading a byte of it
    /// through a descriptor of its own. The daemon's descriptor has `O_NOATIME`, so that its own
    /// reads (headers, the old contents of partly written blocks) never move the access time;
    /// setting the time directly would move the change time too. Done once per change of the
    /// file through this state, not on every read.
    pub fn note_read(&self) {
        if self.atime_done.swap(true, Ordering::Relaxed) {
            return;
        }
        let path = format!("/proc/self/fd/{}", self.fd.as_raw_fd());
        if let Ok(f) = rustix::fs::open(
            path.as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            let _ = rustix::io::pread(&f, &mut [0u8; 1], 0);
        }
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The backing file's path, for log lines (the encrypted name says nothing secret).
    pub fn backing_path(&self) -> String {
        std::fs::read_link(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "?".into())
    }

    fn load_header(&mut self) -> Result<()> {
        let mut h = [0u8; HEADER_LEN];
        let n = pread_exact(&self.fd, &mut h, 0)?;
        let hdr = FileHeader::parse(&h[..n]).map_err(|e| ContentError::Corrupt(e.to_string()))?;
        self.set_cipher(&hdr)
    }

    fn set_cipher(&mut self, hdr: &FileHeader) -> Result<()> {
        let c = self
            .suite
            .file_cipher(&self.contents_key, &hdr.file_id)
            .map_err(|e| ContentError::Corrupt(e.to_string()))?;
        self.cipher = Some(Arc::from(c));
        self.epoch += 1;
        Ok(())
    }

    /// Writes a fresh header to an empty backing file.
    fn ensure_header(&mut self) -> Result<()> {
        if self.cipher.is_some() {
            return Ok(());
        }
        let hdr = FileHeader::random().map_err(|_| ContentError::Corrupt("rng failure".into()))?;
        pwrite_all(&self.fd, &hdr.encode(), 0)?;
        self.set_cipher(&hdr)
    }

    /// Plaintext bytes held by blocks `first..=last` of a file of `size` bytes.
    fn span_len(&self, first: u64, last: u64, size: u64) -> usize {
        (self.layout.block_len(last, size) as u64 + (last - first) * BS) as usize
    }

    /// On-disk bytes of whole blocks holding `plain_len` plaintext bytes.
    fn disk_len(&self, plain_len: usize) -> usize {
        disk_len_of(&self.layout, plain_len)
    }

    fn cipher(&self) -> Result<&dyn ContentCipher> {
        self.cipher
            .as_deref()
            .ok_or_else(|| ContentError::Corrupt("missing header".into()))
    }

    /// Decrypts one on-disk block into `o` (its plaintext length).
    fn open_one(&self, c: &dyn ContentCipher, block: u64, d: &[u8], o: &mut [u8]) -> Result<()> {
        if d.len() != o.len() + self.layout.overhead() {
            return Err(ContentError::Corrupt(format!(
                "block {block} has a bad length"
            )));
        }
        // Only a full block can be a hole: a partial last block is always written for real.
        if d.len() == self.layout.disk_block() as usize && d.iter().all(|&b| b == 0) {
            o.fill(0);
            return Ok(());
        }
        c.open(block, d, o)
            .map_err(|_| ContentError::Auth { block })
    }

    /// Reads the on-disk bytes of blocks starting at `first` holding `plain_len` plaintext bytes
    /// into the thread's scratch buffer and hands them to `f`.
    fn with_disk_blocks<T>(
        &self,
        first: u64,
        plain_len: usize,
        f: impl FnOnce(&[u8]) -> Result<T>,
    ) -> Result<T> {
        let disk_len = self.disk_len(plain_len);
        with_scratch(disk_len, |disk| {
            let got = pread_exact(&self.fd, disk, self.layout.block_offset(first))?;
            if got != disk_len {
                let bad = first + got as u64 / self.layout.disk_block();
                return Err(ContentError::Corrupt(format!(
                    "block {bad} truncated on disk"
                )));
            }
            f(disk)
        })
    }

    /// Reads and decrypts plaintext blocks from `first` holding `plain_len` bytes (all within
    /// `self.size`).
    fn read_blocks(&self, first: u64, plain_len: usize) -> Result<Vec<u8>> {
        let c = self.cipher()?;
        let dbs = self.layout.disk_block() as usize;
        let mut out = vec![0u8; plain_len];
        self.with_disk_blocks(first, plain_len, |disk| {
            for (i, (d, o)) in disk.chunks(dbs).zip(out.chunks_mut(BLOCK_SIZE)).enumerate() {
                self.open_one(c, first + i as u64, d, o)?;
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Reads up to `len` bytes at `off` into a new vector (see [`Content::read_with`]).
    pub fn read(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        self.read_with(off, len, |p| p.to_vec())
    }

    /// Reads up to `len` bytes at `off` and hands them to `f`, from a reused per-thread buffer
    /// (see [`Content::read_into`]).
    pub fn read_with<T>(&self, off: u64, len: usize, f: impl FnOnce(&[u8]) -> T) -> Result<T> {
        let len = self.size.saturating_sub(off).min(len as u64) as usize;
        with_buffer(&PLAIN, len, |out| {
            let n = self.read_into(off, out)?;
            Ok(f(&out[..n]))
        })
    }

    /// Reads up to `out.len()` bytes at `off` into `out`; returns how many (fewer at the end of
    /// the file). One pread; each block is decrypted straight into `out` (partial edge blocks
    /// through a small temporary).
    pub fn read_into(&self, off: u64, out: &mut [u8]) -> Result<usize> {
        if off >= self.size || out.is_empty() {
            return Ok(0);
        }
        let end = (off + out.len() as u64).min(self.size);
        let out = &mut out[..(end - off) as usize];
        let first = blocks::block_of(off);
        let last = blocks::block_of(end - 1);
        let plain_len = self.span_len(first, last, self.size);
        let c = self.cipher()?;
        let dbs = self.layout.disk_block() as usize;
        let sequential = self.read_end.swap(end, Ordering::Relaxed) == off;
        {
            self.with_disk_blocks(first, plain_len, |disk| {
                // Decrypts the blocks from `first + skip` whose on-disk bytes are `disk` into
                // `out`, which starts at plaintext offset `base`.
                let decrypt = |skip: usize, disk: &[u8], out: &mut [u8], base: u64| {
                    for (i, d) in disk.chunks(dbs).enumerate() {
                        let block = first + (skip + i) as u64;
                        let bstart = block * BS;
                        let blen = self.layout.block_len(block, self.size);
                        let from = base.max(bstart);
                        let to = end.min(bstart + blen as u64);
                        let dst = &mut out[(from - base) as usize..(to - base) as usize];
                        if from == bstart && to == bstart + blen as u64 {
                            self.open_one(c, block, d, dst)?;
                        } else {
                            let mut tmp = [0u8; BLOCK_SIZE];
                            self.open_one(c, block, d, &mut tmp[..blen])?;
                            dst.copy_from_slice(
                                &tmp[(from - bstart) as usize..(to - bstart) as usize],
                            );
                            zeroize::Zeroize::zeroize(&mut tmp[..]);
                        }
                    }
                    Ok(())
                };
                let n_blocks = disk.len().div_ceil(dbs);
                if n_blocks < PARALLEL_BLOCKS {
                    return decrypt(0, disk, out, off);
                }
                // Split at a block boundary past `off`.
                let half = n_blocks / 2;
                let mid = (first + half as u64) * BS;
                let (da, db) = disk.split_at(half * dbs);
                let (oa, ob) = out.split_at_mut((mid - off) as usize);
                both(|| decrypt(0, da, oa, off), || decrypt(half, db, ob, mid)).map(|_| ())
            })?;
            if !sequential {
                self.read_around(first, plain_len);
            }
            Ok(out.len())
        }
    }

    /// Asks the kernel to read the windows around the backing range of `plain_len` bytes from
    /// block `first` that were not asked for before (see [`RA_WINDOW`]). Large requests and
    /// large files are left alone. Advice only: it never fails a request.
    fn read_around(&self, first: u64, plain_len: usize) {
        let file_len = self.layout.backing_size(self.size);
        if plain_len as u64 >= RA_WINDOW || file_len <= RA_WINDOW || file_len > read_around_limit()
        {
            return;
        }
        let b0 = self.layout.block_offset(first);
        let b1 = b0 + self.disk_len(plain_len) as u64;
        let mut todo = [None; 2];
        {
            let mut bits = self.around.lock();
            let need = file_len.div_ceil(RA_WINDOW).div_ceil(64) as usize;
            if bits.len() < need {
                bits.resize(need, 0);
            }
            for (slot, w) in todo.iter_mut().zip(b0 / RA_WINDOW..=(b1 - 1) / RA_WINDOW) {
                let (i, m) = ((w / 64) as usize, 1u64 << (w % 64));
                if i < bits.len() && bits[i] & m == 0 {
                    bits[i] |= m;
                    *slot = Some(w);
                }
            }
        }
        for w in todo.into_iter().flatten() {
            let _ = rustix::fs::fadvise(
                &self.fd,
                w * RA_WINDOW,
                NonZeroU64::new(RA_WINDOW),
                rustix::fs::Advice::WillNeed,
            );
        }
    }

    /// After a write of plaintext `[off, end)` ending at backing offset `backing_end`: a
    /// sequential stream hands every [`WRITEBACK_CHUNK`] to write-back. Large writes sealed
    /// outside the lock (`reordered`) can arrive here a little out of order, so for them
    /// "sequential" means within [`STREAM_SLACK`] of the stream's end.
    fn note_write(&mut self, off: u64, end: u64, backing_end: u64, reordered: bool) {
        let continues = if reordered {
            off <= self.write_end.saturating_add(STREAM_SLACK)
                && off.saturating_add(STREAM_SLACK) >= self.write_end
        } else {
            off == self.write_end
        };
        if continues {
            let from = *self
                .writeback_from
                .get_or_insert(backing_end.min(self.layout.block_offset(off / BS)));
            if backing_end >= from + WRITEBACK_CHUNK {
                crate::sys::start_writeback(self.fd.as_fd(), from, backing_end - from);
                self.writeback_from = Some(backing_end);
                // Drop-behind: the chunk handed to write-back one chunk ago is written by now
                // (pages still dirty or under write-back are left alone). Its ciphertext pages
                // would only duplicate the plaintext the mount's own cache holds, so let the
                // kernel reuse them for the next chunk instead of allocating new ones.
                if let Some(prev) = self.dropped_from.replace(from) {
                    let _ = rustix::fs::fadvise(
                        &self.fd,
                        prev,
                        NonZeroU64::new(from.saturating_sub(prev)),
                        rustix::fs::Advice::DontNeed,
                    );
                }
            }
            self.write_end = self.write_end.max(end);
        } else {
            self.writeback_from = None;
            self.dropped_from = None;
            self.write_end = end;
        }
    }

    /// After a write into a gap failed part way: makes backing bytes `[off, off + len)` holes
    /// again, as they were, rather than leave a block half written (which would never
    /// authenticate). Punching frees space, so it works on a full disk.
    fn punch_back(&self, off: u64, len: u64) {
        if let Err(e) = self.punch(off, len) {
            tracing::warn!(
                "a failed write may have left a block unreadable: cannot punch it out: {e}"
            );
        }
    }

    /// Deallocates backing bytes `[off, off + len)` (they read as zeros), keeping the length.
    fn punch(&self, off: u64, len: u64) -> rustix::io::Result<()> {
        let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        rustix::fs::fallocate(&self.fd, flags, off, len)
    }

    /// Blocks `[a, b)` have been written: they are no longer gaps.
    fn fill_gaps(&mut self, a: u64, b: u64) {
        let mut kept = Vec::with_capacity(self.gaps.len() + 1);
        for &(ga, gb) in &self.gaps {
            if gb <= a || b <= ga {
                kept.push((ga, gb));
                continue;
            }
            if ga < a {
                kept.push((ga, a));
            }
            if b < gb {
                kept.push((b, gb));
            }
        }
        self.gaps = kept;
    }

    /// Allocates backing bytes `[off, off + len)` (without changing the file's length) before
    /// they are written where they may not be allocated yet, so that a full disk fails the
    /// write before anything is written instead of part way through a block, which would leave
    /// the block unreadable for good. A backing file system that cannot allocate ahead
    /// (`EOPNOTSUPP`) is written without.
    fn reserve(&self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        match rustix::fs::fallocate(&self.fd, rustix::fs::FallocateFlags::KEEP_SIZE, off, len) {
            Ok(()) | Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Re-encrypts block `index` (currently `old_len` bytes long) with length `new_len`, zero-
    /// padding when it grows (its new bytes reserved first, see [`Content::reserve`]). Used where
    /// the file's end moves.
    fn resize_block(&mut self, index: u64, old_len: usize, new_len: usize) -> Result<()> {
        let mut plain = if old_len > 0 {
            self.read_blocks(index, old_len)?
        } else {
            Vec::new()
        };
        plain.resize(new_len, 0);
        let at = self.layout.block_offset(index);
        if new_len > old_len {
            self.reserve(at, (new_len + self.layout.overhead()) as u64)?;
        }
        let mut disk = vec![0u8; new_len + self.layout.overhead()];
        self.cipher()?
            .seal(index, &plain, &mut disk)
            .map_err(|e| ContentError::Corrupt(e.to_string()))?;
        pwrite_all(&self.fd, &disk, at)
    }

    /// Makes the current last block, if partial, a full block, ahead of growth past it.
    fn fill_tail_block(&mut self) -> Result<()> {
        let tail = (self.size % BS) as usize;
        if tail != 0 {
            self.resize_block(self.size / BS, tail, BLOCK_SIZE)?;
        }
        Ok(())
    }

    /// Writes `data` at `off`; returns the bytes written.
    pub fn write(&mut self, off: u64, data: &[u8]) -> Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let end = off
            .checked_add(data.len() as u64)
            .ok_or(ContentError::TooLarge)?;
        if end > MAX_FILE_SIZE {
            return Err(ContentError::TooLarge);
        }
        self.ensure_header()?;
        let old_size = self.size;
        self.grow_with(off, end, false, |c| {
            c.write_blocks(off, data, old_size, old_size.max(end))
        })?;
        Ok(data.len())
    }

    /// Makes plaintext `[off, off + len)` read as zeros, within the current size (which does
    /// not change): `fallocate` with `PUNCH_HOLE` or `ZERO_RANGE`. Whole blocks become holes:
    /// their on-disk bytes are punched out of the backing file (all-zero on-disk blocks read as
    /// zeros, FORMAT.md), or written as zeros where the backing file system cannot punch. Partial
    /// blocks at the edges, and a partial last block of the file, which is never a hole, are
    /// rewritten as ciphertext of zeros.
    pub fn zero_range(&mut self, off: u64, len: u64) -> Result<()> {
        let end = off.saturating_add(len).min(self.size);
        if off >= end {
            return Ok(());
        }
        // Whole blocks [a, b): inside the range, each a full 4096 bytes (b * BS <= end <= size).
        let (a, b) = (off.div_ceil(BS), end / BS);
        if a >= b {
            return self
                .write(off, &vec![0u8; (end - off) as usize])
                .map(|_| ());
        }
        if off < a * BS {
            self.write(off, &vec![0u8; (a * BS - off) as usize])?;
        }
        if b * BS < end {
            self.write(b * BS, &vec![0u8; (end - b * BS) as usize])?;
        }
        let from = self.layout.block_offset(a);
        let to = self.layout.block_offset(b);
        let punched = self.punch(from, to - from);
        self.holes = true;
        match punched {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => {
                let zeros = vec![0u8; 1 << 20];
                let mut at = from;
                while at < to {
                    let n = (to - at).min(zeros.len() as u64) as usize;
                    pwrite_all(&self.fd, &zeros[..n], at)?;
                    at += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Runs `write` (which writes the blocks of plaintext `[off, end)`) with the bookkeeping
    /// around it: a partial last block the write grows past is completed first; if the write
    /// fails after the file would have grown, the backing file is put back
    /// ([`Content::undo_growth`]); if it succeeds, the size and the stream state follow it.
    fn grow_with(
        &mut self,
        off: u64,
        end: u64,
        reordered: bool,
        write: impl FnOnce(&Self) -> Result<()>,
    ) -> Result<()> {
        let (first, last) = (blocks::block_of(off), blocks::block_of(end - 1));
        let old_size = self.size;
        let new_size = old_size.max(end);
        let backing_end = self.layout.block_offset(last)
            + (self.layout.block_len(last, new_size) + self.layout.overhead()) as u64;
        let from = self.layout.block_offset(first);
        // A write inside a gap (the usual case: the earlier request of a stream, committed after
        // a later one) is undone on failure by punching its blocks back out. One that may
        // otherwise land in a hole reserves its space first. (Past the old end a failure is
        // undone by cutting the file back; see `undo_growth`.)
        let in_gap = self.gaps.iter().any(|&(a, b)| a <= first && last < b);
        let touches_gap = self.gaps.iter().any(|&(a, b)| first < b && a <= last);
        if !in_gap && (touches_gap || (self.holes && off < old_size)) {
            self.reserve(from, backing_end - from)?;
        }
        let filled = !old_size.is_multiple_of(BS) && first > old_size / BS;
        if filled {
            self.fill_tail_block()?;
        }
        if let Err(e) = write(self) {
            if in_gap {
                self.punch_back(from, backing_end - from);
            }
            if new_size > old_size {
                self.undo_growth(old_size, filled);
            }
            return Err(e);
        }
        self.size = new_size;
        *self.atime_done.get_mut() = false;
        if touches_gap {
            self.fill_gaps(first, last + 1);
        }
        let old_blocks = old_size.div_ceil(BS);
        if first > old_blocks {
            // Blocks between the old end and this write were never written: holes.
            self.gaps.push((old_blocks, first));
            if self.gaps.len() > MAX_GAPS {
                self.gaps.clear();
                self.holes = true;
            }
        }
        self.note_write(off, end, backing_end, reordered);
        Ok(())
    }

    /// The blocks of a write of `data` at `off` (whole ones straight from `data`, at most two
    /// edge blocks merged with their old contents), sealed and written in one pwrite; the file
    /// grows from `old_size` to `new_size`.
    fn write_blocks(&self, off: u64, data: &[u8], old_size: u64, new_size: u64) -> Result<()> {
        let end = off + data.len() as u64;
        let first = blocks::block_of(off);
        let last = blocks::block_of(end - 1);
        // Blocks the write covers whole are sealed straight from `data`; at most two edge blocks
        // (partly overwritten) are assembled from their old contents first.
        let mut edges: Vec<(u64, Vec<u8>)> = Vec::with_capacity(2);
        for block in [first, last] {
            if edges.iter().any(|(b, _)| *b == block) {
                continue;
            }
            let bstart = block * BS;
            let new_len = self.layout.block_len(block, new_size);
            if off <= bstart && end >= bstart + new_len as u64 {
                continue;
            }
            let mut buf = vec![0u8; new_len];
            if bstart < old_size {
                let old_len = self.layout.block_len(block, old_size);
                let old = self.read_blocks(block, old_len)?;
                buf[..old_len].copy_from_slice(&old);
            }
            let from = off.max(bstart);
            let to = end.min(bstart + new_len as u64);
            buf[(from - bstart) as usize..(to - bstart) as usize]
                .copy_from_slice(&data[(from - off) as usize..(to - off) as usize]);
            edges.push((block, buf));
        }
        let mut srcs: Vec<&[u8]> = Vec::with_capacity((last - first + 1) as usize);
        for block in first..=last {
            match edges.iter().find(|(b, _)| *b == block) {
                Some((_, buf)) => srcs.push(buf),
                None => {
                    let bstart = block * BS;
                    let len = self.layout.block_len(block, new_size) as u64;
                    srcs.push(&data[(bstart - off) as usize..(bstart - off + len) as usize]);
                }
            }
        }
        if off != self.write_end && old_size > 0 {
            // The backing pages this write partly covers must be read before they can be
            // changed; read the window around them at once.
            let covered = self.span_len(first, last, new_size);
            self.read_around(first, covered);
        }
        let r = self.seal_and_write(first, &srcs);
        for (_, buf) in &mut edges {
            zeroize::Zeroize::zeroize(buf);
        }
        r
    }

    /// After a write that would have grown the file from `old_size` failed part way (a full
    /// disk, an I/O error): puts the backing file back as it was, the last block at its old
    /// length (if it had been completed for the write) and nothing after it, so that the file
    /// reads as before. If that fails too, the size follows what is on disk (a completed last
    /// block reads as data padded with zeros) rather than leave a block whose length no longer
    /// matches the size.
    fn undo_growth(&mut self, old_size: u64, filled: bool) {
        let tail = (old_size % BS) as usize;
        let restored = (!filled || self.resize_block(old_size / BS, BLOCK_SIZE, tail).is_ok())
            && rustix::fs::ftruncate(
                &self.fd,
                self.layout.backing_size(old_size).max(HEADER_LEN as u64),
            )
            .is_ok();
        if !restored && filled {
            self.size = old_size.next_multiple_of(BS);
        }
    }

    /// For a write of `len` bytes at `off`: what is needed to seal its blocks without holding
    /// the file's lock, so that several large requests of a stream are encrypted at once by
    /// different workers. Only a write that starts at a block boundary, is large, and goes to
    /// a file that has its header qualifies; the seal is then checked and written by
    /// [`Content::commit_sealed`] under the lock.
    pub fn seal_plan(&self, off: u64, len: usize) -> Option<SealPlan> {
        if !may_seal_ahead(off, len) {
            return None;
        }
        let end = off.checked_add(len as u64)?;
        if end > MAX_FILE_SIZE {
            return None;
        }
        Some(SealPlan {
            cipher: Arc::clone(self.cipher.as_ref()?),
            epoch: self.epoch,
            layout: self.layout,
            off,
            end,
        })
    }

    /// Writes blocks sealed by [`SealPlan::seal`] if they are still right for the file:
    /// the same cipher, and a partial last block still the file's last block (nothing of the
    /// file beyond the write's end). `Ok(false)`: they are not; nothing was written and the
    /// caller writes the data the ordinary way.
    pub fn commit_sealed(&mut self, plan: &SealPlan, disk: &[u8]) -> Result<bool> {
        let (off, end) = (plan.off, plan.end);
        if plan.epoch != self.epoch || self.cipher.is_none() {
            return Ok(false);
        }
        let old_size = self.size;
        if !end.is_multiple_of(BS) && old_size > end {
            return Ok(false);
        }
        self.grow_with(off, end, true, |c| {
            pwrite_all(&c.fd, disk, c.layout.block_offset(blocks::block_of(off)))
        })?;
        Ok(true)
    }

    /// Encrypts consecutive blocks from `first` (one plaintext slice each) and writes them in one
    /// call, from the thread's reusable scratch buffer.
    fn seal_and_write(&self, first: u64, srcs: &[&[u8]]) -> Result<()> {
        let c = self.cipher()?;
        let oh = self.layout.overhead();
        let disk_len: usize = srcs.iter().map(|p| p.len() + oh).sum();
        with_scratch(disk_len, |disk| {
            seal_blocks(c, &self.layout, first, srcs, disk)?;
            pwrite_all(&self.fd, disk, self.layout.block_offset(first))
        })
    }

    /// Sets the plaintext size.
    pub fn truncate(&mut self, new_size: u64) -> Result<()> {
        if new_size > MAX_FILE_SIZE {
            return Err(ContentError::TooLarge);
        }
        let old = self.size;
        *self.atime_done.get_mut() = false;
        if new_size == old {
            // Still a truncate: the modification and change times move, as on ext4.
            let len = rustix::fs::fstat(&self.fd)?.st_size as u64;
            rustix::fs::ftruncate(&self.fd, len)?;
            return Ok(());
        }
        if new_size == 0 {
            rustix::fs::ftruncate(&self.fd, 0)?;
            // A fresh file ID (and so a fresh key) for whatever is written next.
            self.cipher = None;
            self.epoch += 1;
            self.size = 0;
            return Ok(());
        }
        self.ensure_header()?;
        if new_size < old {
            let tail = (new_size % BS) as usize;
            if tail != 0 {
                let idx = new_size / BS;
                let old_len = self.layout.block_len(idx, old);
                self.resize_block(idx, old_len, tail)?;
            }
        } else {
            let old_last = old.div_ceil(BS); // blocks holding data before
            let tail = (new_size % BS) as usize;
            let tail_idx = new_size / BS;
            let new_tail = tail != 0 && tail_idx >= old_last;
            let oh = self.layout.overhead() as u64;
            // Both blocks written below get their space first, so that a full disk fails the
            // truncate before either is written (a grown old tail block without the new length
            // would no longer authenticate).
            if !old.is_multiple_of(BS) {
                let idx = old / BS;
                let new_len = self.layout.block_len(idx, new_size) as u64;
                self.reserve(self.layout.block_offset(idx), new_len + oh)?;
            }
            if new_tail {
                self.reserve(self.layout.block_offset(tail_idx), tail as u64 + oh)?;
            }
            if !old.is_multiple_of(BS) {
                let idx = old / BS;
                let new_len = self.layout.block_len(idx, new_size);
                self.resize_block(idx, (old % BS) as usize, new_len)?;
            }
            if new_tail {
                // A new partial last block is written as real ciphertext of zeros.
                self.resize_block(tail_idx, 0, tail)?;
            }
            if new_size.div_ceil(BS) > old_last {
                self.holes = true;
            }
        }
        rustix::fs::ftruncate(&self.fd, self.layout.backing_size(new_size))?;
        self.size = new_size;
        if self.gaps.iter().any(|&(a, _)| a < new_size.div_ceil(BS)) {
            self.holes = true;
        }
        self.gaps.clear();
        if new_size == 0 {
            self.holes = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{Mode, OFlags};

    fn new_content(suite: CipherSuite) -> (tempfile::TempDir, Content) {
        let d = tempfile::tempdir().unwrap();
        let fd = rustix::fs::open(
            d.path().join("f"),
            OFlags::RDWR | OFlags::CREATE,
            Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let key = Arc::new(SecretKey::random().unwrap());
        (d, Content::open(fd, suite, key).unwrap())
    }

    /// A small deterministic xorshift generator: `rnd(m)` is in `0..m`.
    fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
        move |m| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        }
    }

    /// Writes `data` at `off` into the model.
    fn model_write(model: &mut Vec<u8>, off: u64, data: &[u8]) {
        let end = off as usize + data.len();
        if model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..end].copy_from_slice(data);
    }

    /// The file agrees with the model: size, a random read of up to `max_read` bytes, and the
    /// backing file's length.
    fn check_model(
        c: &Content,
        model: &[u8],
        rnd: &mut impl FnMut(u64) -> u64,
        max_read: u64,
        what: &str,
    ) {
        assert_eq!(c.size(), model.len() as u64, "{what}");
        let off = rnd(model.len() as u64 + 10);
        let len = rnd(max_read) as usize;
        let got = c.read(off, len).unwrap();
        let s = (off as usize).min(model.len());
        let e = (off as usize + len).min(model.len());
        assert_eq!(got, &model[s..e], "{what}: read {off}+{len}");
        let len_on_disk = rustix::fs::fstat(c.fd()).unwrap().st_size as u64;
        assert_eq!(
            len_on_disk,
            Layout::new(c.suite.overhead()).backing_size(model.len() as u64),
            "{what}: backing length"
        );
    }

    /// Random operations checked against a plain Vec model, for both suites.
    #[test]
    fn model_check() {
        for suite in [CipherSuite::Aes256Gcm, CipherSuite::Aes256Xts] {
            let (_d, mut c) = new_content(suite);
            let mut model: Vec<u8> = Vec::new();
            let mut rnd = xorshift(0x1234_5678_9abc_def0);
            for step in 0..600 {
                match rnd(4) {
                    0 | 1 => {
                        let off = rnd(40_000);
                        let big = rnd(5) == 0;
                        let len = 1 + rnd(if big { 300_000 } else { 9000 }) as usize;
                        let val = (step % 251) as u8 + 1;
                        let data = vec![val; len];
                        c.write(off, &data).unwrap();
                        model_write(&mut model, off, &data);
                    }
                    2 => {
                        let n = rnd(60_000);
                        c.truncate(n).unwrap();
                        model.resize(n as usize, 0);
                    }
                    _ => {}
                }
                check_model(
                    &c,
                    &model,
                    &mut rnd,
                    20_000,
                    &format!("{suite:?} step {step}"),
                );
            }
            let all = c.read(0, model.len() + 1).unwrap();
            assert_eq!(all, model);
        }
    }

    /// Writes sealed outside the lock and committed later, after other writes and truncations
    /// (to zero too, which changes the file's key) have moved the file on: each commit either
    /// writes exactly what a plain write would have, or declines, and the caller's plain write
    /// then does; the file always matches an in-memory model.
    #[test]
    fn sealed_writes_model_check() {
        for suite in [CipherSuite::Aes256Gcm, CipherSuite::Aes256Xts] {
            let (_d, mut c) = new_content(suite);
            let mut model: Vec<u8> = Vec::new();
            let mut rnd = xorshift(0x0fed_cba9_8765_4321);
            let mut pending: Vec<(SealPlan, Vec<u8>, Vec<u8>)> = Vec::new();
            let (mut committed, mut declined) = (0, 0);
            for step in 0..800 {
                let val = (step % 251) as u8 + 1;
                match rnd(6) {
                    0 => {
                        let off = rnd(300_000);
                        let data = vec![val; 1 + rnd(9000) as usize];
                        c.write(off, &data).unwrap();
                        model_write(&mut model, off, &data);
                    }
                    1 => {
                        let n = if rnd(4) == 0 { 0 } else { rnd(400_000) };
                        c.truncate(n).unwrap();
                        model.resize(n as usize, 0);
                    }
                    2 | 3 => {
                        let off = rnd(80) * BS;
                        let len = PARALLEL_MIN + rnd(200_000) as usize;
                        let data: Vec<u8> = (0..len).map(|i| val ^ (i % 7) as u8).collect();
                        if let Some(plan) = c.seal_plan(off, len) {
                            let mut disk = vec![0u8; plan.disk_len()];
                            plan.seal(&data, &mut disk).unwrap();
                            pending.push((plan, data, disk));
                        } else {
                            // No header yet: the plain path (which writes one).
                            c.write(off, &data).unwrap();
                            model_write(&mut model, off, &data);
                        }
                    }
                    _ => {
                        if !pending.is_empty() {
                            let i = rnd(pending.len() as u64) as usize;
                            let (plan, data, disk) = pending.swap_remove(i);
                            if c.commit_sealed(&plan, &disk).unwrap() {
                                committed += 1;
                            } else {
                                declined += 1;
                                c.write(plan.off, &data).unwrap();
                            }
                            model_write(&mut model, plan.off, &data);
                        }
                    }
                }
                check_model(
                    &c,
                    &model,
                    &mut rnd,
                    300_000,
                    &format!("{suite:?} step {step}"),
                );
            }
            assert_eq!(c.read(0, model.len() + 1).unwrap(), model);
            // Both outcomes were exercised.
            assert!(
                committed > 20 && declined > 5,
                "{committed} committed, {declined} declined"
            );
        }
    }

    #[test]
    fn sparse_reads_zero_and_reopen() {
        let (d, mut c) = new_content(CipherSuite::Aes256Gcm);
        c.write(10 * BS + 5, b"end").unwrap();
        assert_eq!(c.read(0, 10).unwrap(), vec![0u8; 10]);
        assert_eq!(c.read(10 * BS + 5, 3).unwrap(), b"end");
        let key = Arc::clone(&c.contents_key);
        drop(c);
        let fd = rustix::fs::open(d.path().join("f"), OFlags::RDWR, Mode::empty()).unwrap();
        let c2 = Content::open(fd, CipherSuite::Aes256Gcm, key).unwrap();
        assert_eq!(c2.size(), 10 * BS + 8);
        assert_eq!(c2.read(10 * BS, 8).unwrap(), b"\0\0\0\0\0end");
    }

    /// `zero_range` against a model, both suites: whole blocks in the range become holes on
    /// disk (all-zero on-disk blocks, punched out of the backing file), the edges and a partial
    /// last block are rewritten as real ciphertext, the size never changes, and a reopen reads
    /// the same.
    #[test]
    fn zero_range_punches_whole_blocks_and_rewrites_edges() {
        for suite in [CipherSuite::Aes256Gcm, CipherSuite::Aes256Xts] {
            let (d, mut c) = new_content(suite);
            let mut rnd = xorshift(0x05ee_d0fa_1100);
            let mut model: Vec<u8> = (0..6 * BS + 777).map(|_| rnd(255) as u8 + 1).collect();
            c.write(0, &model).unwrap();
            for (off, len) in [
                (10, 20),
                (BS - 5, 10),
                (BS, 2 * BS),
                (3 * BS + 1, 2 * BS),
                (5 * BS + 3, 10 * BS),
                (50 * BS, BS),
            ] {
                c.zero_range(off, len).unwrap();
                let end = ((off + len) as usize).min(model.len());
                if (off as usize) < end {
                    model[off as usize..end].fill(0);
                }
                assert_eq!(c.size(), model.len() as u64, "{suite:?} {off}+{len}: size");
                assert_eq!(
                    c.read(0, model.len()).unwrap(),
                    model,
                    "{suite:?} {off}+{len}"
                );
            }
            let layout = Layout::new(suite.overhead());
            let disk = std::fs::read(d.path().join("f")).unwrap();
            let on_disk = |b: u64| {
                let at = layout.block_offset(b) as usize;
                &disk[at..(at + layout.disk_block() as usize).min(disk.len())]
            };
            for b in [1, 2] {
                assert!(
                    on_disk(b).iter().all(|&x| x == 0),
                    "{suite:?}: block {b} is not a hole"
                );
            }
            // The partial last block, zeroed, is still ciphertext (never a hole).
            assert!(on_disk(6).iter().any(|&x| x != 0), "{suite:?}: last block");
            let fd = rustix::fs::open(d.path().join("f"), OFlags::RDWR, Mode::empty()).unwrap();
            let key = Arc::clone(&c.contents_key);
            let c2 = Content::open(fd, suite, key).unwrap();
            assert_eq!(
                c2.read(0, model.len() + 5).unwrap(),
                model,
                "{suite:?}: reopened"
            );
        }
    }

    #[test]
    fn corruption_is_an_error() {
        let (d, mut c) = new_content(CipherSuite::Aes256Gcm);
        c.write(0, &vec![7u8; 3 * BLOCK_SIZE]).unwrap();
        // Flip a byte in block 1 through a second descriptor.
        let f = rustix::fs::open(d.path().join("f"), OFlags::RDWR, Mode::empty()).unwrap();
        let off = Layout::new(28).block_offset(1) + 100;
        let mut b = [0u8; 1];
        rustix::io::pread(&f, &mut b[..], off).unwrap();
        b[0] ^= 0x40;
        rustix::io::pwrite(&f, &b, off).unwrap();
        assert!(matches!(
            c.read(BS, 10),
            Err(ContentError::Auth { block: 1 })
        ));
        assert_eq!(c.read(0, 10).unwrap(), vec![7u8; 10]);
        assert!(c.read(0, 3 * BLOCK_SIZE).is_err());
    }
}
