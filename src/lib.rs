//! vaultfs core library: key types, the key hierarchy, content cipher suites, the on-disk
//! format (metadata file, file header, block layout), file-name encryption and protectors.
//!
//! Layers point one way: `key` ← `kdf` ← `crypto` / `names` ← `format` ← `vault`. Nothing here
//! knows about FUSE; the `vaultfs` crate builds the filesystem on top of it.
#![forbid(unsafe_code)]

pub mod cli;
pub mod crypto;
pub mod format;
pub mod kdf;
pub mod key;
pub mod names;
pub mod protector;
pub mod protocol;
pub mod vault;

pub use crypto::{CipherError, CipherSuite, ContentCipher};
pub use key::SecretKey;
pub use vault::{Vault, VaultError};
