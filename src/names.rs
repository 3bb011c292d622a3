//! File-name encryption: AES-256-SIV (RFC 5297), deterministic per directory (the directory's
//! random 16-byte IV is associated data) and authenticated; encoded as unpadded base64url. A name
//! whose encoding exceeds [`MAX_BACKING_NAME`] is stored under a short hashed name with a
//! `.name` side file holding the full encoding.
//!
//! The same SIV key, under a different associated-data domain, encrypts xattr names.

use crate::key::SecretKey;
use aes_siv::aead::KeyInit;
use aes_siv::siv::Aes256Siv;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use sha2::{Digest, Sha256};

/// Longest backing name we create directly (ext4's NAME_MAX).
pub const MAX_BACKING_NAME: usize = 255;
/// Longest plaintext name accepted (as on ext4).
pub const MAX_NAME: usize = 255;
/// Prefix of hashed long names.
pub const LONGNAME_PREFIX: &str = "vaultfs.longname.";
/// Suffix of a long name's side file.
pub const LONGNAME_SUFFIX: &str = ".name";

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name too long")]
    TooLong,
    #[error("name is not valid base64url")]
    Encoding,
    #[error("name failed authentication")]
    Auth,
    #[error("invalid name")]
    Invalid,
}

pub struct NameCipher {
    key: SecretKey<64>,
}

impl NameCipher {
    pub fn new(key: SecretKey<64>) -> Self {
        NameCipher { key }
    }

    fn siv(&self) -> Aes256Siv {
        Aes256Siv::new(self.key.expose_secret().into())
    }

    /// Encrypts a plaintext name for the directory with IV `dir_iv`; the result is the full
    /// base64url encoding (possibly longer than a backing name may be: see [`backing_name`]).
    pub fn encrypt(&self, dir_iv: &[u8; 16], name: &[u8]) -> Result<String, NameError> {
        if name.is_empty()
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Err(NameError::Invalid);
        }
        if name.len() > MAX_NAME {
            return Err(NameError::TooLong);
        }
        let ct = self
            .siv()
            .encrypt([b"vaultfs v1 name".as_slice(), dir_iv.as_slice()], name)
            .map_err(|_| NameError::Invalid)?;
        Ok(B64URL.encode(ct))
    }

    pub fn decrypt(&self, dir_iv: &[u8; 16], encoded: &str) -> Result<Vec<u8>, NameError> {
        let ct = B64URL.decode(encoded).map_err(|_| NameError::Encoding)?;
        if ct.len() <= 16 {
            return Err(NameError::Encoding);
        }
        let pt = self
            .siv()
            .decrypt([b"vaultfs v1 name".as_slice(), dir_iv.as_slice()], &ct)
            .map_err(|_| NameError::Auth)?;
        if pt.is_empty() || pt.contains(&b'/') || pt.contains(&0) || pt == b"." || pt == b".." {
            return Err(NameError::Invalid);
        }
        Ok(pt)
    }

    /// Encrypts a user xattr name (without its `user.` prefix).
    pub fn encrypt_xattr(&self, name: &[u8]) -> Result<String, NameError> {
        if name.is_empty() {
            return Err(NameError::Invalid);
        }
        let ct = self
            .siv()
            .encrypt([b"vaultfs v1 xattr name".as_slice()], name)
            .map_err(|_| NameError::Invalid)?;
        Ok(B64URL.encode(ct))
    }

    pub fn decrypt_xattr(&self, encoded: &str) -> Result<Vec<u8>, NameError> {
        let ct = B64URL.decode(encoded).map_err(|_| NameError::Encoding)?;
        self.siv()
            .decrypt([b"vaultfs v1 xattr name".as_slice()], &ct)
            .map_err(|_| NameError::Auth)
    }
}

/// What a full encoded name is stored as in the backing directory.
#[derive(Debug, PartialEq, Eq)]
pub enum BackingName {
    /// The encoding itself.
    Short(String),
    /// `vaultfs.longname.<hash>`; the full encoding goes in `<that>.name`.
    Long { name: String, full: String },
}

impl BackingName {
    pub fn name(&self) -> &str {
        match self {
            BackingName::Short(s) => s,
            BackingName::Long { name, .. } => name,
        }
    }
}

pub fn backing_name(encoded: String) -> BackingName {
    if encoded.len() <= MAX_BACKING_NAME {
        return BackingName::Short(encoded);
    }
    let h = Sha256::digest(encoded.as_bytes());
    BackingName::Long {
        name: format!("{LONGNAME_PREFIX}{}", B64URL.encode(h)),
        full: encoded,
    }
}

/// Whether a backing name is a long-name entry (not its side file).
pub fn is_long_entry(name: &str) -> bool {
    name.starts_with(LONGNAME_PREFIX) && !name.ends_with(LONGNAME_SUFFIX)
}

/// The side file of a long entry.
pub fn long_side_file(name: &str) -> String {
    format!("{name}{LONGNAME_SUFFIX}")
}

/// Checks that `full` (read from a side file) belongs to the long entry `name`.
pub fn long_name_matches(name: &str, full: &str) -> bool {
    let h = Sha256::digest(full.as_bytes());
    name.strip_prefix(LONGNAME_PREFIX) == Some(B64URL.encode(h).as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nc() -> NameCipher {
        NameCipher::new(SecretKey::random().unwrap())
    }

    #[test]
    fn deterministic_per_directory() {
        let c = nc();
        let a = c.encrypt(&[1; 16], b"hello.txt").unwrap();
        assert_eq!(a, c.encrypt(&[1; 16], b"hello.txt").unwrap());
        assert_ne!(a, c.encrypt(&[2; 16], b"hello.txt").unwrap());
        assert!(!a.contains("hello"));
        assert_eq!(c.decrypt(&[1; 16], &a).unwrap(), b"hello.txt");
        assert_eq!(c.decrypt(&[2; 16], &a), Err(NameError::Auth));
    }

    #[test]
    fn tampered_names_fail() {
        let c = nc();
        let a = c.encrypt(&[1; 16], b"x").unwrap();
        let mut b = a.into_bytes();
        b[3] = if b[3] == b'A' { b'B' } else { b'A' };
        assert!(c
            .decrypt(&[1; 16], std::str::from_utf8(&b).unwrap())
            .is_err());
        assert_eq!(c.decrypt(&[1; 16], "!!"), Err(NameError::Encoding));
    }

    #[test]
    fn invalid_and_long() {
        let c = nc();
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert_eq!(c.encrypt(&[0; 16], bad), Err(NameError::Invalid));
        }
        assert_eq!(c.encrypt(&[0; 16], &[b'a'; 256]), Err(NameError::TooLong));
        let long = c.encrypt(&[0; 16], &[b'a'; 255]).unwrap();
        assert!(long.len() > MAX_BACKING_NAME);
        let bn = backing_name(long.clone());
        match &bn {
            BackingName::Long { name, full } => {
                assert!(name.len() < 100);
                assert!(is_long_entry(name));
                assert!(!is_long_entry(&long_side_file(name)));
                assert!(long_name_matches(name, full));
                assert!(!long_name_matches(name, "other"));
            }
            BackingName::Short(_) => panic!("expected long"),
        }
        let short = c.encrypt(&[0; 16], &[b'a'; 100]).unwrap();
        assert!(matches!(backing_name(short), BackingName::Short(_)));
    }

    #[test]
    fn xattr_names() {
        let c = nc();
        let e = c.encrypt_xattr(b"comment").unwrap();
        assert_eq!(c.decrypt_xattr(&e).unwrap(), b"comment");
        // Name ciphertexts cannot be swapped into the xattr domain.
        let n = c.encrypt(&[0; 16], b"comment").unwrap();
        assert!(c.decrypt_xattr(&n).is_err());
    }
}
