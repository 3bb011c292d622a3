//! Content cipher suites behind one trait, plus the small AEAD used for wrapped keys, symlink
//! targets and xattr values.
//!
//! Backends were chosen by measurement (docs/PERFORMANCE.md): AES-256-GCM through aws-lc-rs
//! (VAES/AVX-512 on this machine), AES-256-XTS through OpenSSL. Tests cross-check both against
//! the pure-Rust RustCrypto implementations.

mod gcm;
mod xts;

pub use gcm::{
    aead_open, aead_seal, after_fork_in_child, fork_hook_installed, GcmContent, AEAD_OVERHEAD,
};
pub use xts::XtsContent;

use crate::format::BLOCK_SIZE;
use crate::kdf;
use crate::key::SecretKey;

/// Errors of the content ciphers. Deliberately coarse: an authentication failure says nothing
/// about why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CipherError {
    #[error("authentication failed")]
    Auth,
    #[error("bad block length {0}")]
    Length(usize),
    #[error("cipher backend failure")]
    Backend,
}

/// The cipher suites of format v1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherSuite {
    Aes256Gcm,
    Aes256Xts,
}

impl CipherSuite {
    pub fn name(self) -> &'static str {
        match self {
            CipherSuite::Aes256Gcm => "aes-256-gcm",
            CipherSuite::Aes256Xts => "aes-256-xts",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "aes-256-gcm" => Some(CipherSuite::Aes256Gcm),
            "aes-256-xts" => Some(CipherSuite::Aes256Xts),
            _ => None,
        }
    }

    /// Bytes added on disk to each block.
    pub fn overhead(self) -> usize {
        match self {
            CipherSuite::Aes256Gcm => gcm::BLOCK_OVERHEAD,
            CipherSuite::Aes256Xts => 0,
        }
    }

    pub fn is_authenticated(self) -> bool {
        matches!(self, CipherSuite::Aes256Gcm)
    }

    /// The content cipher of one file: its key is derived from the vault's contents key with the
    /// file's 16-byte random ID as salt, so every file has its own key.
    pub fn file_cipher(
        self,
        contents_key: &SecretKey<32>,
        file_id: &[u8; 16],
    ) -> Result<Box<dyn ContentCipher>, CipherError> {
        match self {
            CipherSuite::Aes256Gcm => {
                let k: SecretKey<32> =
                    kdf::derive(contents_key, file_id, "vaultfs v1 file key aes-256-gcm")
                        .map_err(|_| CipherError::Backend)?;
                Ok(Box::new(GcmContent::new(&k, *file_id)?))
            }
            CipherSuite::Aes256Xts => {
                let k: SecretKey<64> =
                    kdf::derive(contents_key, file_id, "vaultfs v1 file key aes-256-xts")
                        .map_err(|_| CipherError::Backend)?;
                Ok(Box::new(XtsContent::new(&k)?))
            }
        }
    }
}

/// One file's content cipher. Blocks are at most [`BLOCK_SIZE`] bytes of plaintext; a block's
/// on-disk form is `plaintext length + overhead()` bytes.
pub trait ContentCipher: Send + Sync {
    /// Bytes added on disk per block.
    fn overhead(&self) -> usize;
    /// False for XTS: confidentiality only.
    fn is_authenticated(&self) -> bool;
    /// Encrypts `pt` (1..=BLOCK_SIZE bytes) as block number `block` into `out`, which must be
    /// exactly `pt.len() + overhead()` bytes.
    fn seal(&self, block: u64, pt: &[u8], out: &mut [u8]) -> Result<(), CipherError>;
    /// Decrypts on-disk block `ct` into `out` (exactly `ct.len() - overhead()` bytes).
    fn open(&self, block: u64, ct: &[u8], out: &mut [u8]) -> Result<(), CipherError>;
}

pub(crate) fn check_lengths(
    pt_len: usize,
    ct_len: usize,
    overhead: usize,
) -> Result<(), CipherError> {
    if pt_len == 0 || pt_len > BLOCK_SIZE || ct_len != pt_len + overhead {
        return Err(CipherError::Length(ct_len));
    }
    Ok(())
}
