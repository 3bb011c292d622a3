//! Protectors turn a user secret into a key-encryption key (KEK) that wraps the vault master key.
//! `raw`: a 32-byte key file (like fscrypt's raw_key), KEK = HKDF(file). `passphrase`: Argon2id
//! with stored, bounded parameters.

use crate::format::meta::KdfParams;
use crate::kdf;
use crate::key::{SecretBytes, SecretKey};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// Argon2id bounds: parameters outside are refused both when creating and when reading a
/// metadata file (a tampered file must not make unlock take unbounded memory or time).
pub const ARGON2_MIN_MEMORY_KIB: u32 = 8 * 1024;
pub const ARGON2_MAX_MEMORY_KIB: u32 = 4 * 1024 * 1024;
pub const ARGON2_MAX_ITERATIONS: u32 = 64;
pub const ARGON2_MAX_PARALLELISM: u32 = 16;
/// Defaults: 64 MiB, 3 passes, 1 lane (about 0.2 s on the reference machine).
pub const ARGON2_DEFAULT: (u32, u32, u32) = (64 * 1024, 3, 1);

/// What the user presents to unlock or to create a protector.
pub enum Secret {
    /// Contents of a raw key file: exactly 32 bytes.
    RawKey(SecretKey<32>),
    /// A passphrase (not empty).
    Passphrase(SecretBytes),
    /// A key-encryption key supplied whole by another component (the broker: `tpm` unseals it,
    /// `controller` receives it after attestation). `kind` names the protector type.
    Kek {
        kind: &'static str,
        key: SecretKey<32>,
    },
}

impl Secret {
    pub fn kind(&self) -> &'static str {
        match self {
            Secret::RawKey(_) => "raw",
            Secret::Passphrase(_) => "passphrase",
            Secret::Kek { kind, .. } => kind,
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret::{}(REDACTED)", self.kind())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtectorError {
    #[error("key file must hold exactly 32 bytes, it holds {0}")]
    KeyFileLength(usize),
    #[error("passphrase is empty")]
    EmptyPassphrase,
    #[error("KDF parameters out of bounds: {0}")]
    KdfBounds(String),
    #[error("KDF parameters malformed: {0}")]
    KdfMalformed(String),
    #[error("key derivation failed")]
    Derive,
    #[error("random number generator failed")]
    Rng,
}

/// Reads a raw key file: exactly 32 bytes.
pub fn raw_key_from_bytes(bytes: &SecretBytes) -> Result<SecretKey<32>, ProtectorError> {
    let b = bytes.expose_secret();
    SecretKey::from_slice(b).ok_or(ProtectorError::KeyFileLength(b.len()))
}

/// Fresh Argon2id parameters with a random salt.
pub fn new_kdf_params(
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
) -> Result<KdfParams, ProtectorError> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|_| ProtectorError::Rng)?;
    let p = KdfParams {
        algorithm: "argon2id".into(),
        memory_kib,
        iterations,
        parallelism,
        salt: B64.encode(salt),
    };
    check_kdf(&p)?;
    Ok(p)
}

pub fn check_kdf(p: &KdfParams) -> Result<Vec<u8>, ProtectorError> {
    if p.algorithm != "argon2id" {
        return Err(ProtectorError::KdfMalformed(format!(
            "algorithm {:?}",
            p.algorithm
        )));
    }
    if !(ARGON2_MIN_MEMORY_KIB..=ARGON2_MAX_MEMORY_KIB).contains(&p.memory_kib)
        || !(1..=ARGON2_MAX_ITERATIONS).contains(&p.iterations)
        || !(1..=ARGON2_MAX_PARALLELISM).contains(&p.parallelism)
        || p.memory_kib < 8 * p.parallelism
    {
        return Err(ProtectorError::KdfBounds(format!(
            "memory {} KiB, iterations {}, parallelism {}",
            p.memory_kib, p.iterations, p.parallelism
        )));
    }
    let salt = B64
        .decode(&p.salt)
        .map_err(|_| ProtectorError::KdfMalformed("salt is not base64".into()))?;
    if salt.len() < 16 || salt.len() > 64 {
        return Err(ProtectorError::KdfMalformed("salt length".into()));
    }
    Ok(salt)
}

/// Derives the KEK of a protector. `vault_uuid` salts the raw-key derivation so one key file
/// used for two vaults gives two different KEKs.
pub fn derive_kek(
    secret: &Secret,
    kdf_params: Option<&KdfParams>,
    vault_uuid: &[u8; 16],
) -> Result<SecretKey<32>, ProtectorError> {
    match secret {
        Secret::Kek { key, .. } => {
            SecretKey::from_slice(key.expose_secret()).ok_or(ProtectorError::Derive)
        }
        Secret::RawKey(k) => kdf::derive(k, vault_uuid, "vaultfs v1 raw protector kek")
            .map_err(|_| ProtectorError::Derive),
        Secret::Passphrase(p) => {
            if p.expose_secret().is_empty() {
                return Err(ProtectorError::EmptyPassphrase);
            }
            let params =
                kdf_params.ok_or_else(|| ProtectorError::KdfMalformed("missing".into()))?;
            let salt = check_kdf(params)?;
            let a = argon2::Argon2::new(
                argon2::Algorithm::Argon2id,
                argon2::Version::V0x13,
                argon2::Params::new(
                    params.memory_kib,
                    params.iterations,
                    params.parallelism,
                    Some(32),
                )
                .map_err(|e| ProtectorError::KdfBounds(e.to_string()))?,
            );
            SecretKey::try_fill(|out| {
                a.hash_password_into(p.expose_secret(), &salt, out)
                    .map_err(|_| ProtectorError::Derive)
            })
        }
    }
}

/// Associated data binding a wrapped key to its vault and to its protector's identity and
/// parameters.
pub fn wrap_aad(vault_uuid: &[u8; 16], id: &str, kind: &str, kdf: Option<&KdfParams>) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"vaultfs v1 wrapped vmk\0");
    v.extend_from_slice(vault_uuid);
    let kdf_s = kdf
        .map(|k| {
            format!(
                "{}:{}:{}:{}:{}",
                k.algorithm, k.memory_kib, k.iterations, k.parallelism, k.salt
            )
        })
        .unwrap_or_default();
    for f in [id, kind, kdf_s.as_str()] {
        v.extend_from_slice(&(f.len() as u32).to_be_bytes());
        v.extend_from_slice(f.as_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdf_bounds_enforced() {
        assert!(new_kdf_params(1024, 1, 1).is_err());
        assert!(new_kdf_params(8 * 1024 * 1024, 1, 1).is_err());
        assert!(new_kdf_params(65536, 0, 1).is_err());
        assert!(new_kdf_params(65536, 3, 99).is_err());
        let mut p = new_kdf_params(8192, 1, 1).unwrap();
        p.algorithm = "scrypt".into();
        assert!(check_kdf(&p).is_err());
    }

    #[test]
    fn passphrase_kek_depends_on_salt_and_passphrase() {
        let u = [1u8; 16];
        let p1 = new_kdf_params(8192, 1, 1).unwrap();
        let p2 = new_kdf_params(8192, 1, 1).unwrap();
        let s = Secret::Passphrase(SecretBytes::new(b"correct horse".to_vec()));
        let t = Secret::Passphrase(SecretBytes::new(b"correct horsf".to_vec()));
        let a = derive_kek(&s, Some(&p1), &u).unwrap();
        let a2 = derive_kek(&s, Some(&p1), &u).unwrap();
        let b = derive_kek(&s, Some(&p2), &u).unwrap();
        let c = derive_kek(&t, Some(&p1), &u).unwrap();
        assert_eq!(a.expose_secret(), a2.expose_secret());
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_ne!(a.expose_secret(), c.expose_secret());
        let empty = Secret::Passphrase(SecretBytes::new(vec![]));
        assert!(derive_kek(&empty, Some(&p1), &u).is_err());
    }

    #[test]
    fn raw_key_file_length() {
        assert!(raw_key_from_bytes(&SecretBytes::new(vec![0; 31])).is_err());
        assert!(raw_key_from_bytes(&SecretBytes::new(vec![0; 33])).is_err());
        assert!(raw_key_from_bytes(&SecretBytes::new(vec![0; 32])).is_ok());
    }
}
