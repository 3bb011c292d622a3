//! The metadata file `vaultfs.conf`: JSON, parsed strictly (unknown fields, versions, features or
//! ciphers are refused), written atomically (temporary file, fsync, rename, fsync of the
//! directory). Its core fields are authenticated by an HMAC keyed from the vault master key;
//! each protector's wrapped key is an AEAD whose associated data binds it to the vault.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// The only value of the `format` field.
pub const FORMAT_MAGIC: &str = "vaultfs";
/// Feature flags format v1 knows. Every v1 vault carries all of them; any other flag is refused.
pub const KNOWN_FEATURES: &[&str] = &["names-aes-siv", "long-names", "xattrs-aes-gcm"];

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetaFile {
    pub format: String,
    pub version: u32,
    pub uuid: String,
    pub name: String,
    pub cipher: String,
    pub features: Vec<String>,
    pub protectors: Vec<ProtectorRecord>,
    /// base64 HMAC-SHA256 over [`MetaFile::mac_input`].
    pub mac: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProtectorRecord {
    /// 16 hex digits, random.
    pub id: String,
    /// `raw` or `passphrase` (format v1); `tpm`, `controller` and `tpm+controller` come with the
    /// broker.
    #[serde(rename = "type")]
    pub kind: String,
    /// Optional human label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf: Option<KdfParams>,
    /// base64 of `nonce(12) || AES-256-GCM(KEK, VMK) || tag(16)`.
    pub wrapped_key: String,
    /// Protector-specific public data kept by the component that owns the protector (for `tpm`:
    /// the sealed object and the PCR selection, written by the broker). Never secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KdfParams {
    pub algorithm: String,
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    /// base64 of 16 random bytes.
    pub salt: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: not a vaultfs metadata file: {1}")]
    Malformed(String, String),
    #[error("unsupported format version {0} (this build reads version 1)")]
    UnsupportedVersion(u32),
    #[error("unknown feature flag {0:?}: refusing to guess")]
    UnknownFeature(String),
    #[error("missing feature flag {0:?}")]
    MissingFeature(String),
    #[error("unknown cipher suite {0:?}")]
    UnknownCipher(String),
}

impl MetaFile {
    /// Parses and validates everything that can be checked without a key.
    pub fn parse(path_for_errors: &str, bytes: &[u8]) -> Result<Self, MetaError> {
        let m: MetaFile = serde_json::from_slice(bytes)
            .map_err(|e| MetaError::Malformed(path_for_errors.into(), e.to_string()))?;
        if m.format != FORMAT_MAGIC {
            return Err(MetaError::Malformed(
                path_for_errors.into(),
                "bad format tag".into(),
            ));
        }
        if m.version != 1 {
            return Err(MetaError::UnsupportedVersion(m.version));
        }
        for f in &m.features {
            if !KNOWN_FEATURES.contains(&f.as_str()) {
                return Err(MetaError::UnknownFeature(f.clone()));
            }
        }
        for k in KNOWN_FEATURES {
            if !m.features.iter().any(|f| f == k) {
                return Err(MetaError::MissingFeature((*k).to_string()));
            }
        }
        if crate::crypto::CipherSuite::from_name(&m.cipher).is_none() {
            return Err(MetaError::UnknownCipher(m.cipher.clone()));
        }
        if uuid::Uuid::parse_str(&m.uuid).is_err() {
            return Err(MetaError::Malformed(
                path_for_errors.into(),
                "bad uuid".into(),
            ));
        }
        Ok(m)
    }

    pub fn read(path: &Path) -> Result<Self, MetaError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| MetaError::Io {
            path: p.clone(),
            source,
        })?;
        if bytes.len() > 1 << 20 {
            return Err(MetaError::Malformed(p, "larger than 1 MiB".into()));
        }
        Self::parse(&p, &bytes)
    }

    /// The bytes the metadata MAC covers: every field that changes how data is read.
    /// Length-prefixed so that no two field sets encode alike.
    pub fn mac_input(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(b"vaultfs metadata v1\0");
        v.extend_from_slice(&self.version.to_be_bytes());
        let mut features = self.features.clone();
        features.sort();
        let fields = [
            self.format.as_str(),
            self.uuid.as_str(),
            self.name.as_str(),
            self.cipher.as_str(),
        ];
        for f in fields
            .iter()
            .copied()
            .chain(features.iter().map(String::as_str))
        {
            v.extend_from_slice(&(f.len() as u32).to_be_bytes());
            v.extend_from_slice(f.as_bytes());
        }
        v
    }

    /// Atomic replace: write `path.tmp`, fsync, rename over `path`, fsync the directory.
    pub fn write_atomic(&self, path: &Path) -> Result<(), MetaError> {
        let p = path.display().to_string();
        let io = |source| MetaError::Io {
            path: p.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| MetaError::Malformed(p.clone(), e.to_string()))?;
        let tmp = path.with_extension("conf.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&json).map_err(io)?;
        f.write_all(b"\n").map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MetaFile {
        MetaFile {
            format: FORMAT_MAGIC.into(),
            version: 1,
            uuid: "3f1e2d3c-4b5a-4968-8776-655443322110".into(),
            name: "v".into(),
            cipher: "aes-256-gcm".into(),
            features: KNOWN_FEATURES.iter().map(|s| s.to_string()).collect(),
            protectors: vec![],
            mac: String::new(),
        }
    }

    #[test]
    fn strict_parse() {
        let good = serde_json::to_vec(&sample()).unwrap();
        assert!(MetaFile::parse("x", &good).is_ok());
        let mut m = sample();
        m.version = 2;
        assert!(matches!(
            MetaFile::parse("x", &serde_json::to_vec(&m).unwrap()),
            Err(MetaError::UnsupportedVersion(2))
        ));
        let mut m = sample();
        m.features.push("compression".into());
        assert!(matches!(
            MetaFile::parse("x", &serde_json::to_vec(&m).unwrap()),
            Err(MetaError::UnknownFeature(_))
        ));
        let mut m = sample();
        m.cipher = "rot13".into();
        assert!(matches!(
            MetaFile::parse("x", &serde_json::to_vec(&m).unwrap()),
            Err(MetaError::UnknownCipher(_))
        ));
        let mut j: serde_json::Value = serde_json::from_slice(&good).unwrap();
        j["extra"] = serde_json::Value::Bool(true);
        assert!(MetaFile::parse("x", &serde_json::to_vec(&j).unwrap()).is_err());
        assert!(MetaFile::parse("x", b"{\"format\":").is_err());
    }

    #[test]
    fn mac_input_covers_fields() {
        let a = sample();
        let mut b = sample();
        b.cipher = "aes-256-xts".into();
        assert_ne!(a.mac_input(), b.mac_input());
        let mut c = sample();
        c.name = "w".into();
        assert_ne!(a.mac_input(), c.mac_input());
        // Protectors are not covered (they are re-wrapped without the MAC changing).
        let mut d = sample();
        d.mac = "zz".into();
        assert_eq!(a.mac_input(), d.mac_input());
    }
}
