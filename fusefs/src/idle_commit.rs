//! Committing a reply at idle priority, so that the woken caller stays on its CPU.
//!
//! A queue thread commits its reply while it still runs on the caller's CPU. The reply wakes the
//! caller, and the scheduler's wake-up placement (`select_idle_sibling`) looks for an idle CPU
//! to put it on: the caller's own CPU is busy (with the queue thread), so when the other vCPU is
//! idle the caller is moved there. Its next request then goes to that CPU's queue, and the next
//! reply moves it back. Each move wakes an idle vCPU (an IPI and, in a VM, a VM exit): 50-55 µs
//! per 4 KiB read against 19 µs when the caller stays (sched_switch traces, PERFORMANCE.md), and
//! a `link` + `unlink` loop ran at 95-120 µs per call against 47-73 µs.
//!
//! A CPU whose only runnable work is `SCHED_IDLE` counts as idle to that placement
//! (`sched_idle_cpu`). So for requests whose caller waits for the reply, the thread switches
//! itself to `SCHED_IDLE` just for the `io_uring_enter` that commits the reply, and back to
//! `SCHED_OTHER` right after it. The caller is woken on its own CPU, preempts the queue thread at
//! once, and the thread finishes its system call when the caller next waits.
//!
//! When it is used:
//! - Only while callers are actually being moved. [`Moves`] remembers, per calling thread (the
//!   request header's pid), the queue (= CPU) of its last request; when at least a quarter of a
//!   window of requests arrive on another CPU than their caller's previous one, idle commits go
//!   on for `ON_FOR`, after which a window without them measures again. Where callers stay put
//!   anyway (the other CPU busy, e.g. `rm -rf` with the kernel's FORGETs being served there:
//!   1 % of requests moved) the extra system calls would only cost: 10-15 % on rm -rf, untar
//!   and stat-all when it was on for every request.
//! - Not on a busy CPU: a commit window longer than `CONTENDED` means other work was queued on
//!   the CPU (and the caller had no idle CPU to be moved to anyway); the thread then commits
//!   normally for `BACK_OFF`.
//!
//! What it costs, and the guards:
//! - Two `sched_setscheduler` calls and one more `io_uring_enter` per such request (the commit
//!   is submitted on its own, not together with the wait for the next request, so the thread
//!   never sleeps or waits for a request at idle priority).
//! - While it is `SCHED_IDLE` the thread holds no lock and has nothing left to do but return
//!   from the system call. Under EEVDF the CPU time an idle-weight thread owes grows with the
//!   little it runs there (a few µs), so even behind CPU-bound tasks it is back within
//!   milliseconds (measured: 4 CPU hogs on the reader's CPU, worst read 5.4-7.7 ms against
//!   5.4 ms without this; PERFORMANCE.md).
//! - It is used only where leaving `SCHED_IDLE` is allowed (root, `CAP_SYS_NICE`, or a
//!   `RLIMIT_NICE` of 20): [`available`] tries it on a short-lived thread first, so a queue
//!   thread can never be left at idle priority.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// A commit window longer than this means the thread waited for the CPU behind other work.
const CONTENDED: Duration = Duration::from_micros(200);
/// How long to commit normally after a contended window.
const BACK_OFF: Duration = Duration::from_millis(100);
/// Requests per measuring window of [`Moves`].
const WINDOW: u32 = 64;
/// How long idle commits stay on once a window has seen callers moved.
const ON_FOR: Duration = Duration::from_millis(100);
/// Calling threads remembered (by pid modulo this; a collision only loses one observation).
const SLOTS: usize = 256;

/// Whether callers are being moved between CPUs, shared by all queue threads of a mount.
pub struct Moves {
    /// Per slot: the pid of the last caller seen there (high 32 bits) and its CPU.
    last: Box<[AtomicU64]>,
    requests: AtomicU32,
    moved: AtomicU32,
    /// Milliseconds since `start` until which idle commits are on.
    on_until: AtomicU64,
    start: Instant,
}

impl Default for Moves {
    fn default() -> Self {
        Moves {
            last: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            requests: AtomicU32::new(0),
            moved: AtomicU32::new(0),
            on_until: AtomicU64::new(0),
            start: Instant::now(),
        }
    }
}

impl Moves {
    /// Notes a request from thread `pid` on `cpu`'s queue, one whose caller waits for the reply;
    /// returns whether its reply should be committed at idle priority. The counters are shared
    /// without locks; a lost update only shifts a window by a request.
    pub fn note(&self, pid: u32, cpu: u16) -> bool {
        let now = self.start.elapsed().as_millis() as u64;
        let seen = (u64::from(pid) << 32) | u64::from(cpu);
        let before = self.last[pid as usize % SLOTS].swap(seen, Relaxed);
        if now < self.on_until.load(Relaxed) {
            return true;
        }
        let moved = pid != 0 && before >> 32 == u64::from(pid) && before != seen;
        let moved = if moved {
            self.moved.fetch_add(1, Relaxed) + 1
        } else {
            self.moved.load(Relaxed)
        };
        let requests = self.requests.fetch_add(1, Relaxed) + 1;
        if requests < WINDOW {
            return false;
        }
        self.requests.store(0, Relaxed);
        self.moved.store(0, Relaxed);
        let on = moved * 4 >= requests;
        if on {
            self.on_until
                .store(now + ON_FOR.as_millis() as u64, Relaxed);
        }
        on
    }
}

fn set_policy(policy: libc::c_int) -> bool {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain system call on the calling thread (pid 0) with a valid parameter.
    unsafe { libc::sched_setscheduler(0, policy, &p) == 0 }
}

/// Whether a thread of this process may go to `SCHED_IDLE` and come back; tried on a thread of
/// its own, which is thrown away whatever the outcome.
pub fn available() -> bool {
    std::thread::spawn(|| set_policy(libc::SCHED_IDLE) && set_policy(libc::SCHED_OTHER))
        .join()
        .unwrap_or(false)
}

/// Per queue thread: whether its commits currently go at idle priority.
pub struct IdleCommit {
    enabled: bool,
    off_until: Option<Instant>,
}

impl IdleCommit {
    pub fn new(enabled: bool) -> IdleCommit {
        IdleCommit {
            enabled,
            off_until: None,
        }
    }

    /// Runs `commit` (the system call that sends the reply) at idle priority when `wanted` and
    /// the CPU has not been found busy lately; otherwise runs it as is.
    pub fn run<T>(&mut self, wanted: bool, commit: impl FnOnce() -> T) -> T {
        if !wanted || !self.enabled {
            return commit();
        }
        if let Some(t) = self.off_until {
            if Instant::now() < t {
                return commit();
            }
            self.off_until = None;
        }
        let start = Instant::now();
        if !set_policy(libc::SCHED_IDLE) {
            self.enabled = false;
            return commit();
        }
        let r = commit();
        if !set_policy(libc::SCHED_OTHER) {
            // `available` said this works; if it stops working (an rlimit changed from outside),
            // a queue thread must not stay at idle priority: end the mount instead.
            tracing::error!("cannot return a queue thread to normal priority; ending the mount");
            std::process::exit(1);
        }
        if start.elapsed() > CONTENDED {
            self.off_until = Some(Instant::now() + BACK_OFF);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's scheduling policy.
    fn policy() -> libc::c_int {
        // SAFETY: plain system call on the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn a_commit_window_ends_at_normal_priority() {
        if !available() {
            // Not root and no RLIMIT_NICE of 20: the switch is never used then (CI runs as root).
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "SCHED_IDLE not allowed"
            );
            return;
        }
        let mut ic = IdleCommit::new(true);
        let inside = ic.run(true, policy);
        assert_eq!(inside, libc::SCHED_IDLE);
        assert_eq!(policy(), libc::SCHED_OTHER);
        // Not wanted: the policy is left alone.
        assert_eq!(ic.run(false, policy), libc::SCHED_OTHER);
    }

    #[test]
    fn a_slow_window_backs_off() {
        let mut ic = IdleCommit::new(true);
        ic.run(true, || std::thread::sleep(CONTENDED * 2));
        assert!(ic.off_until.is_some());
        assert_eq!(ic.run(true, policy), libc::SCHED_OTHER);
        // Once the back-off is over, windows are idle again.
        ic.off_until = Some(Instant::now());
        assert_eq!(ic.run(true, policy), libc::SCHED_IDLE);
        assert_eq!(policy(), libc::SCHED_OTHER);
    }

    #[test]
    fn moves_turn_idle_commits_on_for_a_while() {
        let m = Moves::default();
        // One caller that stays on CPU 0: never on.
        assert!((0..3 * WINDOW).all(|_| !m.note(7, 0)));
        // Callers that alternate between CPUs: on by the end of the window.
        let on: Vec<bool> = (0..WINDOW).map(|i| m.note(8, (i % 2) as u16)).collect();
        assert!(!on[0] && on[WINDOW as usize - 1], "{on:?}");
        // Then on for everyone, without counting, until `ON_FOR` has passed.
        assert!(m.note(7, 0) && m.note(9, 1));
        m.on_until.store(0, Relaxed);
        assert!((0..2 * WINDOW).all(|_| !m.note(7, 0)));
        // Half of a window moved turns it on; one request in eight does not.
        let window = |moving: u32| {
            let mut on = false;
            for i in 0..WINDOW {
                let pid = 100 + i;
                if i < moving {
                    on |= m.note(pid, 1); // seen before on CPU 0 below
                }
                on |= m.note(pid, 0);
            }
            on
        };
        // Prime: every pid last seen on CPU 0.
        for pid in 100..100 + WINDOW {
            m.note(pid, 0);
        }
        m.on_until.store(0, Relaxed);
        m.requests.store(0, Relaxed);
        m.moved.store(0, Relaxed);
        assert!(!window(WINDOW / 16));
        m.on_until.store(0, Relaxed);
        m.requests.store(0, Relaxed);
        m.moved.store(0, Relaxed);
        assert!(window(WINDOW / 4));
    }

    #[test]
    fn disabled_commits_normally() {
        let mut ic = IdleCommit::new(false);
        assert_eq!(ic.run(true, policy), libc::SCHED_OTHER);
    }
}
