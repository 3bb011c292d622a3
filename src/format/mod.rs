//! Every byte vaultfs writes to disk is defined here (see docs/FORMAT.md): the metadata file, the
//! per-file header and the block layout.

pub mod blocks;
pub mod header;
pub mod meta;

/// Plaintext bytes per content block.
pub const BLOCK_SIZE: usize = 4096;
/// The on-disk format version this build writes and the only one it reads.
pub const FORMAT_VERSION: u16 = 1;

/// Name of the metadata file in the root of the ciphertext directory.
pub const META_FILE: &str = "vaultfs.conf";
/// Name of the per-directory name-encryption IV file.
pub const DIRIV_FILE: &str = "vaultfs.diriv";
/// Length of a directory IV.
pub const DIRIV_LEN: usize = 16;
/// Every backing name starting with this prefix belongs to vaultfs itself and is never a user
/// entry (encrypted names use the base64url alphabet, which has no '.').
pub const RESERVED_PREFIX: &str = "vaultfs.";

pub use blocks::Layout;
pub use header::{FileHeader, HEADER_LEN};
