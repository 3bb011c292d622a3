//! The broker's TOML configuration (docs/BROKER.md). Every setting has a safe default; every path
//! can also be given as a flag.

use serde::Deserialize;
use std::path::PathBuf;

pub const DEFAULT_CONFIG: &str = "/etc/vaultfs/broker.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where unlocked vaults are mounted: `<mount_root>/<name>`.
    pub mount_root: PathBuf,
    /// Where each vault's ciphertext lives: `<data_root>/<name>`.
    pub data_root: PathBuf,
    /// Broker state (pid files); no secret is ever written here.
    pub state_dir: PathBuf,
    /// The Unix socket (mode 0600).
    pub socket: PathBuf,
    /// TCTI of the TPM, e.g. `device:/dev/tpmrm0` or `swtpm:host=127.0.0.1,port=2321`.
    pub tcti: String,
    /// The vaultfs binary (default: next to vault-broker).
    pub vaultfs: Option<PathBuf>,
    /// Peer user IDs allowed to talk to the socket (root always is).
    pub allowed_uids: Vec<u32>,
    /// Peer user IDs that may fetch a vault key for a vaultfs they run themselves; by default
    /// only the vaultfs process the broker launched for that vault gets its key.
    pub key_uids: Vec<u32>,
    /// PCRs (SHA-256 bank) the `tpm` protector seals to; validated by EVE's rules.
    pub pcrs: Vec<u8>,
    /// Vaults; none configured means the default vaults `config` and `apps`.
    #[serde(rename = "vault")]
    pub vaults: Vec<VaultConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    pub name: String,
    #[serde(default = "default_cipher")]
    pub cipher: String,
    /// `tpm` (format v1 broker vaults).
    #[serde(default = "default_protector")]
    pub protector: String,
    /// `unlock` (mount at start) or `lock`.
    #[serde(default = "default_policy")]
    pub policy: String,
}

fn default_cipher() -> String {
    "aes-256-gcm".into()
}
fn default_protector() -> String {
    "tpm".into()
}
fn default_policy() -> String {
    "unlock".into()
}

pub use crate::tpm::{validate_pcr_list, DEFAULT_PCRS as EVE_DEFAULT_PCRS};

impl Default for Config {
    fn default() -> Self {
        Config {
            mount_root: "/persist/vault".into(),
            data_root: "/persist/vault-data".into(),
            state_dir: "/var/lib/vault-broker".into(),
            socket: "/run/vaultfs/broker.sock".into(),
            tcti: "device:/dev/tpmrm0".into(),
            vaultfs: None,
            allowed_uids: vec![0],
            key_uids: vec![],
            pcrs: EVE_DEFAULT_PCRS.to_vec(),
            vaults: vec![],
        }
    }
}

impl Config {
    pub fn parse(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    /// The vaults to keep: the configured ones, or the secure-by-default pair.
    pub fn effective_vaults(&self) -> Vec<VaultConfig> {
        if !self.vaults.is_empty() {
            return self.vaults.clone();
        }
        ["config", "apps"]
            .iter()
            .map(|n| VaultConfig {
                name: (*n).into(),
                cipher: default_cipher(),
                protector: default_protector(),
                policy: default_policy(),
            })
            .collect()
    }

    pub fn validate(&self) -> Result<(), String> {
        validate_pcr_list(&self.pcrs)?;
        let mut seen = std::collections::HashSet::new();
        for v in &self.vaults {
            validate_vault_name(&v.name)?;
            if !seen.insert(&v.name) {
                return Err(format!("vault {:?} configured twice", v.name));
            }
            if vaultfs_core::CipherSuite::from_name(&v.cipher).is_none() {
                return Err(format!("vault {:?}: unknown cipher {:?}", v.name, v.cipher));
            }
            if v.protector != "tpm" {
                return Err(format!(
                    "vault {:?}: protector {:?} is not supported (tpm)",
                    v.name, v.protector
                ));
            }
            if v.policy != "unlock" && v.policy != "lock" {
                return Err(format!("vault {:?}: policy must be unlock or lock", v.name));
            }
        }
        Ok(())
    }
}

/// A vault name becomes a path component: letters, digits, `-`, `_`, `.`, not starting with `.`.
pub fn validate_vault_name(n: &str) -> Result<(), String> {
    let ok = !n.is_empty()
        && n.len() <= 64
        && !n.starts_with('.')
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid vault name {n:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_default_vaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.mount_root, PathBuf::from("/persist/vault"));
        let v = c.effective_vaults();
        assert_eq!(
            v.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            ["config", "apps"]
        );
        assert!(v
            .iter()
            .all(|v| v.protector == "tpm" && v.cipher == "aes-256-gcm"));
    }

    #[test]
    fn parse_and_validate() {
        let c = Config::parse("pcrs = [0, 7]\n[[vault]]\nname = \"db\"\ncipher = \"aes-256-xts\"\npolicy = \"lock\"\n").unwrap();
        assert_eq!(c.effective_vaults().len(), 1);
        assert!(Config::parse("pcrs = [1, 7]").is_err());
        assert!(Config::parse("pcrs = [0, 5]").is_err());
        assert!(Config::parse("pcrs = [0, 0]").is_err());
        assert!(Config::parse("pcrs = [0, 16]").is_err());
        assert!(Config::parse("bogus = 1").is_err());
        assert!(Config::parse("[[vault]]\nname = \"../x\"\n").is_err());
        assert!(Config::parse("[[vault]]\nname = \"a\"\n[[vault]]\nname = \"a\"\n").is_err());
    }
}
