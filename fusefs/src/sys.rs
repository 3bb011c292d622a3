//! The crate's only unsafe code: process-level calls with no safe wrapper.
#![allow(unsafe_code)]

/// Result of [`fork`].
pub enum Forked {
    Parent,
    Child,
}

/// Forks the process. Must be called while the process has a single thread (before the FUSE
/// session or any other thread starts), so the child's copy of every lock is unlocked.
pub fn fork() -> std::io::Result<Forked> {
    // SAFETY: called only from `main` before any thread is spawned (see the doc comment), so the
    // child inherits no lock held by another thread; both sides continue with ordinary Rust code.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(std::io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        _ => Ok(Forked::Parent),
    }
}
