//! Directory read-ahead: after a listing, the subdirectories it found are read ahead in the
//! background (their IV file, their entries and the entries' inodes), because a tree walk
//! (`ls -lR`, `find`, `du`, `rm -rf`, a backup) lists them next.
//!
//! Without it a cold walk waits on the disk in turn for each directory's blocks, its IV file
//! and its inode table blocks, one request at a time; with it those reads are already under way,
//! or done, by the time the walk asks. It only warms the backing file system's caches and
//! fills a directory's IV cache: nothing it does changes what any request returns.
//!
//! The jobs are kept as a stack of batches, one batch per listing, taken newest batch first and
//! in listing order within a batch: a depth-first walk wants the subdirectories of the
//! directory it listed last, in the order it will visit them. What waits is bounded
//! ([`MAX_PENDING`]); the oldest batches are dropped first: a depth-first walk reaches them
//! last, and by then its newer listings will have queued more.

use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::Arc;

/// Jobs that may wait at most; beyond, the oldest batches are dropped.
const MAX_PENDING: usize = 1024;

/// Background threads doing the reads: several disk reads in flight while the walk itself
/// waits for one (two threads gained a third as much on a cold stat of a tree).
const THREADS: usize = 4;

pub type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    batches: Vec<VecDeque<Job>>,
    pending: usize,
    started: bool,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    ready: Condvar,
}

/// The read-ahead queue of one mount. Dropping it stops its threads (after their current job).
#[derive(Default)]
pub struct Statahead {
    shared: Arc<Shared>,
}

/// A way for a job to queue further jobs (it does not keep the threads alive).
#[derive(Clone)]
pub struct Queue(std::sync::Weak<Shared>);

impl Queue {
    pub fn push(&self, jobs: Vec<Job>) {
        if let Some(shared) = self.0.upgrade() {
            push(&shared, jobs);
        }
    }
}

impl Statahead {
    /// Queues one listing's jobs as a batch, ahead of every earlier batch. The threads are
    /// started at the first batch, so a mount that is never listed has none.
    pub fn push(&self, jobs: Vec<Job>) {
        push(&self.shared, jobs);
    }

    pub fn queue(&self) -> Queue {
        Queue(Arc::downgrade(&self.shared))
    }

    /// Jobs waiting (for tests).
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.shared.state.lock().pending
    }
}

/// Queues `jobs` as the newest batch (see [`Statahead::push`]).
fn push(shared: &Arc<Shared>, jobs: Vec<Job>) {
    if jobs.is_empty() {
        return;
    }
    let mut st = shared.state.lock();
    if st.closed {
        return;
    }
    // Wake as many idle threads as there are new jobs: a worker does not wake another.
    let wake = jobs.len().min(THREADS);
    st.pending += jobs.len();
    st.batches.push(jobs.into());
    while st.pending > MAX_PENDING && st.batches.len() > 1 {
        let old = st.batches.remove(0);
        st.pending -= old.len();
    }
    if !st.started {
        st.started = true;
        for i in 0..THREADS {
            let shared = Arc::clone(shared);
            let spawned = std::thread::Builder::new()
                .name(format!("statahead-{i}"))
                .spawn(move || worker(&shared));
            if spawned.is_err() {
                // Read-ahead is optional: without threads the jobs are never run.
                st.batches.clear();
                st.pending = 0;
                st.closed = true;
                return;
            }
        }
    }
    drop(st);
    for _ in 0..wake {
        shared.ready.notify_one();
    }
}

impl Drop for Statahead {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock();
        st.closed = true;
        st.batches.clear();
        st.pending = 0;
        drop(st);
        self.shared.ready.notify_all();
    }
}

fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut st = shared.state.lock();
            loop {
                if st.closed {
                    return;
                }
                if let Some(job) = take(&mut st) {
                    break job;
                }
                shared.ready.wait(&mut st);
            }
        };
        // A job that panics must not take its thread with it (jobs only fill caches).
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

/// The next job: the first of the newest batch.
fn take(st: &mut State) -> Option<Job> {
    while let Some(top) = st.batches.last_mut() {
        if let Some(job) = top.pop_front() {
            st.pending -= 1;
            if top.is_empty() {
                st.batches.pop();
            }
            return Some(job);
        }
        st.batches.pop();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn recorder(tx: &mpsc::Sender<u32>, id: u32) -> Job {
        let tx = tx.clone();
        Box::new(move || {
            let _ = tx.send(id);
        })
    }

    #[test]
    fn newest_batch_first_in_listing_order() {
        let mut st = State::default();
        let (tx, rx) = mpsc::channel();
        st.batches.push((1..=2).map(|i| recorder(&tx, i)).collect());
        st.batches
            .push((10..=12).map(|i| recorder(&tx, i)).collect());
        st.pending = 5;
        while let Some(job) = take(&mut st) {
            job();
        }
        drop(tx);
        assert_eq!(rx.iter().collect::<Vec<_>>(), vec![10, 11, 12, 1, 2]);
        assert_eq!(st.pending, 0);
    }

    #[test]
    fn runs_every_job_in_the_background() {
        let sa = Statahead::default();
        let (tx, rx) = mpsc::channel();
        sa.push((0..50).map(|i| recorder(&tx, i)).collect());
        sa.push((50..100).map(|i| recorder(&tx, i)).collect());
        drop(tx);
        let mut got: Vec<u32> = (0..100)
            .map(|_| rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn pending_is_bounded_by_dropping_the_oldest() {
        let sa = Statahead::default();
        // Marked started without threads, so that nothing is taken while it fills up.
        let (tx, _rx) = mpsc::channel::<u32>();
        {
            let mut st = sa.shared.state.lock();
            st.started = true; // no threads: nothing is taken
        }
        for b in 0..5u32 {
            sa.push((0..400).map(|i| recorder(&tx, b * 1000 + i)).collect());
        }
        assert!(sa.pending() <= MAX_PENDING, "{}", sa.pending());
        assert!(sa.pending() >= MAX_PENDING - 400);
        // What was dropped is the oldest batches: what remains is the newest two, newest first.
        let mut st = sa.shared.state.lock();
        while let Some(job) = take(&mut st) {
            job();
        }
        drop(st);
        drop(tx);
        let got: Vec<u32> = _rx.iter().collect();
        let want: Vec<u32> = (4000..4400).chain(3000..3400).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_later_batch_runs_on_several_threads() {
        let sa = Statahead::default();
        let (tx, rx) = mpsc::channel();
        // The first batch starts the threads; wait until it has run, so all of them are idle.
        sa.push(vec![recorder(&tx, 0)]);
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(10)), Ok(0));
        // Two jobs of one batch that can only finish together: each waits for the other.
        let met = Arc::new((Mutex::new(0u32), Condvar::new()));
        let jobs: Vec<Job> = (1..=2)
            .map(|id| {
                let (met, tx) = (Arc::clone(&met), tx.clone());
                Box::new(move || {
                    let (n, cv) = &*met;
                    let mut n = n.lock();
                    *n += 1;
                    cv.notify_all();
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                    while *n < 2 && !cv.wait_until(&mut n, deadline).timed_out() {}
                    let _ = tx.send(if *n == 2 { id } else { 100 + id });
                }) as Job
            })
            .collect();
        sa.push(jobs);
        let mut got: Vec<u32> = (0..2)
            .map(|_| rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, vec![1, 2], "100 + id: that job waited alone");
    }

    #[test]
    fn a_panicking_job_keeps_its_thread() {
        let sa = Statahead::default();
        let (tx, rx) = mpsc::channel();
        let jobs: Vec<Job> = (0..THREADS)
            .map(|_| Box::new(|| panic!("job panics (expected in this test)")) as Job)
            .collect();
        sa.push(jobs);
        sa.push((0..8).map(|i| recorder(&tx, i)).collect());
        let mut got: Vec<u32> = (0..8)
            .map(|_| rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, (0..8).collect::<Vec<_>>());
    }
}
