//! The TPM lives on one dedicated thread (a TSS context is not shareable across threads); async
//! code sends it jobs and awaits the answers.

use crate::tpm::{NvSealed, SealedBlob, Tpm, TpmError};
use vaultfs_core::SecretKey;

type Job = Box<dyn FnOnce(&mut Option<Tpm>) + Send>;

#[derive(Clone)]
pub struct TpmHandle {
    tx: std::sync::mpsc::Sender<Job>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    #[error("no TPM: {0}")]
    NoTpm(String),
    #[error(transparent)]
    Tpm(#[from] TpmError),
    #[error("TPM thread stopped")]
    Stopped,
}

impl TpmHandle {
    /// Starts the TPM thread. A TPM that cannot be opened leaves the handle answering `NoTpm`.
    pub fn start(tcti: String) -> (TpmHandle, Result<bool, String>) {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let (otx, orx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("tpm".into())
            .spawn(move || {
                let mut tpm = match Tpm::open(&tcti) {
                    Ok(t) => {
                        let sw = t.is_software();
                        let _ = otx.send(Ok(sw));
                        Some(t)
                    }
                    Err(e) => {
                        let _ = otx.send(Err(e.to_string()));
                        None
                    }
                };
                while let Ok(job) = rx.recv() {
                    job(&mut tpm);
                }
            })
            .ok();
        let opened = orx
            .recv()
            .unwrap_or_else(|_| Err("TPM thread failed to start".into()));
        (TpmHandle { tx }, opened)
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Tpm) -> Result<T, TpmError> + Send + 'static,
    ) -> Result<T, ActorError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |t: &mut Option<Tpm>| {
            let r = match t.as_mut() {
                Some(t) => f(t).map_err(ActorError::from),
                None => Err(ActorError::NoTpm("the TPM could not be opened".into())),
            };
            let _ = tx.send(r);
        });
        self.tx.send(job).map_err(|_| ActorError::Stopped)?;
        rx.await.map_err(|_| ActorError::Stopped)?
    }

    /// Seals `kek` to the current values of `pcrs` (refused without measured boot, as EVE does).
    pub async fn seal(&self, kek: SecretKey<32>, pcrs: Vec<u8>) -> Result<SealedBlob, ActorError> {
        self.run(move |t| t.seal(&kek, &pcrs)).await
    }

    /// Stores `kek` in a TPM NV index readable only under the PCR policy.
    pub async fn nv_seal(&self, kek: SecretKey<32>, pcrs: Vec<u8>) -> Result<NvSealed, ActorError> {
        self.run(move |t| t.nv_seal(&kek, &pcrs)).await
    }

    pub async fn nv_unseal(&self, rec: NvSealed) -> Result<SecretKey<32>, ActorError> {
        self.run(move |t| t.nv_unseal(&rec)).await
    }

    /// Destroys an NV index (crypto-erase: the key it held is gone for good).
    pub async fn nv_destroy(&self, index: u32) -> Result<(), ActorError> {
        self.run(move |t| t.nv_destroy(index)).await
    }

    pub async fn unseal(&self, blob: SealedBlob) -> Result<SecretKey<32>, ActorError> {
        self.run(move |t| t.unseal(&blob)).await
    }
}
