//! vault-broker: the one process holding vault keys. `tpm` wraps the TPM (tss-esapi types stay
//! there), `tpm_actor` runs it on its own thread, `manager` owns the vault lifecycle, `server`
//! the socket protocol, `config` the TOML configuration.

pub mod config;
pub mod manager;
pub mod server;
pub mod tpm;
pub mod tpm_actor;
