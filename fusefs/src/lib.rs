//! vaultfs: the encrypting FUSE filesystem. `fs` holds the logic (no fuser types), `content` the
//! block I/O, `adapter` the thin fuser binding,
//! `wire` and `uring` the same binding for requests that come over io_uring.

pub mod adapter;
pub mod content;
pub mod fs;
mod idle_commit;
mod statahead;
pub mod sys;
pub mod uring;
pub mod wire;
