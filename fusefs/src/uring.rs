//! FUSE over io_uring (Linux 6.14+, `fuse.enable_uring=Y`): requests are served on the CPU
//! that made them.
//!
//! Over `/dev/fuse` every request wakes whichever daemon thread has waited longest, usually on
//! the other CPU; in a VM that wake is an inter-processor interrupt and a VM exit, and it made
//! up most of the 25-31 µs a metadata request cost here (14 µs when caller and daemon shared a
//! CPU). Over io_uring the kernel keeps one queue per possible CPU and hands a request to an
//! entry of the queue of the CPU the caller runs on. vaultfs registers `per_queue` entries per
//! queue, each owned by its own thread pinned to that CPU, so the caller's CPU goes straight from
//! the caller to the thread and back, and a slow request (an fsync, a cold read) holds up only
//! its own thread.
//!
//! Each thread has its own ring (`IORING_SETUP_SQE128`) and one entry: a 288-byte header buffer
//! (`struct fuse_uring_req_header`) and a payload buffer of the connection's largest request.
//! `REGISTER` gives the kernel the entry; each completion carries one request; the reply goes
//! back in the same buffers with `COMMIT_AND_FETCH`, which also asks for the next request.
//! FORGET, INTERRUPT and notifications stay on `/dev/fuse`, which fuser keeps serving.
//!
//! Everything that can fail (ring set-up, buffers) happens before the mount's INIT is answered:
//! once the kernel has been told "io_uring", it holds every request until all queues are
//! registered.
#![allow(unsafe_code)]

use crate::idle_commit::{self, IdleCommit, Moves};
use crate::wire::{self, Dispatcher, InHeader, IN_HEADER_LEN, SMALL_REPLY_MAX};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use tracing::{debug, error, warn};

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `struct fuse_uring_req_header`: in/out header (128), op struct (128), entry info (32).
const HEADER_BUF: usize = 288;
const OP_IN: usize = 128;
const OP_IN_MAX: usize = 128;
const ENT_IN_OUT: usize = 256;
/// Names and xattr names are at most 256 bytes with their NUL; the variable part of a request
/// with a large reply is copied aside before the reply is written over it.
const SMALL_REQUEST_MAX: usize = 1024;
/// READs and WRITEs from this size on are served away from the queue's CPU.
const LARGE: u32 = 128 << 10;
/// How long a thread that served a large request waits for the next one before going home.
const AWAY_LINGER: std::time::Duration = std::time::Duration::from_millis(2);

/// The module parameter that lets the kernel offer io_uring to FUSE servers.
pub const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether the running kernel will offer FUSE over io_uring at the next mount.
pub fn enabled_in_kernel() -> bool {
    std::fs::read_to_string(PARAM).is_ok_and(|v| v.trim() == "Y")
}

/// `num_possible_cpus()`: the kernel has one queue per possible CPU, and the ring is used only
/// once every queue has an entry. Parsed from "0-1", "0", "0-3,6-7".
pub fn possible_cpus() -> std::io::Result<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    parse_cpu_list(s.trim()).ok_or_else(|| std::io::Error::other(format!("cpu list {s:?}")))
}

fn parse_cpu_list(s: &str) -> Option<usize> {
    s.split(',')
        .map(|r| {
            let last = r.rsplit('-').next()?;
            last.trim().parse::<usize>().ok().map(|n| n + 1)
        })
        .try_fold(0, |m, n| n.map(|n| m.max(n)))
        .filter(|&n| n > 0)
}

/// One entry: its ring, its buffers (allocated once, never freed: the kernel may write into
/// them until the ring is torn down, which is at the end of the process) and the iovec pair
/// handed to REGISTER.
struct Entry {
    qid: u16,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    header: *mut u8,
    payload: *mut u8,
    payload_len: usize,
    iov: *const libc::iovec,
    idle: IdleCommit,
    moves: Arc<Moves>,
}

// The pointers are to leaked heap buffers that only this entry's thread touches.
unsafe impl Send for Entry {}

/// The rings and buffers, made before the mount is answered.
pub struct Rings {
    entries: Vec<Entry>,
}

impl Rings {
    /// `queues` × `per_queue` entries with payload buffers of `payload_len` bytes.
    pub fn create(queues: usize, per_queue: usize, payload_len: usize) -> std::io::Result<Rings> {
        let mut entries = Vec::with_capacity(queues * per_queue);
        let idle = idle_commit::available();
        debug!(
            "idle-priority commits: {}",
            if idle { "on" } else { "not allowed here" }
        );
        let moves = Arc::new(Moves::default());
        for q in 0..queues {
            let qid = u16::try_from(q).map_err(std::io::Error::other)?;
            for _ in 0..per_queue {
                let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(2)?;
                let header = Box::leak(vec![0u8; HEADER_BUF].into_boxed_slice()).as_mut_ptr();
                let payload = Box::leak(vec![0u8; payload_len].into_boxed_slice()).as_mut_ptr();
                let iov: &'static [libc::iovec; 2] = Box::leak(Box::new([
                    libc::iovec {
                        iov_base: header.cast(),
                        iov_len: HEADER_BUF,
                    },
                    libc::iovec {
                        iov_base: payload.cast(),
                        iov_len: payload_len,
                    },
                ]));
                entries.push(Entry {
                    qid,
                    ring,
                    header,
                    payload,
                    payload_len,
                    iov: iov.as_ptr(),
                    idle: IdleCommit::new(idle),
                    moves: moves.clone(),
                });
            }
        }
        Ok(Rings { entries })
    }

    /// Starts one thread per entry on the connection `fuse` (a duplicate of the session's
    /// `/dev/fuse` descriptor). Called after the INIT reply, which had the io_uring flag.
    /// Returns once every thread runs under its name and has sent its REGISTER to the kernel,
    /// so that a mount reported ready is served by all its rings.
    pub fn start(self, fuse: OwnedFd, dispatcher: Arc<Dispatcher>) -> std::io::Result<()> {
        let fuse = Arc::new(fuse);
        let (started, up) = std::sync::mpsc::channel();
        let n = self.entries.len();
        for (i, e) in self.entries.into_iter().enumerate() {
            let fuse = fuse.clone();
            let d = dispatcher.clone();
            let started = started.clone();
            std::thread::Builder::new()
                .name(format!("ring-{}-{i}", e.qid))
                .spawn(move || e.run(&fuse, &d, started))?;
        }
        drop(started);
        for _ in 0..n {
            // A thread that fails before sending has already ended the process (`fatal`).
            up.recv()
                .map_err(|_| std::io::Error::other("an io_uring thread ended at start"))?;
        }
        Ok(())
    }
}

/// `struct fuse_uring_cmd_req` in the SQE's 80-byte command area.
fn cmd_req(qid: u16, commit_id: u64) -> [u8; 80] {
    let mut c = [0u8; 80];
    c[8..16].copy_from_slice(&commit_id.to_le_bytes());
    c[16..18].copy_from_slice(&qid.to_le_bytes());
    c
}

impl Entry {
    fn run(mut self, fuse: &OwnedFd, d: &Dispatcher, started: std::sync::mpsc::Sender<()>) {
        let home = usize::from(self.qid);
        if !set_cpus(|c| c == home) {
            // A possible CPU that is offline: its queue still needs an entry (the ring is used
            // only when every queue has one), but no caller runs there.
            debug!("io_uring queue {home}: CPU {home} is offline; thread not pinned");
        }
        let fd = types::Fd(fuse.as_raw_fd());
        if let Err(e) = self.submit(self.register_sqe(fd)) {
            fatal(self.qid, format_args!("register: {e}"));
        }
        match self.ring.submit() {
            // Interrupted: the SQE stays queued and goes with the first wait below.
            Err(e) if e.raw_os_error() != Some(libc::EINTR) => {
                fatal(self.qid, format_args!("register: {e}"))
            }
            _ => {}
        }
        // The receiver is gone only if `start` already failed; nothing to tell then.
        let _ = started.send(());
        let mut registered = false;
        // Whether this thread is away from its queue's CPU, and whether the request it just
        // served was a large one.
        let mut away = false;
        let mut large = false;
        loop {
            if away && !large {
                // A small request after large ones: home at once (else a steady flow of small
                // requests, each within the linger of the last, would keep the thread away).
                set_cpus(|c| c == home);
                away = false;
            }
            if away {
                // Send the commit from there and wait there a little for the next request:
                // a stream's next large request comes within a fraction of a millisecond.
                // If none comes, go home before waiting on, so that the next wake-up is on the
                // caller's CPU.
                let linger = types::Timespec::from(AWAY_LINGER);
                let args = types::SubmitArgs::new().timespec(&linger);
                match self.ring.submitter().submit_with_args(1, &args) {
                    Ok(_) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                    Err(e) => {
                        fatal(self.qid, format_args!("{e}"));
                    }
                }
                if self.ring.completion().is_empty() {
                    set_cpus(|c| c == home);
                    away = false;
                }
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    fatal(self.qid, format_args!("{e}"));
                }
            }
            let Some(cqe) = self.ring.completion().next() else {
                continue;
            };
            match cqe.result() {
                0 => {}
                r if !registered && (r == -libc::EAGAIN || r == -libc::EINTR) => {
                    if let Err(e) = self.submit(self.register_sqe(fd)) {
                        fatal(self.qid, format_args!("register: {e}"));
                    }
                    continue;
                }
                r if r == -libc::ENOTCONN => {
                    debug!("io_uring queue {}: connection closed", self.qid);
                    return;
                }
                // A refused REGISTER makes the kernel drop io_uring for the connection and
                // send everything over /dev/fuse, which fuser serves.
                r if !registered => {
                    warn!(
                        "io_uring queue {}: register refused ({}); serving over /dev/fuse",
                        self.qid,
                        std::io::Error::from_raw_os_error(-r)
                    );
                    return;
                }
                r => fatal(
                    self.qid,
                    format_args!("{}", std::io::Error::from_raw_os_error(-r)),
                ),
            }
            registered = true;
            // Large reads and writes are bulk work, not latency: let the scheduler spread them
            // over every CPU. Pinned, all of a sequential read's read-ahead, queued here, had
            // one CPU (measured: cold 1 GiB read at 1.0-1.25x gocryptfs instead of 1.5-2x);
            // moved to the other CPUs only, the caller's CPU sat idle (about the same).
            large = self.large_request();
            let idle = !large && !away && self.idle_commit_request();
            if large && !away && set_cpus(|_| true) {
                away = true;
            }
            let commit_id = self.serve(d);
            let sqe = opcode::UringCmd80::new(fd, CMD_COMMIT_AND_FETCH)
                .cmd(cmd_req(self.qid, commit_id))
                .build();
            if let Err(e) = self.submit(sqe) {
                fatal(self.qid, format_args!("commit: {e}"));
            }
            if idle {
                // The commit on its own (see idle_commit); the wait for the next request is
                // at normal priority at the top of the loop.
                let ring = &self.ring;
                match self.idle.run(true, || ring.submit()) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => fatal(self.qid, format_args!("commit: {e}")),
                }
            }
        }
    }

    /// Whether the reply to the request in the buffers is to be committed at idle priority
    /// (see idle_commit): its caller waits for it, and callers are being moved between CPUs.
    fn idle_commit_request(&self) -> bool {
        // SAFETY: see `submit`; read between the CQE and the next submission.
        let header = unsafe { std::slice::from_raw_parts(self.header, IN_HEADER_LEN) };
        let word = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        // fuse_in_header: opcode at 4, the calling thread's pid at 32.
        let (opcode, pid) = (word(4), word(32));
        // Nobody waits on these: write-back and read-ahead come from the kernel's own
        // threads, RELEASE is sent in the background, and an fsync's wait is the disk's.
        let background = matches!(
            opcode,
            wire::op::WRITE
                | wire::op::RELEASE
                | wire::op::RELEASEDIR
                | wire::op::FSYNC
                | wire::op::FSYNCDIR
                | wire::op::FORGET
                | wire::op::BATCH_FORGET
                | wire::op::DESTROY
        );
        !background && self.moves.note(pid, self.qid)
    }

    /// Whether the request in the buffers is a READ or WRITE of at least `LARGE` bytes.
    fn large_request(&self) -> bool {
        // SAFETY: see `submit`; read between the CQE and the next submission.
        let header = unsafe { std::slice::from_raw_parts(self.header, OP_IN + 24) };
        let opcode = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        // fuse_read_in and fuse_write_in both have `size` at offset 16.
        let size = &header[OP_IN + 16..OP_IN + 20];
        let size = u32::from_le_bytes([size[0], size[1], size[2], size[3]]);
        matches!(opcode, wire::op::READ | wire::op::WRITE) && size >= LARGE
    }

    fn register_sqe(&self, fd: types::Fd) -> squeue::Entry128 {
        let sqe = opcode::UringCmd80::new(fd, CMD_REGISTER)
            .cmd(cmd_req(self.qid, 0))
            .addr(Some(self.iov as u64))
            .build();
        with_len(sqe, 2)
    }

    fn submit(&mut self, sqe: squeue::Entry128) -> std::io::Result<()> {
        // SAFETY: the buffers the SQE points to (iovecs, header, payload) are leaked, so they
        // outlive the ring; only this thread reads or writes them, and only between a CQE and
        // the next submission, while the kernel does not own them.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| std::io::Error::other("submission queue full"))
    }

    /// Serves the request now in the buffers; returns its commit id.
    fn serve(&mut self, d: &Dispatcher) -> u64 {
        // SAFETY: see `submit`; the kernel is done with the buffers until the next submission.
        let header = unsafe { std::slice::from_raw_parts_mut(self.header, HEADER_BUF) };
        let payload = unsafe { std::slice::from_raw_parts_mut(self.payload, self.payload_len) };
        // struct fuse_uring_ent_in_out: flags (u64), commit_id (u64), payload_sz (u32).
        let field = |at: usize, n: usize| {
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(&header[ENT_IN_OUT + at..ENT_IN_OUT + at + n]);
            u64::from_le_bytes(b)
        };
        let commit_id = field(8, 8);
        let payload_sz = field(16, 4) as usize;
        let h = InHeader::parse(&header[..IN_HEADER_LEN]);
        let mut arg = [0u8; OP_IN_MAX];
        let result = match h {
            Some(h) if payload_sz <= payload.len() => {
                // The op struct's length is what is left of the request's length.
                let op_len = (h.len as usize)
                    .checked_sub(IN_HEADER_LEN + payload_sz)
                    .filter(|&n| n <= OP_IN_MAX);
                match op_len {
                    Some(n) => {
                        arg[..n].copy_from_slice(&header[OP_IN..OP_IN + n]);
                        // A panic must not take the queue's thread with it.
                        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            serve_one(d, &h, &arg[..n], payload, payload_sz)
                        }));
                        served.unwrap_or_else(|_| {
                            error!("request {} (opcode {}) panicked", h.unique, h.opcode);
                            Err(libc::EIO)
                        })
                    }
                    None => Err(libc::EIO),
                }
            }
            _ => Err(libc::EIO),
        };
        let unique = h.map_or(0, |h| h.unique);
        let (error, body) = match result {
            Ok(n) => (0, n),
            Err(e) => (-e, 0),
        };
        header[0..4].copy_from_slice(&((16 + body) as u32).to_le_bytes());
        header[4..8].copy_from_slice(&error.to_le_bytes());
        header[8..16].copy_from_slice(&unique.to_le_bytes());
        header[ENT_IN_OUT + 16..ENT_IN_OUT + 20].copy_from_slice(&(body as u32).to_le_bytes());
        commit_id
    }
}

/// A queue that loses its thread would leave the callers on its CPU waiting forever; ending the
/// process instead ends the connection, and they get `ENOTCONN`.
fn fatal(qid: u16, what: std::fmt::Arguments) -> ! {
    error!("io_uring queue {qid}: {what}; ending the mount");
    std::process::exit(1)
}

/// Serves one request whose variable part is `payload[..sz]`; the reply body ends up at the
/// start of `payload`.
fn serve_one(
    d: &Dispatcher,
    h: &InHeader,
    arg: &[u8],
    payload: &mut [u8],
    sz: usize,
) -> Result<usize, i32> {
    if wire::large_reply(h.opcode) {
        // The reply is written over the request: keep its (short) variable part aside.
        if sz > SMALL_REQUEST_MAX {
            return Err(libc::EINVAL);
        }
        let mut rest = [0u8; SMALL_REQUEST_MAX];
        rest[..sz].copy_from_slice(&payload[..sz]);
        d.serve(h, arg, &rest[..sz], payload)
    } else {
        let mut out = [0u8; SMALL_REPLY_MAX];
        let n = d.serve(h, arg, &payload[..sz], &mut out)?;
        payload[..n].copy_from_slice(&out[..n]);
        Ok(n)
    }
}

/// Sets the SQE's `len` (the iovec count REGISTER requires), which io-uring's `UringCmd80`
/// builder does not expose.
fn with_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    // SAFETY: `Entry128` is `#[repr(C)]`: an `io_uring_sqe` (64 bytes, `len` at offset 24)
    // followed by 64 bytes of command data, no padding; every bit pattern is valid.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&len.to_ne_bytes());
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

/// Lets this thread run on the CPUs `wanted` picks (the kernel moves it at once if it is on
/// another); false if there is no such CPU online.
fn set_cpus(wanted: impl Fn(usize) -> bool) -> bool {
    use rustix::thread::CpuSet;
    let mut set = CpuSet::new();
    for cpu in (0..CpuSet::MAX_CPU).filter(|&c| wanted(c)) {
        set.set(cpu);
    }
    rustix::thread::sched_setaffinity(None, &set).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-1"), Some(2));
        assert_eq!(parse_cpu_list("0-3,6-7"), Some(8));
        assert_eq!(parse_cpu_list("0,2"), Some(3));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn register_sqe_carries_two_iovecs() {
        let sqe = opcode::UringCmd80::new(types::Fd(5), CMD_REGISTER)
            .cmd(cmd_req(3, 0))
            .addr(Some(0x1000))
            .build();
        let raw: [u8; 128] = unsafe { std::mem::transmute(with_len(sqe, 2)) };
        assert_eq!(raw[0], 46); // IORING_OP_URING_CMD
        assert_eq!(&raw[4..8], &5i32.to_ne_bytes()); // fd
        assert_eq!(&raw[8..12], &CMD_REGISTER.to_ne_bytes()); // cmd_op
        assert_eq!(&raw[16..24], &0x1000u64.to_ne_bytes()); // addr
        assert_eq!(&raw[24..28], &2u32.to_ne_bytes()); // len
        assert_eq!(&raw[48 + 16..48 + 18], &3u16.to_le_bytes()); // qid in the command
    }
}
