//! A vault on disk: create one, unlock it with a protector secret, manage protectors. Unlocking
//! yields the vault master key (VMK), from which [`VaultKeys`] derives the working subkeys.

use crate::crypto::{aead_open, aead_seal, CipherSuite};
use crate::format::meta::{MetaError, MetaFile, ProtectorRecord, FORMAT_MAGIC, KNOWN_FEATURES};
use crate::format::{DIRIV_FILE, DIRIV_LEN, META_FILE};
use crate::kdf::{self, Purpose};
use crate::key::SecretKey;
use crate::names::NameCipher;
use crate::protector::{self, ProtectorError, Secret};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Protector(#[from] ProtectorError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0} is not empty: a vault is created in an empty directory")]
    NotEmpty(String),
    #[error("wrong key or passphrase (no {0} protector of this vault accepts it)")]
    WrongKey(&'static str),
    #[error("this vault has no {0} protector")]
    NoSuchKind(&'static str),
    #[error("metadata file failed authentication: it was modified outside vaultfs")]
    MetadataTampered,
    #[error("no protector with id {0}")]
    NoSuchProtector(String),
    #[error("refusing to remove the last protector: the vault would become unrecoverable")]
    LastProtector,
    #[error("invalid vault name {0:?}")]
    BadName(String),
    #[error("random number generator failed")]
    Rng,
    #[error("cryptographic failure")]
    Crypto,
}

/// The subkeys a mounted filesystem needs; the VMK itself is not among them.
pub struct VaultKeys {
    pub suite: CipherSuite,
    pub contents: SecretKey<32>,
    pub names: NameCipher,
    pub aux: SecretKey<32>,
}

/// An unlocked vault.
pub struct Vault {
    dir: PathBuf,
    meta: MetaFile,
    uuid: [u8; 16],
    suite: CipherSuite,
    vmk: SecretKey<32>,
}

type HmacSha256 = Hmac<Sha256>;

fn uuid_bytes(s: &str) -> Result<[u8; 16], VaultError> {
    uuid::Uuid::parse_str(s)
        .map(|u| *u.as_bytes())
        .map_err(|_| VaultError::Meta(MetaError::Malformed(META_FILE.into(), "bad uuid".into())))
}

fn compute_mac(
    vmk: &SecretKey<32>,
    uuid: &[u8; 16],
    meta: &MetaFile,
) -> Result<Vec<u8>, VaultError> {
    let k: SecretKey<32> =
        kdf::derive(vmk, uuid, Purpose::MetadataMac.info()).map_err(|_| VaultError::Crypto)?;
    let mut mac = HmacSha256::new_from_slice(k.expose_secret()).map_err(|_| VaultError::Crypto)?;
    mac.update(&meta.mac_input());
    Ok(mac.finalize().into_bytes().to_vec())
}

fn new_protector_id() -> Result<String, VaultError> {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).map_err(|_| VaultError::Rng)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Writes a fresh random directory IV into `dir` crash-safely (file fsync'd, then the directory).
pub fn write_diriv(dir: &Path) -> Result<(), VaultError> {
    let p = dir.join(DIRIV_FILE);
    let io = |e| VaultError::Io(p.display().to_string(), e);
    let mut iv = [0u8; DIRIV_LEN];
    getrandom::getrandom(&mut iv).map_err(|_| VaultError::Rng)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .map_err(io)?;
    f.write_all(&iv).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

/// Options for a new protector.
pub struct NewProtector<'a> {
    pub secret: &'a Secret,
    pub label: Option<String>,
    /// Argon2id (memory KiB, iterations, parallelism) for passphrase protectors.
    pub argon2: (u32, u32, u32),
    /// Public protector data to store with the record (see `ProtectorRecord::sealed`).
    pub sealed: Option<serde_json::Value>,
}

impl Vault {
    /// Creates a vault in the empty directory `dir`.
    pub fn create(
        dir: &Path,
        name: &str,
        suite: CipherSuite,
        first: &NewProtector<'_>,
    ) -> Result<Vault, VaultError> {
        if name.is_empty() || name.len() > 255 || name.contains(['/', '\0']) {
            return Err(VaultError::BadName(name.into()));
        }
        let d = dir.display().to_string();
        let mut entries = std::fs::read_dir(dir).map_err(|e| VaultError::Io(d.clone(), e))?;
        if entries.next().is_some() {
            return Err(VaultError::NotEmpty(d));
        }
        let vmk = SecretKey::<32>::random().map_err(|_| VaultError::Rng)?;
        let u = uuid::Uuid::new_v4();
        let meta = MetaFile {
            format: FORMAT_MAGIC.into(),
            version: 1,
            uuid: u.to_string(),
            name: name.into(),
            cipher: suite.name().into(),
            features: KNOWN_FEATURES.iter().map(|s| (*s).to_string()).collect(),
            protectors: vec![],
            mac: String::new(),
        };
        let mut v = Vault {
            dir: dir.to_path_buf(),
            meta,
            uuid: *u.as_bytes(),
            suite,
            vmk,
        };
        v.meta.mac = B64.encode(compute_mac(&v.vmk, &v.uuid, &v.meta)?);
        let rec = v.wrap_for(first)?;
        v.meta.protectors.push(rec);
        write_diriv(dir)?;
        v.meta.write_atomic(&dir.join(META_FILE))?;
        Ok(v)
    }

    fn wrap_for(&self, p: &NewProtector<'_>) -> Result<ProtectorRecord, VaultError> {
        let id = new_protector_id()?;
        let kind = p.secret.kind();
        let kdf = match p.secret {
            Secret::Passphrase(_) => Some(protector::new_kdf_params(
                p.argon2.0, p.argon2.1, p.argon2.2,
            )?),
            Secret::RawKey(_) | Secret::Kek { .. } => None,
        };
        let kek = protector::derive_kek(p.secret, kdf.as_ref(), &self.uuid)?;
        let aad = protector::wrap_aad(&self.uuid, &id, kind, kdf.as_ref());
        let wrapped =
            aead_seal(&kek, &aad, self.vmk.expose_secret()).map_err(|_| VaultError::Crypto)?;
        Ok(ProtectorRecord {
            id,
            kind: kind.into(),
            label: p.label.clone(),
            kdf,
            wrapped_key: B64.encode(wrapped),
            sealed: p.sealed.clone(),
        })
    }

    /// Reads the metadata without unlocking (for `protector list` and status).
    pub fn read_meta(dir: &Path) -> Result<MetaFile, VaultError> {
        Ok(MetaFile::read(&dir.join(META_FILE))?)
    }

    /// Unlocks with a protector secret: tries each protector of the secret's kind.
    pub fn unlock(dir: &Path, secret: &Secret) -> Result<Vault, VaultError> {
        let meta = Self::read_meta(dir)?;
        let uuid = uuid_bytes(&meta.uuid)?;
        let kind = secret.kind();
        let mut found = false;
        let mut vmk = None;
        for rec in meta.protectors.iter().filter(|r| r.kind == kind) {
            found = true;
            let kek = protector::derive_kek(secret, rec.kdf.as_ref(), &uuid)?;
            let aad = protector::wrap_aad(&uuid, &rec.id, &rec.kind, rec.kdf.as_ref());
            let Ok(sealed) = B64.decode(&rec.wrapped_key) else {
                continue;
            };
            if let Ok(Some(k)) = aead_open(&kek, &aad, &sealed, SecretKey::<32>::from_slice) {
                vmk = Some(k);
                break;
            }
        }
        if !found {
            return Err(VaultError::NoSuchKind(kind));
        }
        let vmk = vmk.ok_or(VaultError::WrongKey(kind))?;
        Self::from_master_key(dir, meta, vmk)
    }

    /// Unlocks through one protector record (the broker picks the record and supplies its KEK).
    pub fn unlock_record(
        dir: &Path,
        meta: MetaFile,
        id: &str,
        secret: &Secret,
    ) -> Result<Vault, VaultError> {
        let uuid = uuid_bytes(&meta.uuid)?;
        let rec = meta
            .protectors
            .iter()
            .find(|r| r.id == id)
            .ok_or_else(|| VaultError::NoSuchProtector(id.into()))?;
        let kek = protector::derive_kek(secret, rec.kdf.as_ref(), &uuid)?;
        let aad = protector::wrap_aad(&uuid, &rec.id, &rec.kind, rec.kdf.as_ref());
        let sealed = B64
            .decode(&rec.wrapped_key)
            .map_err(|_| VaultError::WrongKey(secret.kind()))?;
        let vmk = aead_open(&kek, &aad, &sealed, SecretKey::<32>::from_slice)
            .ok()
            .flatten()
            .ok_or(VaultError::WrongKey(secret.kind()))?;
        Self::from_master_key(dir, meta, vmk)
    }

    /// The master key (for the broker, which hands it to the vault's filesystem).
    pub fn master_key(&self) -> &SecretKey<32> {
        &self.vmk
    }

    /// Crypto-erase: overwrites the metadata file (every wrapped copy of the master key) with
    /// zeros, syncs it, and removes it. The data left behind cannot be decrypted by anyone.
    pub fn crypto_erase(dir: &Path) -> Result<(), VaultError> {
        let p = dir.join(META_FILE);
        let io = |e| VaultError::Io(p.display().to_string(), e);
        let len = std::fs::metadata(&p).map_err(io)?.len();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(io)?;
        f.write_all(&vec![0u8; len as usize]).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::remove_file(&p).map_err(io)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }

    /// Opens a vault whose master key is already known (checks the metadata MAC).
    pub fn from_master_key(
        dir: &Path,
        meta: MetaFile,
        vmk: SecretKey<32>,
    ) -> Result<Vault, VaultError> {
        let uuid = uuid_bytes(&meta.uuid)?;
        let mac = B64
            .decode(&meta.mac)
            .map_err(|_| VaultError::MetadataTampered)?;
        let k: SecretKey<32> = kdf::derive(&vmk, &uuid, Purpose::MetadataMac.info())
            .map_err(|_| VaultError::Crypto)?;
        let mut m =
            HmacSha256::new_from_slice(k.expose_secret()).map_err(|_| VaultError::Crypto)?;
        m.update(&meta.mac_input());
        m.verify_slice(&mac)
            .map_err(|_| VaultError::MetadataTampered)?;
        let suite = CipherSuite::from_name(&meta.cipher)
            .ok_or_else(|| VaultError::Meta(MetaError::UnknownCipher(meta.cipher.clone())))?;
        Ok(Vault {
            dir: dir.to_path_buf(),
            meta,
            uuid,
            suite,
            vmk,
        })
    }

    pub fn meta(&self) -> &MetaFile {
        &self.meta
    }
    pub fn suite(&self) -> CipherSuite {
        self.suite
    }
    pub fn uuid(&self) -> &[u8; 16] {
        &self.uuid
    }

    /// Derives the working subkeys.
    pub fn keys(&self) -> Result<VaultKeys, VaultError> {
        let d = |p: Purpose| {
            kdf::derive::<32, 32>(&self.vmk, &self.uuid, p.info()).map_err(|_| VaultError::Crypto)
        };
        let names: SecretKey<64> = kdf::derive(&self.vmk, &self.uuid, Purpose::Names.info())
            .map_err(|_| VaultError::Crypto)?;
        Ok(VaultKeys {
            suite: self.suite,
            contents: d(Purpose::Contents)?,
            names: NameCipher::new(names),
            aux: d(Purpose::Aux)?,
        })
    }

    /// Adds a protector by wrapping the VMK again; no data is re-encrypted. Returns its id.
    pub fn add_protector(&mut self, p: &NewProtector<'_>) -> Result<String, VaultError> {
        let rec = self.wrap_for(p)?;
        let id = rec.id.clone();
        self.meta.protectors.push(rec);
        self.meta.write_atomic(&self.dir.join(META_FILE))?;
        Ok(id)
    }

    /// Removes a protector; removing the last one is refused.
    pub fn remove_protector(&mut self, id: &str) -> Result<(), VaultError> {
        let pos = self
            .meta
            .protectors
            .iter()
            .position(|r| r.id == id)
            .ok_or_else(|| VaultError::NoSuchProtector(id.into()))?;
        if self.meta.protectors.len() == 1 {
            return Err(VaultError::LastProtector);
        }
        self.meta.protectors.remove(pos);
        self.meta.write_atomic(&self.dir.join(META_FILE))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::SecretBytes;

    const FAST: (u32, u32, u32) = (8192, 1, 1);

    fn raw(b: u8) -> Secret {
        Secret::RawKey(SecretKey::from_slice(&[b; 32]).unwrap())
    }

    fn np(s: &Secret) -> NewProtector<'_> {
        NewProtector {
            secret: s,
            label: None,
            argon2: FAST,
            sealed: None,
        }
    }

    #[test]
    fn create_unlock_wrong_key() {
        let d = tempfile::tempdir().unwrap();
        let k = raw(1);
        let v = Vault::create(d.path(), "t", CipherSuite::Aes256Gcm, &np(&k)).unwrap();
        assert!(d.path().join(DIRIV_FILE).exists());
        let v2 = Vault::unlock(d.path(), &k).unwrap();
        assert_eq!(v.vmk.expose_secret(), v2.vmk.expose_secret());
        assert!(matches!(
            Vault::unlock(d.path(), &raw(2)),
            Err(VaultError::WrongKey("raw"))
        ));
        let pw = Secret::Passphrase(SecretBytes::new(b"pw".to_vec()));
        assert!(matches!(
            Vault::unlock(d.path(), &pw),
            Err(VaultError::NoSuchKind("passphrase"))
        ));
        // Not empty any more.
        assert!(matches!(
            Vault::create(d.path(), "t", CipherSuite::Aes256Gcm, &np(&k)),
            Err(VaultError::NotEmpty(_))
        ));
    }

    #[test]
    fn protectors_add_remove() {
        let d = tempfile::tempdir().unwrap();
        let k = raw(1);
        let mut v = Vault::create(d.path(), "t", CipherSuite::Aes256Xts, &np(&k)).unwrap();
        let first = v.meta().protectors[0].id.clone();
        let pw = Secret::Passphrase(SecretBytes::new(b"hunter2".to_vec()));
        let id = v.add_protector(&np(&pw)).unwrap();
        let by_pw = Vault::unlock(d.path(), &pw).unwrap();
        assert_eq!(by_pw.vmk.expose_secret(), v.vmk.expose_secret());
        v.remove_protector(&first).unwrap();
        assert!(matches!(
            Vault::unlock(d.path(), &k),
            Err(VaultError::NoSuchKind("raw"))
        ));
        assert!(matches!(
            v.remove_protector(&id),
            Err(VaultError::LastProtector)
        ));
        assert!(matches!(
            v.remove_protector("nope"),
            Err(VaultError::NoSuchProtector(_))
        ));
    }

    #[test]
    fn kek_protector_and_crypto_erase() {
        let d = tempfile::tempdir().unwrap();
        let kek = || Secret::Kek {
            kind: "tpm",
            key: SecretKey::from_slice(&[5; 32]).unwrap(),
        };
        let k = kek();
        let p = NewProtector {
            secret: &k,
            label: None,
            argon2: FAST,
            sealed: Some(serde_json::json!({"pcrs": [0]})),
        };
        let v = Vault::create(d.path(), "t", CipherSuite::Aes256Gcm, &p).unwrap();
        let meta = Vault::read_meta(d.path()).unwrap();
        let rec = &meta.protectors[0];
        assert_eq!(rec.kind, "tpm");
        assert_eq!(rec.sealed, Some(serde_json::json!({"pcrs": [0]})));
        let id = rec.id.clone();
        let v2 = Vault::unlock_record(d.path(), meta.clone(), &id, &kek()).unwrap();
        assert_eq!(
            v.master_key().expose_secret(),
            v2.master_key().expose_secret()
        );
        let wrong = Secret::Kek {
            kind: "tpm",
            key: SecretKey::from_slice(&[6; 32]).unwrap(),
        };
        assert!(matches!(
            Vault::unlock_record(d.path(), meta, &id, &wrong),
            Err(VaultError::WrongKey("tpm"))
        ));
        Vault::crypto_erase(d.path()).unwrap();
        assert!(!d.path().join(META_FILE).exists());
        assert!(Vault::unlock(d.path(), &kek()).is_err());
    }

    #[test]
    fn tampered_metadata_refused() {
        let d = tempfile::tempdir().unwrap();
        let k = raw(1);
        Vault::create(d.path(), "t", CipherSuite::Aes256Gcm, &np(&k)).unwrap();
        let p = d.path().join(META_FILE);
        let orig = std::fs::read_to_string(&p).unwrap();
        // Flip the cipher suite: the MAC catches it.
        std::fs::write(&p, orig.replace("aes-256-gcm", "aes-256-xts")).unwrap();
        assert!(matches!(
            Vault::unlock(d.path(), &k),
            Err(VaultError::MetadataTampered)
        ));
        // Rename the vault: caught too.
        std::fs::write(&p, orig.replace("\"name\": \"t\"", "\"name\": \"u\"")).unwrap();
        assert!(matches!(
            Vault::unlock(d.path(), &k),
            Err(VaultError::MetadataTampered)
        ));
        // Change the uuid: the wrapped key no longer opens.
        let mut m: MetaFile = serde_json::from_str(&orig).unwrap();
        m.uuid = uuid::Uuid::new_v4().to_string();
        std::fs::write(&p, serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(Vault::unlock(d.path(), &k).is_err());
        // Truncated file.
        std::fs::write(&p, &orig[..orig.len() / 2]).unwrap();
        assert!(matches!(
            Vault::unlock(d.path(), &k),
            Err(VaultError::Meta(_))
        ));
    }
}
