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

/// Takes ownership of a descriptor number passed by the parent (`--ready-fd`). Returns None if
/// it is not an open descriptor or is one of the standard streams.
pub fn inherited_fd(fd: i32) -> Option<std::fs::File> {
    use std::os::fd::FromRawFd;
    if fd <= 2 {
        return None;
    }
    // SAFETY: fcntl(F_GETFD) only queries the descriptor table; -1 means `fd` is not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return None;
    }
    // SAFETY: `fd` is open (checked above), was created for us by the parent, and nothing else in
    // this process refers to it, so the File becomes its only owner.
    Some(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Starts write-back of a byte range of `fd` without waiting for it (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`). A hint for the kernel: it promises no durability, and a failure
/// changes nothing (a later fsync reports real errors), so none is returned.
pub fn start_writeback(fd: std::os::fd::BorrowedFd<'_>, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a syscall on a descriptor the caller keeps open for the call; no memory is passed.
    unsafe {
        libc::sync_file_range(fd.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Registers the GCM nonce pools' fork-child handler, so that they tell a forked child apart
/// by a counter instead of a `getpid()` per sealed block (see
/// `vaultfs_core::crypto::fork_hook_installed`). Without it they keep checking the process ID.
pub fn install_nonce_fork_hook() {
    // SAFETY: the handler only increments an atomic, which is allowed in a fork child.
    let r = unsafe {
        libc::pthread_atfork(None, None, Some(vaultfs_core::crypto::after_fork_in_child))
    };
    if r == 0 {
        vaultfs_core::crypto::fork_hook_installed();
    }
}
