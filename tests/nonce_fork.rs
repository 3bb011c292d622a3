//! GCM nonces after `fork()`: a child must never draw the bytes left in its parent's nonce pool
//! (the same nonce under the same key twice breaks GCM). With the fork hook installed (as the
//! daemon does) the pools compare a fork counter instead of calling `getpid()` per block; this
//! runs a real fork to show the counter does its job.
//!
//! One test in its own binary: the child of a fork may only be trusted with what the forking
//! thread alone holds, so no other test threads run here.

// fork, pipe and pthread_atfork have no safe wrapper in our dependencies.
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use vaultfs_core::crypto::{after_fork_in_child, fork_hook_installed, ContentCipher, GcmContent};
use vaultfs_core::key::SecretKey;

const BLOCKS: usize = 8;
const NONCE: usize = 12;

/// The nonces (the first 12 bytes of each sealed block) of `BLOCKS` blocks sealed now.
fn nonces(c: &GcmContent, out: &mut [u8]) -> Vec<[u8; NONCE]> {
    let overhead = c.overhead();
    (0..BLOCKS)
        .map(|i| {
            let sealed = &mut out[..64 + overhead];
            c.seal(i as u64, &[7u8; 64], sealed).unwrap();
            sealed[..NONCE].try_into().unwrap()
        })
        .collect()
}

#[test]
fn forked_child_never_reuses_the_parents_nonces() {
    // SAFETY: registers a handler that only increments an atomic.
    assert_eq!(
        unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) },
        0
    );
    fork_hook_installed();
    let key = SecretKey::<32>::random().unwrap();
    let c = GcmContent::new(&key, [1; 16]).unwrap();
    let mut buf = vec![0u8; 4096];
    // The pool now holds bytes that both processes would hand out next without the hook.
    nonces(&c, &mut buf);
    let mut pipe = [0i32; 2];
    // SAFETY: plain system calls; the child seals into memory allocated before the fork,
    // writes the nonces and exits without unwinding.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let got = nonces(&c, &mut buf);
        let flat = got.concat();
        unsafe {
            libc::write(pipe[1], flat.as_ptr().cast(), flat.len());
            libc::_exit(0);
        }
    }
    unsafe { libc::close(pipe[1]) };
    let mut child = vec![0u8; BLOCKS * NONCE];
    let n = unsafe { libc::read(pipe[0], child.as_mut_ptr().cast(), child.len()) };
    unsafe { libc::close(pipe[0]) };
    let mut status = 0;
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert_eq!(n, child.len() as isize, "the child's nonces");
    let parent = nonces(&c, &mut buf);
    for c in child.chunks(NONCE) {
        assert!(
            !parent.iter().any(|p| p[..] == *c),
            "the child and its parent sealed with the same nonce"
        );
    }
}
