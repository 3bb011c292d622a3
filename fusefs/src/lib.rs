//! vaultfs: the encrypting FUSE filesystem. `fs` holds the logic (no fuser types), `content` the
//! block I/O, `adapter` the thin fuser binding.

pub mod adapter;
pub mod content;
pub mod fs;
pub mod sys;
