//! Vault lifecycle: create (TPM-sealed protector), unlock (unseal → unwrap → launch vaultfs),
//! lock (stop vaultfs, drop the key), delete (crypto-erase first), and supervision of each
//! vault's vaultfs process.

use crate::config::{Config, VaultConfig};
use crate::tpm::{NvSealed, SealedBlob};
use crate::tpm_actor::{ActorError, TpmHandle};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{broadcast, Mutex};
use tracing::{error, info, warn};
use vaultfs_core::protector::Secret;
use vaultfs_core::protocol::{DataSecStatus, PcrStatus, VaultState, VaultStatus};
use vaultfs_core::vault::{NewProtector, Vault};
use vaultfs_core::{CipherSuite, SecretKey};

struct Entry {
    cfg: VaultConfig,
    status: VaultStatus,
    /// The master key while unlocked (wiped on drop).
    vmk: Option<SecretKey<32>>,
    /// PID of the vaultfs process serving the mount.
    child_pid: Option<u32>,
    /// Bumped on every launch and lock, so a supervisor of an older launch knows it is stale.
    generation: u64,
}

pub struct Manager {
    cfg: Config,
    tpm: TpmHandle,
    vaultfs: PathBuf,
    vaults: Mutex<HashMap<String, Entry>>,
    /// Serializes lifecycle operations (unlock, lock, create, delete, restart).
    ops: Mutex<()>,
    events: broadcast::Sender<VaultStatus>,
    ready: tokio::sync::Notify,
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("no such vault {0:?}")]
    NoSuchVault(String),
    #[error("vault {0:?} is locked")]
    Locked(String),
    #[error("not allowed")]
    NotAllowed,
    #[error("{0}")]
    Failed(String),
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Manager {
    pub fn new(cfg: Config, tpm: TpmHandle, vaultfs: PathBuf) -> Arc<Manager> {
        let (events, _) = broadcast::channel(256);
        let mut map = HashMap::new();
        for v in cfg.effective_vaults() {
            let st = blank_status(&cfg, &v);
            map.insert(
                v.name.clone(),
                Entry {
                    cfg: v,
                    status: st,
                    vmk: None,
                    child_pid: None,
                    generation: 0,
                },
            );
        }
        Arc::new(Manager {
            cfg,
            tpm,
            vaultfs,
            vaults: Mutex::new(map),
            ops: Mutex::new(()),
            events,
            ready: tokio::sync::Notify::new(),
        })
    }

    fn blank_status(&self, v: &VaultConfig) -> VaultStatus {
        blank_status(&self.cfg, v)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<VaultStatus> {
        self.events.subscribe()
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn data_dir(&self, name: &str) -> PathBuf {
        self.cfg.data_root.join(name)
    }

    fn mount_dir(&self, name: &str) -> PathBuf {
        self.cfg.mount_root.join(name)
    }

    async fn publish(&self, name: &str, f: impl FnOnce(&mut Entry)) {
        let mut map = self.vaults.lock().await;
        if let Some(e) = map.get_mut(name) {
            f(e);
            let _ = self.events.send(e.status.clone());
        }
        drop(map);
        self.ready.notify_waiters();
    }

    async fn set_error(&self, name: &str, msg: String, mismatching: Vec<u8>) {
        error!(vault = name, "{msg}");
        self.publish(name, |e| {
            e.vmk = None;
            e.status.state = VaultState::Error;
            e.status.status = DataSecStatus::Error;
            e.status.unlock_method = "none".into();
            e.status.mismatching_pcrs = mismatching;
            e.status.mounted = false;
            e.status.error = Some(msg);
            e.status.error_time = Some(now_secs());
        })
        .await;
    }

    pub async fn status(&self) -> Vec<VaultStatus> {
        let map = self.vaults.lock().await;
        let mut v: Vec<VaultStatus> = map.values().map(|e| e.status.clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Applies the configuration: every vault is created if absent, then unlocked per policy.
    pub async fn start(self: &Arc<Self>) {
        let names: Vec<(String, String)> = {
            let map = self.vaults.lock().await;
            map.values()
                .map(|e| (e.cfg.name.clone(), e.cfg.policy.clone()))
                .collect()
        };
        for (name, policy) in names {
            if let Err(e) = self.ensure_created(&name).await {
                self.set_error(&name, format!("cannot create vault: {e}"), vec![])
                    .await;
                continue;
            }
            if policy == "unlock" {
                if let Err(e) = self.unlock(&name).await {
                    warn!(vault = name, "not unlocked: {e}");
                }
            }
        }
    }

    async fn ensure_created(&self, name: &str) -> Result<(), ManagerError> {
        let dir = self.data_dir(name);
        let cfg = {
            let map = self.vaults.lock().await;
            map.get(name)
                .map(|e| e.cfg.clone())
                .ok_or_else(|| ManagerError::NoSuchVault(name.into()))?
        };
        if !dir.join(vaultfs_core::format::META_FILE).exists() {
            std::fs::create_dir_all(&dir)
                .map_err(|e| ManagerError::Failed(format!("{}: {e}", dir.display())))?;
            let kek = SecretKey::<32>::random().map_err(|e| ManagerError::Failed(e.to_string()))?;
            let kek_copy = SecretKey::from_slice(kek.expose_secret())
                .ok_or(ManagerError::Failed("key".into()))?;
            let blob = self
                .tpm
                .nv_seal(kek_copy, self.cfg.pcrs.clone())
                .await
                .map_err(|e| {
                    ManagerError::Failed(format!("sealing the vault key in the TPM failed: {e}"))
                })?;
            let sealed =
                serde_json::to_value(&blob).map_err(|e| ManagerError::Failed(e.to_string()))?;
            let suite =
                CipherSuite::from_name(&cfg.cipher).ok_or(ManagerError::Failed("cipher".into()))?;
            let secret = Secret::Kek {
                kind: "tpm",
                key: kek,
            };
            Vault::create(
                &dir,
                name,
                suite,
                &NewProtector {
                    secret: &secret,
                    label: Some("tpm".into()),
                    argon2: (0, 0, 0),
                    sealed: Some(sealed),
                },
            )
            .map_err(|e| ManagerError::Failed(e.to_string()))?;
            info!(
                vault = name,
                "created, protected by the TPM (PCRs {:?})", self.cfg.pcrs
            );
        }
        self.publish(name, |e| {
            if e.status.state == VaultState::Absent {
                e.status.state = VaultState::Locked;
                e.status.status = DataSecStatus::Enabled;
            }
        })
        .await;
        Ok(())
    }

    /// Unseals, unwraps and mounts.
    pub async fn unlock(self: &Arc<Self>, name: &str) -> Result<(), ManagerError> {
        let _op = self.ops.lock().await;
        self.unlock_inner(name).await
    }

    async fn unlock_inner(self: &Arc<Self>, name: &str) -> Result<(), ManagerError> {
        {
            let map = self.vaults.lock().await;
            let e = map
                .get(name)
                .ok_or_else(|| ManagerError::NoSuchVault(name.into()))?;
            if e.status.state == VaultState::Unlocked {
                return Ok(());
            }
        }
        self.publish(name, |e| e.status.state = VaultState::Unlocking)
            .await;
        let dir = self.data_dir(name);
        let meta = match Vault::read_meta(&dir) {
            Ok(m) => m,
            Err(e) => {
                self.set_error(name, format!("vault metadata unreadable: {e}"), vec![])
                    .await;
                return Err(ManagerError::Failed(e.to_string()));
            }
        };
        let Some(rec) = meta.protectors.iter().find(|r| r.kind == "tpm").cloned() else {
            self.set_error(name, "vault has no tpm protector".into(), vec![])
                .await;
            return Err(ManagerError::Failed("no tpm protector".into()));
        };
        let sealing = match rec.sealed.clone().map(Sealing::from_json) {
            Some(Some(x)) => x,
            _ => {
                self.set_error(name, "tpm protector record is malformed".into(), vec![])
                    .await;
                return Err(ManagerError::Failed("malformed tpm record".into()));
            }
        };
        let unsealed = match sealing {
            Sealing::Nv(r) => self.tpm.nv_unseal(r).await,
            Sealing::Object(b) => self.tpm.unseal(b).await,
        };
        let kek = match unsealed {
            Ok(k) => k,
            Err(ActorError::Tpm(crate::tpm::TpmError::PcrMismatch { mismatching })) => {
                let msg = format!(
                    "Vault key unavailable; possibly mismatching PCR indexes {mismatching:?}"
                );
                self.set_error(name, msg.clone(), mismatching).await;
                return Err(ManagerError::Failed(msg));
            }
            Err(e) => {
                self.set_error(name, format!("Vault key unavailable: {e}"), vec![])
                    .await;
                return Err(ManagerError::Failed(e.to_string()));
            }
        };
        let vault = match Vault::unlock_record(
            &dir,
            meta,
            &rec.id,
            &Secret::Kek {
                kind: "tpm",
                key: kek,
            },
        ) {
            Ok(v) => v,
            Err(e) => {
                self.set_error(
                    name,
                    format!("unwrapping the vault key failed: {e}"),
                    vec![],
                )
                .await;
                return Err(ManagerError::Failed(e.to_string()));
            }
        };
        let vmk = SecretKey::from_slice(vault.master_key().expose_secret())
            .ok_or(ManagerError::Failed("key".into()))?;
        drop(vault);
        self.publish(name, |e| e.vmk = Some(vmk)).await;
        if let Err(e) = self.launch(name).await {
            // Never leave a key behind for a vault that is not mounted.
            self.set_error(name, format!("mounting failed: {e}"), vec![])
                .await;
            return Err(e);
        }
        Ok(())
    }

    /// Starts vaultfs for an unlocked vault and supervises it.
    async fn launch(self: &Arc<Self>, name: &str) -> Result<(), ManagerError> {
        let mnt = self.mount_dir(name);
        std::fs::create_dir_all(&mnt)
            .map_err(|e| ManagerError::Failed(format!("{}: {e}", mnt.display())))?;
        if is_mounted(&mnt) {
            // A mount left by an earlier broker: replace it with one this broker supervises.
            let _ = tokio::process::Command::new("fusermount3")
                .arg("-uz")
                .arg(&mnt)
                .status()
                .await;
        }
        let (rd, wr) = std::io::pipe().map_err(|e| ManagerError::Failed(e.to_string()))?;
        let wr_fd: std::os::fd::OwnedFd = wr.into();
        rustix::io::fcntl_setfd(&wr_fd, rustix::io::FdFlags::empty())
            .map_err(|e| ManagerError::Failed(e.to_string()))?;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&wr_fd);
        let mut cmd = tokio::process::Command::new(&self.vaultfs);
        cmd.arg("-f")
            .arg("--broker")
            .arg(&self.cfg.socket)
            .arg("--vault")
            .arg(name)
            .arg("--ready-fd")
            .arg(raw.to_string())
            .arg(self.data_dir(name))
            .arg(&mnt)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(false);
        let gen = {
            let mut map = self.vaults.lock().await;
            let e = map
                .get_mut(name)
                .ok_or_else(|| ManagerError::NoSuchVault(name.into()))?;
            e.generation += 1;
            e.generation
        };
        // The child's PID must be known before it asks for its key: hold the lock across spawn.
        let mut child = {
            let mut map = self.vaults.lock().await;
            let child = cmd
                .spawn()
                .map_err(|e| ManagerError::Failed(format!("starting vaultfs: {e}")))?;
            if let Some(e) = map.get_mut(name) {
                e.child_pid = child.id();
            }
            child
        };
        drop(wr_fd);
        // Ready when vaultfs writes a byte (mounted); EOF means it failed.
        let ready = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut rd = rd;
            let mut b = [0u8; 1];
            matches!(rd.read(&mut b), Ok(1))
        })
        .await
        .unwrap_or(false);
        if !ready {
            let status = child.wait().await.ok();
            self.set_error(
                name,
                format!("vaultfs failed to mount ({status:?})"),
                vec![],
            )
            .await;
            return Err(ManagerError::Failed("mount failed".into()));
        }
        self.publish(name, |e| {
            e.status.state = VaultState::Unlocked;
            e.status.status = DataSecStatus::Enabled;
            e.status.unlock_method = "tpm-local-sealed".into();
            e.status.mismatching_pcrs.clear();
            e.status.mounted = true;
            e.status.conversion_complete = true;
            e.status.error = None;
            e.status.error_time = None;
        })
        .await;
        info!(vault = name, "unlocked and mounted at {}", mnt.display());
        let me = Arc::clone(self);
        let name = name.to_string();
        tokio::spawn(async move {
            let st = child.wait().await;
            me.child_exited(&name, gen, st.ok()).await;
        });
        Ok(())
    }

    /// A vaultfs process ended: expected after lock; otherwise restart it.
    async fn child_exited(
        self: &Arc<Self>,
        name: &str,
        gen: u64,
        st: Option<std::process::ExitStatus>,
    ) {
        let _op = self.ops.lock().await;
        let (current, unlocked) = {
            let mut map = self.vaults.lock().await;
            match map.get_mut(name) {
                Some(e) if e.generation == gen => {
                    // The dead process must not be able to ask for the key any more.
                    e.child_pid = None;
                    (true, e.vmk.is_some())
                }
                Some(_) => (false, false),
                None => (false, false),
            }
        };
        if !current || !unlocked {
            return;
        }
        warn!(
            vault = name,
            "vaultfs exited unexpectedly ({st:?}); restarting"
        );
        self.publish(name, |e| e.status.mounted = false).await;
        let _ = tokio::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(self.mount_dir(name))
            .status()
            .await;
        match Arc::clone(self).relaunch(name.to_string()).await {
            Ok(()) => {
                // Reported, though the vault is usable again.
                let note = format!("vaultfs exited unexpectedly ({st:?}); restarted and remounted");
                self.publish(name, |e| {
                    e.status.error = Some(note);
                    e.status.error_time = Some(now_secs());
                })
                .await;
            }
            Err(e) => {
                self.set_error(name, format!("vaultfs restart failed: {e}"), vec![])
                    .await;
            }
        }
    }

    /// `launch` as a boxed `Send` future: breaks the launch → supervise → launch type cycle.
    fn relaunch(
        self: Arc<Self>,
        name: String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ManagerError>> + Send>> {
        Box::pin(async move { self.launch(&name).await })
    }

    /// Stops the vault's vaultfs (it unmounts and exits) and drops the key.
    pub async fn lock(&self, name: &str) -> Result<(), ManagerError> {
        let _op = self.ops.lock().await;
        self.lock_inner(name).await
    }

    async fn lock_inner(&self, name: &str) -> Result<(), ManagerError> {
        let pid = {
            let mut map = self.vaults.lock().await;
            let e = map
                .get_mut(name)
                .ok_or_else(|| ManagerError::NoSuchVault(name.into()))?;
            if e.status.state == VaultState::Absent {
                return Err(ManagerError::NoSuchVault(name.into()));
            }
            e.generation += 1;
            e.vmk = None;
            e.child_pid.take()
        };
        if let Some(pid) = pid {
            stop_process(pid).await;
        }
        let mnt = self.mount_dir(name);
        if is_mounted(&mnt) {
            let _ = tokio::process::Command::new("fusermount3")
                .arg("-u")
                .arg(&mnt)
                .status()
                .await;
        }
        self.publish(name, |e| {
            e.status.state = VaultState::Locked;
            e.status.unlock_method = "none".into();
            e.status.mounted = false;
        })
        .await;
        info!(vault = name, "locked");
        Ok(())
    }

    /// Crypto-erase, then remove the data.
    pub async fn delete(&self, name: &str) -> Result<(), ManagerError> {
        let _op = self.ops.lock().await;
        self.lock_inner(name).await?;
        let dir = self.data_dir(name);
        if dir.join(vaultfs_core::format::META_FILE).exists() {
            // Crypto-erase: first the key inside the TPM, then every wrapped copy on disk.
            if let Ok(meta) = Vault::read_meta(&dir) {
                for rec in meta.protectors.iter().filter(|r| r.kind == "tpm") {
                    if let Some(Some(Sealing::Nv(nv))) = rec.sealed.clone().map(Sealing::from_json)
                    {
                        self.tpm.nv_destroy(nv.index).await.map_err(|e| {
                            ManagerError::Failed(format!("destroying the TPM key failed: {e}"))
                        })?;
                    }
                }
            }
            Vault::crypto_erase(&dir).map_err(|e| ManagerError::Failed(e.to_string()))?;
        }
        let _ = std::fs::remove_dir_all(&dir);
        self.publish(name, |e| {
            e.status.state = VaultState::Absent;
            e.status.status = DataSecStatus::Unknown;
        })
        .await;
        info!(vault = name, "deleted (crypto-erased)");
        Ok(())
    }

    pub async fn create(self: &Arc<Self>, name: &str) -> Result<(), ManagerError> {
        let _op = self.ops.lock().await;
        crate::config::validate_vault_name(name).map_err(ManagerError::Failed)?;
        {
            let mut map = self.vaults.lock().await;
            if !map.contains_key(name) {
                let cfg = VaultConfig {
                    name: name.into(),
                    cipher: "aes-256-gcm".into(),
                    protector: "tpm".into(),
                    policy: "unlock".into(),
                };
                let st = self.blank_status(&cfg);
                map.insert(
                    name.into(),
                    Entry {
                        cfg,
                        status: st,
                        vmk: None,
                        child_pid: None,
                        generation: 0,
                    },
                );
            }
        }
        self.ensure_created(name).await?;
        self.unlock_inner(name).await
    }

    /// The key, for the vaultfs this broker launched for the vault (or an allowed peer).
    pub async fn vault_key(
        &self,
        name: &str,
        peer_pid: Option<u32>,
        peer_uid: u32,
    ) -> Result<SecretKey<32>, ManagerError> {
        let map = self.vaults.lock().await;
        let e = map
            .get(name)
            .ok_or_else(|| ManagerError::NoSuchVault(name.into()))?;
        let launched = peer_pid.is_some() && e.child_pid == peer_pid;
        if !launched && !self.cfg.key_uids.contains(&peer_uid) {
            return Err(ManagerError::NotAllowed);
        }
        let k = e
            .vmk
            .as_ref()
            .ok_or_else(|| ManagerError::Locked(name.into()))?;
        SecretKey::from_slice(k.expose_secret()).ok_or(ManagerError::Failed("key".into()))
    }

    /// Waits until the vault is unlocked and mounted.
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> Result<(), ManagerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.ready.notified();
            {
                let map = self.vaults.lock().await;
                let e = map
                    .get(name)
                    .ok_or_else(|| ManagerError::NoSuchVault(name.into()))?;
                if e.status.state == VaultState::Unlocked && e.status.mounted {
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(ManagerError::Failed("timed out".into()));
            }
        }
    }

    /// Stops every vaultfs (used on broker shutdown when configured to lock).
    pub async fn lock_all(&self) {
        let names: Vec<String> = self.vaults.lock().await.keys().cloned().collect();
        for n in names {
            let _ = self.lock(&n).await;
        }
    }
}

/// How a `tpm` protector's KEK is kept: in an NV index (current), or as a sealed object blob
/// (read for vaults made by earlier builds).
enum Sealing {
    Nv(NvSealed),
    Object(SealedBlob),
}

impl Sealing {
    fn from_json(v: serde_json::Value) -> Option<Sealing> {
        if let Ok(n) = serde_json::from_value::<NvSealed>(v.clone()) {
            return Some(Sealing::Nv(n));
        }
        serde_json::from_value::<SealedBlob>(v)
            .ok()
            .map(Sealing::Object)
    }
}

fn blank_status(cfg: &Config, v: &VaultConfig) -> VaultStatus {
    VaultStatus {
        name: v.name.clone(),
        state: VaultState::Absent,
        status: DataSecStatus::Unknown,
        pcr_status: PcrStatus::Enabled,
        mismatching_pcrs: vec![],
        unlock_method: "none".into(),
        mountpoint: cfg.mount_root.join(&v.name).display().to_string(),
        mounted: false,
        cipher: v.cipher.clone(),
        authenticated: CipherSuite::from_name(&v.cipher).is_some_and(|s| s.is_authenticated()),
        conversion_complete: false,
        error: None,
        error_time: None,
    }
}

pub fn is_mounted(p: &std::path::Path) -> bool {
    let Ok(m) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let want = p.display().to_string();
    m.lines()
        .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
}

async fn stop_process(pid: u32) {
    let Some(p) = rustix::process::Pid::from_raw(pid as i32) else {
        return;
    };
    let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
    // The supervisor task reaps it; wait until it is gone (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z ") {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
