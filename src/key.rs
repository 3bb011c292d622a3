//! The one secret type. Key bytes live in a heap box that is wiped on drop; the type has no
//! `Clone`, `Serialize` or `Eq`, its `Debug` prints `REDACTED`, and the bytes are reached only
//! through [`SecretKey::expose_secret`] so every use can be found with grep.

use zeroize::Zeroize;

/// `N` secret bytes, zeroized on drop.
pub struct SecretKey<const N: usize>(Box<[u8; N]>);

impl<const N: usize> SecretKey<N> {
    /// Builds a key by letting `f` fill a zeroed buffer in place (no copy of the bytes is left
    /// behind on the stack). If `f` fails, the partially filled buffer is wiped.
    pub fn try_fill<E>(f: impl FnOnce(&mut [u8; N]) -> Result<(), E>) -> Result<Self, E> {
        let mut key = SecretKey(Box::new([0u8; N]));
        f(&mut key.0)?;
        Ok(key)
    }

    /// A fresh key from the operating system's CSPRNG.
    pub fn random() -> Result<Self, getrandom::Error> {
        Self::try_fill(|buf| getrandom::getrandom(buf))
    }

    /// Copies `bytes` into a new key; the caller remains responsible for wiping its own copy.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != N {
            return None;
        }
        let key: Result<Self, ()> = Self::try_fill(|buf| {
            buf.copy_from_slice(bytes);
            Ok(())
        });
        key.ok()
    }

    /// The one accessor for the key bytes.
    pub fn expose_secret(&self) -> &[u8; N] {
        &self.0
    }
}

impl<const N: usize> Drop for SecretKey<N> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<const N: usize> std::fmt::Debug for SecretKey<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey<{N}>(REDACTED)")
    }
}

/// A byte buffer that may hold secret material (a passphrase, a key file's contents); wiped on drop.
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretBytes(bytes)
    }
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes({} bytes, REDACTED)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let k = SecretKey::<32>::from_slice(&[0x41; 32]).unwrap();
        let s = format!("{k:?}");
        assert!(s.contains("REDACTED"));
        assert!(!s.contains("65") && !s.contains("41"));
    }

    #[test]
    fn random_keys_differ() {
        let a = SecretKey::<32>::random().unwrap();
        let b = SecretKey::<32>::random().unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
    }

    #[test]
    fn from_slice_checks_length() {
        assert!(SecretKey::<32>::from_slice(&[0; 31]).is_none());
        assert!(SecretKey::<32>::from_slice(&[0; 32]).is_some());
    }
}
