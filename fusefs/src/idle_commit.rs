//! Committing a reply at idle priority, so that the woken caller stays on its CPU.
//!
//! A queue thread commits its reply while it still runs on the caller's CPU. The reply wakes the
//! caller, and the scheduler's wake-up placement (`select_idle_sibling`) looks for an idle CPU
//! to put it on: the caller's own CPU is busy (with the queue thread), so when the other vCPU is
//! idle the caller is moved there. Its next request then goes to that CPU's queue, and the next
//! reply moves it back. Each move wakes an idle vCPU (an IPI and, in a VM, a VM exit): 50-55 µs
//! per 4 KiB read against 19 µs when the caller stays (sched_switch traces, PERFORMANCE.md).
//!
//! A CPU whose only runnable work is `SCHED_IDLE` counts as idle to that placement
//! (`sched_idle_cpu`). So for the requests where the caller waits on nothing but this reply and
//! comes straight back with the next one, the thread switches itself to `SCHED_IDLE` just for
//! the `io_uring_enter` that commits the reply, and back to `SCHED_OTHER` right after it. The
//! caller is woken on its own CPU, preempts the queue thread at once, and the thread finishes
//! its system call when the caller next waits.
//!
//! What it costs, and the guards:
//! - Two `sched_setscheduler` calls and one more `io_uring_enter` per such request (the commit
//!   is submitted on its own, not together with the wait for the next request, so the thread
//!   never sleeps or waits for a request at idle priority).
//! - While it is `SCHED_IDLE` the thread holds no lock and has nothing left to do but return
//!   from the system call. Under EEVDF the CPU time an idle-weight thread owes grows with the
//!   little it runs there (a few µs), so even behind CPU-bound tasks it is back within
//!   milliseconds (measured: 4 CPU hogs on the reader's CPU, worst read 7.1 ms against 5.8 ms
//!   without this; PERFORMANCE.md).
//! - On a busy CPU the gain turns into a cost (the caller has no idle CPU to be moved to
//!   anyway). A window that takes longer than `CONTENDED` means other work is queued on the
//!   CPU; the thread then commits normally for `BACK_OFF`.
//! - It is used only where leaving `SCHED_IDLE` is allowed (root, `CAP_SYS_NICE`, or a
//!   `RLIMIT_NICE` of 20): [`available`] tries it on a short-lived thread first, so a queue
//!   thread can never be left at idle priority.
#![allow(unsafe_code)]

use std::time::{Duration, Instant};

/// A commit window longer than this means the thread waited for the CPU behind other work.
const CONTENDED: Duration = Duration::from_micros(200);
/// How long to commit normally after a contended window.
const BACK_OFF: Duration = Duration::from_millis(100);

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
        assert!(available(), "the tests run as root");
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
    fn disabled_commits_normally() {
        let mut ic = IdleCommit::new(false);
        assert_eq!(ic.run(true, policy), libc::SCHED_OTHER);
    }
}
