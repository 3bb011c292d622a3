//! The broker's TPM module: the one place in vaultfs that touches `tss-esapi`.
//!
//! It seals a 32-byte key-encryption key to a PolicyPCR policy over the SHA-256 bank, the way EVE
//! does (see `eve-interfaces.md`, "TPM usage"):
//!
//! - the sealed object is a KeyedHash data object with `fixedTPM | fixedParent | adminWithPolicy`
//!   (no `userWithAuth`: only a policy session satisfying the PCR policy can unseal it);
//! - its parent is a storage primary key (ECC P-256, restricted decrypt, AES-128-CFB) re-created
//!   in the owner hierarchy for every operation (primary keys are deterministic) and flushed after;
//! - the secret crosses the TPM bus only inside salted, AES-128-CFB parameter-encrypted sessions;
//! - sealing is refused when PCR 0 or PCR 4 reads all zeros (no measured boot).
//!
//! A [`SealedBlob`] can be unsealed by anyone holding a copy of it, for as long as the TPM lives,
//! so deleting the file holding it does not erase the key. For crypto-erase, [`Tpm::nv_seal`]
//! stores the key *inside* the TPM instead, in an NV index of the owner hierarchy under the same
//! kind of PCR policy; the [`NvSealed`] record kept on disk only names the index. Undefining the
//! index ([`Tpm::nv_destroy`]) destroys the key for good, whatever copies of the record exist.
//!
//! No tss-esapi type leaves this module: callers see [`Tpm`], [`SealedBlob`], [`NvSealed`] and
//! [`TpmError`].

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tss_esapi::{
    attributes::{NvIndexAttributes, ObjectAttributesBuilder, SessionAttributesBuilder},
    constants::{CapabilityType, NvIndexType, PropertyTag, SessionType, Tss2ResponseCodeKind},
    handles::{
        KeyHandle, NvIndexHandle, NvIndexTpmHandle, ObjectHandle, PcrHandle, SessionHandle,
        TpmHandle,
    },
    interface_types::{
        algorithm::{HashingAlgorithm, PublicAlgorithm},
        ecc::EccCurve,
        resource_handles::{Hierarchy, NvAuth, Provision},
        session_handles::{AuthSession, PolicySession},
    },
    structures::{
        CapabilityData, Digest, DigestValues, EccParameter, EccPoint, KeyedHashScheme, MaxNvBuffer,
        NvPublic, NvPublicBuilder, PcrSelectionList, PcrSlot, Private, Public, PublicBuffer,
        PublicBuilder, PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData,
        SymmetricDefinition, SymmetricDefinitionObject,
    },
    tcti_ldr::TctiNameConf,
    traits::{Marshall, UnMarshall},
    Context,
};
use vaultfs_core::SecretKey;

/// EVE's default sealing PCRs: 0–4 and 6–14 (5 flips with GPT changes on A/B updates, 15 is
/// OS/user).
pub const DEFAULT_PCRS: [u8; 14] = [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14];

/// PCRs that must not read all zeros when sealing: firmware (0) and boot loader (4).
const MEASURED_BOOT_PCRS: [u8; 2] = [0, 4];

/// Number of PCRs per bank on a PC-client TPM (and on swtpm).
const PCR_COUNT: u8 = 24;

/// `sizeofSelect` of every PCR selection we send (three octets = PCRs 0..23).
const PCR_SELECT_OCTETS: usize = 3;

/// TPM_CC_PolicyPCR, for computing the expected policy digest locally.
const TPM_CC_POLICY_PCR: u32 = 0x0000_017F;

/// TPM_ALG_SHA256.
const TPM_ALG_SHA256: u16 = 0x000B;

/// Version of the [`SealedBlob`] layout.
pub const SEALED_BLOB_VERSION: u32 = 1;

/// How many times [`Tpm::read_pcrs`] restarts when PCRs change between its batched reads.
const PCR_READ_ATTEMPTS: usize = 5;

/// Version of the [`NvSealed`] layout.
pub const NV_SEALED_VERSION: u32 = 1;

/// First NV index [`Tpm::nv_seal`] allocates from (owner hierarchy).
pub const NV_INDEX_FIRST: u32 = 0x01C1_0000;

/// Last NV index (inclusive) [`Tpm::nv_seal`] allocates from: 256 indexes in all.
pub const NV_INDEX_LAST: u32 = 0x01C1_00FF;

/// Size of the data area of a vaultfs NV index: exactly one 32-byte key.
const NV_SECRET_SIZE: u16 = 32;

/// How many times [`Tpm::nv_seal`] picks another index when a free one was taken (by another TPM
/// user) between the handle query and TPM2_NV_DefineSpace.
const NV_DEFINE_ATTEMPTS: usize = 5;

/// Errors of the TPM module: one variant per TPM operation, carrying the TSS error text (never
/// key bytes).
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("invalid TCTI configuration {tcti:?}: {reason}")]
    Tcti { tcti: String, reason: String },
    #[error("cannot open the TPM via {tcti:?}: {reason}")]
    Open { tcti: String, reason: String },
    #[error("TPM2_GetCapability failed: {0}")]
    Capability(String),
    #[error("TPM2_PCR_Read failed: {0}")]
    PcrRead(String),
    #[error("TPM2_PCR_Extend of PCR {pcr} failed: {reason}")]
    PcrExtend { pcr: u8, reason: String },
    #[error("TPM2_GetRandom failed: {0}")]
    Random(String),
    #[error("TPM2_CreatePrimary (storage key) failed: {0}")]
    CreatePrimary(String),
    #[error("TPM2_StartAuthSession failed: {0}")]
    Session(String),
    #[error("PCR policy failed: {0}")]
    Policy(String),
    #[error("TPM2_Create (seal) failed: {0}")]
    Seal(String),
    #[error("TPM2_Load of the sealed object failed: {0}")]
    Load(String),
    #[error("TPM2_Unseal failed: {0}")]
    Unseal(String),
    #[error("invalid PCR list: {0}")]
    InvalidPcrList(String),
    #[error("refusing to seal: PCR(s) {zero:?} read all zeros (no measured boot)")]
    NoMeasuredBoot { zero: Vec<u8> },
    #[error("PCR policy not satisfied; mismatching PCR indexes {mismatching:?}")]
    PcrMismatch { mismatching: Vec<u8> },
    #[error("malformed sealed blob: {0}")]
    BadBlob(String),
    #[error("TPM2_NV_DefineSpace failed: {0}")]
    NvDefine(String),
    #[error("TPM2_NV_Write failed: {0}")]
    NvWrite(String),
    #[error("TPM2_NV_Read failed: {0}")]
    NvRead(String),
    #[error("TPM2_NV_UndefineSpace failed: {0}")]
    NvUndefine(String),
    /// The NV index a record names no longer holds the key sealed there: it was undefined
    /// ([`Tpm::nv_destroy`], TPM2_Clear), or something else has been defined at it since.
    #[error("NV index {index:#010x} does not exist, or is not the one this record was sealed to")]
    NvMissing { index: u32 },
}

/// One PCR of the SHA-256 bank and its value at sealing time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PcrValue {
    pub index: u8,
    #[serde(with = "hex32")]
    pub sha256: [u8; 32],
}

/// A secret sealed by [`Tpm::seal`]. Holds nothing secret: the private part is encrypted by the
/// TPM under its storage key and can be loaded only on the TPM that created it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedBlob {
    /// [`SEALED_BLOB_VERSION`]; other versions are refused.
    pub version: u32,
    /// Marshalled TPM2B_PUBLIC of the sealed object (base64 in serde form).
    #[serde(with = "b64")]
    pub public: Vec<u8>,
    /// Marshalled TPM2B_PRIVATE of the sealed object (base64 in serde form).
    #[serde(with = "b64")]
    pub private: Vec<u8>,
    /// The sealing PCRs (SHA-256 bank) in ascending order, with their values at sealing time.
    pub pcrs: Vec<PcrValue>,
}

impl SealedBlob {
    /// The sealing PCR indexes, ascending.
    pub fn pcr_indexes(&self) -> Vec<u8> {
        self.pcrs.iter().map(|p| p.index).collect()
    }
}

/// A secret stored in a TPM NV index by [`Tpm::nv_seal`]. Holds nothing secret: only the index
/// and the PCR values its read policy demands. Once the index is undefined ([`Tpm::nv_destroy`])
/// the record, and every copy of it, is useless.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvSealed {
    /// [`NV_SEALED_VERSION`]; other versions are refused.
    pub version: u32,
    /// The NV index holding the secret, in [`NV_INDEX_FIRST`]..=[`NV_INDEX_LAST`].
    pub index: u32,
    /// The sealing PCRs (SHA-256 bank) in ascending order, with their values at sealing time.
    pub pcrs: Vec<PcrValue>,
}

impl NvSealed {
    /// The sealing PCR indexes, ascending.
    pub fn pcr_indexes(&self) -> Vec<u8> {
        self.pcrs.iter().map(|p| p.index).collect()
    }
}

/// What the TPM says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpmInfo {
    /// TPM2_PT_MANUFACTURER as text, e.g. `IBM` (swtpm), `INTC`, `IFX`, `STM`, `NTC`.
    pub manufacturer: String,
    /// TPM2_PT_VENDOR_STRING_1..4 as text, e.g. `SW   TPM` (swtpm).
    pub vendor: String,
    /// True for a software TPM (simulator transport or a simulator's vendor identification).
    pub software: bool,
}

/// An open TPM. Not shareable: callers serialize access (one command sequence at a time).
pub struct Tpm {
    ctx: Context,
    info: TpmInfo,
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm").field("info", &self.info).finish()
    }
}

impl Tpm {
    /// Opens the TPM named by a TCTI string such as `device:/dev/tpmrm0` or
    /// `swtpm:host=127.0.0.1,port=2321`. Logs a loud warning when the TPM is a software one.
    #[tracing::instrument(skip_all, fields(tcti = %tcti))]
    pub fn open(tcti: &str) -> Result<Tpm, TpmError> {
        let conf = TctiNameConf::from_str(tcti).map_err(|e| TpmError::Tcti {
            tcti: tcti.to_owned(),
            reason: e.to_string(),
        })?;
        let simulator_transport = matches!(conf, TctiNameConf::Swtpm(_) | TctiNameConf::Mssim(_));
        let mut ctx = Context::new(conf).map_err(|e| TpmError::Open {
            tcti: tcti.to_owned(),
            reason: e.to_string(),
        })?;
        let manufacturer = property_text(&mut ctx, &[PropertyTag::Manufacturer])?;
        let vendor = property_text(
            &mut ctx,
            &[
                PropertyTag::VendorString1,
                PropertyTag::VendorString2,
                PropertyTag::VendorString3,
                PropertyTag::VendorString4,
            ],
        )?;
        let software = simulator_transport || is_software_tpm(&manufacturer, &vendor);
        if software {
            tracing::warn!(
                manufacturer = %manufacturer,
                vendor = %vendor,
                "!!! SOFTWARE TPM IN USE: sealed keys are NOT protected by hardware; \
                 anyone with access to the TPM state can unseal them. Test/demo use only. !!!"
            );
        } else {
            tracing::info!(manufacturer = %manufacturer, vendor = %vendor, "TPM opened");
        }
        Ok(Tpm {
            ctx,
            info: TpmInfo {
                manufacturer,
                vendor,
                software,
            },
        })
    }

    /// True when the TPM is a software TPM (swtpm, a simulator); decided once at [`Tpm::open`].
    pub fn is_software(&self) -> bool {
        self.info.software
    }

    /// Manufacturer and vendor identification read at [`Tpm::open`].
    pub fn info(&self) -> &TpmInfo {
        &self.info
    }

    /// Reads PCRs of the SHA-256 bank. Returns `(index, value)` in ascending index order,
    /// duplicates removed. The TPM returns at most 8 values per TPM2_PCR_Read; all batches are
    /// taken at the same PCR update counter, so the result is one consistent snapshot.
    #[tracing::instrument(skip_all)]
    pub fn read_pcrs(&mut self, pcrs: &[u8]) -> Result<Vec<(u8, [u8; 32])>, TpmError> {
        read_pcrs_sha256(&mut self.ctx, pcrs)
    }

    /// Extends the SHA-256 bank of `pcr` with SHA-256(`data`) (as a boot measurement would).
    #[tracing::instrument(skip_all, fields(pcr))]
    pub fn extend_pcr(&mut self, pcr: u8, data: &[u8]) -> Result<(), TpmError> {
        let err = |reason: String| TpmError::PcrExtend { pcr, reason };
        if pcr >= PCR_COUNT {
            return Err(err(format!("PCR index out of range 0..{PCR_COUNT}")));
        }
        let handle = PcrHandle::try_from(u32::from(pcr)).map_err(|e| err(e.to_string()))?;
        let digest =
            Digest::try_from(Sha256::digest(data).to_vec()).map_err(|e| err(e.to_string()))?;
        let mut values = DigestValues::new();
        values.set(HashingAlgorithm::Sha256, digest);
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.pcr_extend(handle, values)
            })
            .map_err(|e| err(e.to_string()))
    }

    /// 32 random bytes from the TPM's RNG, returned over a salted, response-encrypted session.
    #[tracing::instrument(skip_all)]
    pub fn random_key(&mut self) -> Result<SecretKey<32>, TpmError> {
        with_primary(&mut self.ctx, |ctx, primary| {
            with_session(
                ctx,
                Some(primary),
                SessionType::Hmac,
                true,
                false,
                |ctx, session| {
                    SecretKey::try_fill(|buf: &mut [u8; 32]| {
                        let mut filled = 0;
                        while filled < buf.len() {
                            let chunk = ctx
                                .execute_with_session(Some(session), |ctx| {
                                    ctx.get_random(buf.len() - filled)
                                })
                                .map_err(|e| TpmError::Random(e.to_string()))?;
                            if chunk.is_empty() || chunk.len() > buf.len() - filled {
                                return Err(TpmError::Random(format!(
                                    "TPM returned {} bytes",
                                    chunk.len()
                                )));
                            }
                            buf[filled..filled + chunk.len()].copy_from_slice(chunk.value());
                            filled += chunk.len();
                        }
                        Ok(())
                    })
                },
            )
        })
    }

    /// Seals `secret` to the current values of `pcrs` (SHA-256 bank). `pcrs` must pass
    /// [`validate_pcr_list`]. Refused with [`TpmError::NoMeasuredBoot`] when PCR 0 or PCR 4
    /// reads all zeros.
    pub fn seal(&mut self, secret: &SecretKey<32>, pcrs: &[u8]) -> Result<SealedBlob, TpmError> {
        self.seal_checked(secret, pcrs, true)
    }

    /// [`Tpm::seal`] with the measured-boot check optional: `require_measured_boot = false`
    /// seals even when PCR 0 or PCR 4 reads all zeros (development machines without measured
    /// boot; logged as a warning). EVE always requires it.
    #[tracing::instrument(skip_all, fields(pcrs = ?pcrs, require_measured_boot))]
    pub fn seal_checked(
        &mut self,
        secret: &SecretKey<32>,
        pcrs: &[u8],
        require_measured_boot: bool,
    ) -> Result<SealedBlob, TpmError> {
        let (pcrs, values, policy) = sealing_policy(&mut self.ctx, pcrs, require_measured_boot)?;

        let template = sealed_object_template(policy).map_err(|e| TpmError::Seal(e.to_string()))?;
        // Moved into a zeroizing buffer inside SensitiveData.
        let sensitive = SensitiveData::try_from(secret.expose_secret().to_vec())
            .map_err(|e| TpmError::Seal(e.to_string()))?;

        let created = with_primary(&mut self.ctx, |ctx, primary| {
            // decrypt: inSensitive (the secret) travels encrypted to the TPM;
            // encrypt: outPrivate comes back encrypted too.
            with_session(
                ctx,
                Some(primary),
                SessionType::Hmac,
                true,
                true,
                |ctx, session| {
                    ctx.execute_with_session(Some(session), |ctx| {
                        ctx.create(primary, template, None, Some(sensitive), None, None)
                    })
                    .map_err(|e| TpmError::Seal(e.to_string()))
                },
            )
        })?;

        let public = PublicBuffer::try_from(created.out_public)
            .and_then(|p| p.marshall())
            .map_err(|e| TpmError::Seal(format!("marshalling TPM2B_PUBLIC: {e}")))?;
        let private = marshal_tpm2b(created.out_private.value())
            .map_err(|e| TpmError::Seal(format!("marshalling TPM2B_PRIVATE: {e}")))?;
        tracing::info!(pcrs = ?pcrs, "secret sealed to PCR policy");
        Ok(SealedBlob {
            version: SEALED_BLOB_VERSION,
            public,
            private,
            pcrs: values
                .into_iter()
                .map(|(index, sha256)| PcrValue { index, sha256 })
                .collect(),
        })
    }

    /// Unseals a blob made by [`Tpm::seal`] on this TPM. When the PCR policy is not satisfied,
    /// returns [`TpmError::PcrMismatch`] naming the PCRs whose values changed since sealing.
    #[tracing::instrument(skip_all, fields(pcrs = ?blob.pcr_indexes()))]
    pub fn unseal(&mut self, blob: &SealedBlob) -> Result<SecretKey<32>, TpmError> {
        let parsed = parse_blob(blob)?;
        let indexes = blob.pcr_indexes();
        let recorded: Vec<(u8, [u8; 32])> = blob.pcrs.iter().map(|p| (p.index, p.sha256)).collect();
        let composite = pcr_composite_digest(&recorded);
        let selection = sha256_selection(&indexes).map_err(|e| TpmError::BadBlob(e.to_string()))?;

        let result = with_primary(&mut self.ctx, |ctx, primary| {
            let object = ctx
                .execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.load(primary, parsed.private, parsed.public)
                })
                .map_err(|e| TpmError::Load(e.to_string()))?;
            // encrypt: outData (the secret) comes back encrypted under the salted session key.
            let unsealed = with_session(
                ctx,
                Some(primary),
                SessionType::Policy,
                true,
                false,
                |ctx, session| {
                    let policy = PolicySession::try_from(session)
                        .map_err(|e| TpmError::Session(e.to_string()))?;
                    let composite = Digest::try_from(composite.to_vec())
                        .map_err(|e| TpmError::Policy(e.to_string()))?;
                    ctx.execute_without_session(|ctx| ctx.policy_pcr(policy, composite, selection))
                        .map_err(|e| TpmError::Policy(e.to_string()))?;
                    let data = ctx
                        .execute_with_session(Some(session), |ctx| ctx.unseal(object.into()))
                        .map_err(|e| TpmError::Unseal(e.to_string()))?;
                    // `data` zeroizes its buffer on drop.
                    if data.len() != 32 {
                        return Err(TpmError::Unseal(format!(
                            "sealed object holds {} bytes, expected 32",
                            data.len()
                        )));
                    }
                    SecretKey::try_fill(|buf: &mut [u8; 32]| {
                        buf.copy_from_slice(data.value());
                        Ok(())
                    })
                },
            );
            flush(ctx, object.into());
            unsealed
        });

        match result {
            Err(err @ (TpmError::Policy(_) | TpmError::Unseal(_))) => {
                // Which PCRs moved? (The blob's recorded values were checked against the object's
                // policy in `parse_blob`, so they are the values the policy demands.)
                match changed_pcrs(&mut self.ctx, &recorded) {
                    Some(mismatching) => {
                        tracing::warn!(?mismatching, "unseal refused: PCR values changed");
                        Err(TpmError::PcrMismatch { mismatching })
                    }
                    None => Err(err),
                }
            }
            other => other,
        }
    }

    /// Stores `secret` in a fresh NV index of the owner hierarchy, readable only under a
    /// PolicyPCR policy over the current values of `pcrs` (SHA-256 bank). `pcrs` must pass
    /// [`validate_pcr_list`]. Refused with [`TpmError::NoMeasuredBoot`] when PCR 0 or PCR 4
    /// reads all zeros.
    ///
    /// Unlike [`Tpm::seal`], the secret lives only inside the TPM: [`Tpm::nv_destroy`] erases it
    /// for good, and the returned record is useless from then on.
    pub fn nv_seal(&mut self, secret: &SecretKey<32>, pcrs: &[u8]) -> Result<NvSealed, TpmError> {
        self.nv_seal_checked(secret, pcrs, true)
    }

    /// [`Tpm::nv_seal`] with the measured-boot check optional, as [`Tpm::seal_checked`].
    ///
    /// The index (in [`NV_INDEX_FIRST`]..=[`NV_INDEX_LAST`], the lowest free one) is an ordinary
    /// 32-byte index, authPolicy = the PolicyPCR digest, attributes `OWNERWRITE | POLICYREAD |
    /// NO_DA`: no `AUTHREAD`/`OWNERREAD` (only a policy session satisfying the PCR policy can
    /// read it), no `POLICYWRITE`/`AUTHWRITE` (the policy cannot overwrite it), no
    /// `POLICY_DELETE` (the owner can undefine it with TPM2_NV_UndefineSpace). The owner
    /// authorization must be empty. The secret is written over a salted session with
    /// parameter encryption. If the write fails, the index is undefined again.
    #[tracing::instrument(skip_all, fields(pcrs = ?pcrs, require_measured_boot))]
    pub fn nv_seal_checked(
        &mut self,
        secret: &SecretKey<32>,
        pcrs: &[u8],
        require_measured_boot: bool,
    ) -> Result<NvSealed, TpmError> {
        let (pcrs, values, policy) = sealing_policy(&mut self.ctx, pcrs, require_measured_boot)?;

        let (index, handle) = define_nv_index(&mut self.ctx, &policy)?;
        // Moved into a zeroizing buffer inside MaxNvBuffer.
        let data = MaxNvBuffer::try_from(secret.expose_secret().to_vec())
            .map_err(|e| TpmError::NvWrite(e.to_string()));
        let written = data.and_then(|data| {
            with_primary(&mut self.ctx, |ctx, primary| {
                // decrypt: the data (the secret) travels encrypted to the TPM. The session is
                // salted with the storage key, so its key is unknown to a bus observer even though
                // the owner authorization is empty.
                with_session(
                    ctx,
                    Some(primary),
                    SessionType::Hmac,
                    false,
                    true,
                    |ctx, session| {
                        ctx.execute_with_session(Some(session), |ctx| {
                            ctx.nv_write(NvAuth::Owner, handle, data, 0)
                        })
                        .map_err(|e| TpmError::NvWrite(e.to_string()))
                    },
                )
            })
        });
        if let Err(err) = written {
            if let Err(e) = self
                .ctx
                .execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.nv_undefine_space(Provision::Owner, handle)
                })
            {
                tracing::warn!(
                    index = format_args!("{index:#010x}"),
                    error = %e,
                    "cannot undefine the NV index after a failed write"
                );
                close_nv(&mut self.ctx, handle);
            }
            return Err(err);
        }
        close_nv(&mut self.ctx, handle);

        tracing::info!(
            index = format_args!("{index:#010x}"),
            pcrs = ?pcrs,
            "secret stored in NV index under PCR policy"
        );
        Ok(NvSealed {
            version: NV_SEALED_VERSION,
            index,
            pcrs: values
                .into_iter()
                .map(|(index, sha256)| PcrValue { index, sha256 })
                .collect(),
        })
    }

    /// Reads the secret stored by [`Tpm::nv_seal`], over a salted policy session that encrypts
    /// the response. When the PCR policy is not satisfied, returns [`TpmError::PcrMismatch`]
    /// naming the PCRs whose values changed since sealing. When the index no longer exists (or
    /// is no longer the index this record was made for), returns [`TpmError::NvMissing`].
    #[tracing::instrument(skip_all, fields(index = format_args!("{:#010x}", sealed.index)))]
    pub fn nv_unseal(&mut self, sealed: &NvSealed) -> Result<SecretKey<32>, TpmError> {
        let bad = |m: String| TpmError::BadBlob(m);
        if sealed.version != NV_SEALED_VERSION {
            return Err(bad(format!("unknown NV record version {}", sealed.version)));
        }
        let index = sealed.index;
        check_nv_range(index).map_err(bad)?;
        let indexes = check_pcr_record(&sealed.pcrs).map_err(bad)?;
        let recorded: Vec<(u8, [u8; 32])> =
            sealed.pcrs.iter().map(|p| (p.index, p.sha256)).collect();
        let composite = pcr_composite_digest(&recorded);
        let expected_policy = policy_pcr_digest(&indexes, &composite);
        let selection = sha256_selection(&indexes).map_err(|e| bad(e.to_string()))?;

        let handle = open_nv(&mut self.ctx, index, TpmError::NvRead)?
            .ok_or(TpmError::NvMissing { index })?;
        let result = (|| {
            let (public, _name) = self
                .ctx
                .execute_without_session(|ctx| ctx.nv_read_public(handle))
                .map_err(|e| TpmError::NvRead(e.to_string()))?;
            // The TPM never changes an index's authPolicy or type: if the public area is not the
            // one nv_seal defined, the index this record names was undefined and something else
            // defined in its place.
            if let Err(reason) = check_nv_public(&public, index, Some(&expected_policy)) {
                tracing::warn!(
                    reason = %reason,
                    "NV index is not the one this record was sealed to"
                );
                return Err(TpmError::NvMissing { index });
            }
            with_primary(&mut self.ctx, |ctx, primary| {
                // encrypt: the data read (the secret) comes back encrypted under the salted
                // session key.
                with_session(
                    ctx,
                    Some(primary),
                    SessionType::Policy,
                    true,
                    false,
                    |ctx, session| {
                        let policy = PolicySession::try_from(session)
                            .map_err(|e| TpmError::Session(e.to_string()))?;
                        let composite = Digest::try_from(composite.to_vec())
                            .map_err(|e| TpmError::Policy(e.to_string()))?;
                        ctx.execute_without_session(|ctx| {
                            ctx.policy_pcr(policy, composite, selection)
                        })
                        .map_err(|e| TpmError::Policy(e.to_string()))?;
                        let data = ctx
                            .execute_with_session(Some(session), |ctx| {
                                ctx.nv_read(NvAuth::NvIndex(handle), handle, NV_SECRET_SIZE, 0)
                            })
                            .map_err(|e| TpmError::NvRead(e.to_string()))?;
                        // `data` zeroizes its buffer on drop.
                        if data.len() != usize::from(NV_SECRET_SIZE) {
                            return Err(TpmError::NvRead(format!(
                                "NV index returned {} bytes, expected {NV_SECRET_SIZE}",
                                data.len()
                            )));
                        }
                        SecretKey::try_fill(|buf: &mut [u8; 32]| {
                            buf.copy_from_slice(data.value());
                            Ok(())
                        })
                    },
                )
            })
        })();
        close_nv(&mut self.ctx, handle);

        match result {
            Err(err @ (TpmError::Policy(_) | TpmError::NvRead(_))) => {
                match changed_pcrs(&mut self.ctx, &recorded) {
                    Some(mismatching) => {
                        tracing::warn!(?mismatching, "NV read refused: PCR values changed");
                        Err(TpmError::PcrMismatch { mismatching })
                    }
                    None => Err(err),
                }
            }
            other => other,
        }
    }

    /// Undefines the NV index made by [`Tpm::nv_seal`] (TPM2_NV_UndefineSpace, owner
    /// authorization), destroying the secret in it for good. Idempotent: an index that does not
    /// exist is not an error. Refuses indexes outside [`NV_INDEX_FIRST`]..=[`NV_INDEX_LAST`] and
    /// indexes whose attributes are not those of a vaultfs sealed key.
    #[tracing::instrument(skip_all, fields(index = format_args!("{index:#010x}")))]
    pub fn nv_destroy(&mut self, index: u32) -> Result<(), TpmError> {
        check_nv_range(index).map_err(TpmError::NvUndefine)?;
        let Some(handle) = open_nv(&mut self.ctx, index, TpmError::NvUndefine)? else {
            tracing::info!("NV index already absent");
            return Ok(());
        };
        let checked = self
            .ctx
            .execute_without_session(|ctx| ctx.nv_read_public(handle))
            .map_err(|e| TpmError::NvUndefine(e.to_string()))
            .and_then(|(public, _name)| {
                check_nv_public(&public, index, None).map_err(|reason| {
                    TpmError::NvUndefine(format!(
                        "NV index {index:#010x} is not a vaultfs sealed key ({reason}); not touched"
                    ))
                })
            });
        if let Err(err) = checked {
            close_nv(&mut self.ctx, handle);
            return Err(err);
        }
        // On success the ESYS handle is closed by tss-esapi; on failure it stays open.
        let undefined = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.nv_undefine_space(Provision::Owner, handle)
            });
        match undefined {
            Ok(()) => {
                tracing::info!("NV index undefined: the secret in it is destroyed");
                Ok(())
            }
            Err(e) => {
                close_nv(&mut self.ctx, handle);
                if rc_kind(&e) == Some(Tss2ResponseCodeKind::Handle) {
                    // Undefined by someone else between our look-up and the command.
                    return Ok(());
                }
                Err(TpmError::NvUndefine(e.to_string()))
            }
        }
    }

    /// The NV indexes currently defined in [`NV_INDEX_FIRST`]..=[`NV_INDEX_LAST`], ascending
    /// (for garbage-collecting indexes that no stored record names).
    pub fn nv_indexes(&mut self) -> Result<Vec<u32>, TpmError> {
        Ok(defined_nv_indexes(&mut self.ctx)?.into_iter().collect())
    }
}

/// Checks a sealing PCR list by EVE's rules: PCR 0 present, PCR 5 absent, no duplicates, all in
/// 0..=15, at most 15 entries.
pub fn validate_pcr_list(pcrs: &[u8]) -> Result<(), String> {
    if pcrs.len() > 15 {
        return Err(format!("{} PCRs given, at most 15 allowed", pcrs.len()));
    }
    let mut seen = BTreeSet::new();
    for &pcr in pcrs {
        if pcr > 15 {
            return Err(format!("PCR {pcr} out of range 0..=15"));
        }
        if !seen.insert(pcr) {
            return Err(format!("PCR {pcr} listed twice"));
        }
    }
    if !seen.contains(&0) {
        return Err("PCR 0 must be included".into());
    }
    if seen.contains(&5) {
        return Err("PCR 5 must not be included (it changes on A/B updates)".into());
    }
    Ok(())
}

/// Whether the manufacturer / vendor identification is that of a software TPM: swtpm (libtpms)
/// and IBM's reference simulator report manufacturer `IBM` and vendor strings `SW  `, ` TPM`.
pub fn is_software_tpm(manufacturer: &str, vendor: &str) -> bool {
    let vendor: String = vendor.split_whitespace().collect::<Vec<_>>().join(" ");
    manufacturer.trim() == "IBM" || vendor.eq_ignore_ascii_case("SW TPM")
}

// ---------------------------------------------------------------------------------------------
// Internals.

/// Concatenated text of TPM properties holding four ASCII characters each.
fn property_text(ctx: &mut Context, tags: &[PropertyTag]) -> Result<String, TpmError> {
    let mut bytes = Vec::with_capacity(tags.len() * 4);
    for &tag in tags {
        let value = ctx
            .get_tpm_property(tag)
            .map_err(|e| TpmError::Capability(e.to_string()))?
            .unwrap_or(0);
        bytes.extend_from_slice(&value.to_be_bytes());
    }
    let text: String = bytes
        .into_iter()
        .filter(|&b| b != 0)
        .map(|b| {
            if b.is_ascii_graphic() || b == b' ' {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect();
    Ok(text.trim().to_owned())
}

fn check_pcr_range(pcrs: &[u8]) -> Result<(), TpmError> {
    match pcrs.iter().find(|&&p| p >= PCR_COUNT) {
        Some(p) => Err(TpmError::InvalidPcrList(format!(
            "PCR {p} out of range 0..{PCR_COUNT}"
        ))),
        None => Ok(()),
    }
}

fn sha256_selection(pcrs: &[u8]) -> Result<PcrSelectionList, tss_esapi::Error> {
    let slots = pcrs
        .iter()
        .map(|&i| PcrSlot::try_from(1u32.checked_shl(u32::from(i)).unwrap_or(0)))
        .collect::<Result<Vec<_>, _>>()?;
    PcrSelectionList::builder()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
}

fn slot_index(slot: PcrSlot) -> u8 {
    // A PcrSlot is a single bit; its position is the PCR index (0..=31).
    u32::from(slot).trailing_zeros() as u8
}

/// Reads SHA-256 PCR values in batches (the TPM returns at most 8 per call), all at one PCR update
/// counter; restarts (bounded) if the PCRs change in between.
fn read_pcrs_sha256(ctx: &mut Context, pcrs: &[u8]) -> Result<Vec<(u8, [u8; 32])>, TpmError> {
    check_pcr_range(pcrs)?;
    let wanted: BTreeSet<u8> = pcrs.iter().copied().collect();
    for _ in 0..PCR_READ_ATTEMPTS {
        let mut remaining = wanted.clone();
        let mut values = BTreeMap::new();
        let mut counter = None;
        let mut consistent = true;
        while !remaining.is_empty() {
            let batch: Vec<u8> = remaining.iter().copied().take(8).collect();
            let selection =
                sha256_selection(&batch).map_err(|e| TpmError::PcrRead(e.to_string()))?;
            let (update_counter, read, digests) = ctx
                .execute_without_session(|ctx| ctx.pcr_read(selection))
                .map_err(|e| TpmError::PcrRead(e.to_string()))?;
            if *counter.get_or_insert(update_counter) != update_counter {
                consistent = false;
                break;
            }
            let mut read_indexes: Vec<u8> = read
                .get_selections()
                .iter()
                .filter(|s| s.hashing_algorithm() == HashingAlgorithm::Sha256)
                .flat_map(|s| s.selected())
                .map(slot_index)
                .collect();
            read_indexes.sort_unstable();
            if read_indexes.is_empty() {
                return Err(TpmError::PcrRead(
                    "TPM returned no SHA-256 PCR values (bank not allocated?)".into(),
                ));
            }
            if read_indexes.len() != digests.len() {
                return Err(TpmError::PcrRead(format!(
                    "TPM returned {} digests for {} selected PCRs",
                    digests.len(),
                    read_indexes.len()
                )));
            }
            for (index, digest) in read_indexes.into_iter().zip(digests.value()) {
                if !remaining.remove(&index) {
                    return Err(TpmError::PcrRead(format!(
                        "TPM returned unrequested PCR {index}"
                    )));
                }
                let value: [u8; 32] = digest
                    .clone()
                    .try_into()
                    .map_err(|e: tss_esapi::Error| TpmError::PcrRead(e.to_string()))?;
                values.insert(index, value);
            }
        }
        if consistent {
            return Ok(values.into_iter().collect());
        }
    }
    Err(TpmError::PcrRead(format!(
        "PCR values kept changing during {PCR_READ_ATTEMPTS} read attempts"
    )))
}

/// A PCR index of the SHA-256 bank and its value.
type PcrReading = (u8, [u8; 32]);

/// The sealing steps shared by [`Tpm::seal_checked`] and [`Tpm::nv_seal_checked`]: validates
/// `pcrs`, applies the measured-boot check, reads the PCR values and returns (sorted PCR indexes,
/// their values, the PolicyPCR digest). The digest comes from a trial session and is
/// cross-checked against the local computation.
fn sealing_policy(
    ctx: &mut Context,
    pcrs: &[u8],
    require_measured_boot: bool,
) -> Result<(Vec<u8>, Vec<PcrReading>, Digest), TpmError> {
    validate_pcr_list(pcrs).map_err(TpmError::InvalidPcrList)?;
    let mut pcrs = pcrs.to_vec();
    pcrs.sort_unstable();

    let boot = read_pcrs_sha256(ctx, &MEASURED_BOOT_PCRS)?;
    let zero: Vec<u8> = boot
        .iter()
        .filter(|(_, value)| value.iter().all(|&b| b == 0))
        .map(|&(index, _)| index)
        .collect();
    if !zero.is_empty() {
        if require_measured_boot {
            tracing::warn!(?zero, "refusing to seal: no measured boot");
            return Err(TpmError::NoMeasuredBoot { zero });
        }
        tracing::warn!(
            ?zero,
            "sealing WITHOUT measured boot (PCRs read all zeros): the PCR policy protects little"
        );
    }

    let values = read_pcrs_sha256(ctx, &pcrs)?;
    let composite = pcr_composite_digest(&values);
    let expected_policy = policy_pcr_digest(&pcrs, &composite);
    let selection = sha256_selection(&pcrs).map_err(|e| TpmError::Policy(e.to_string()))?;

    // The policy digest from a trial session, cross-checked against our own computation.
    let policy = with_session(
        ctx,
        None,
        SessionType::Trial,
        false,
        false,
        |ctx, session| {
            let trial =
                PolicySession::try_from(session).map_err(|e| TpmError::Session(e.to_string()))?;
            let composite = Digest::try_from(composite.to_vec())
                .map_err(|e| TpmError::Policy(e.to_string()))?;
            ctx.execute_without_session(|ctx| {
                ctx.policy_pcr(trial, composite, selection.clone())?;
                ctx.policy_get_digest(trial)
            })
            .map_err(|e| TpmError::Policy(e.to_string()))
        },
    )?;
    if policy.value() != expected_policy {
        return Err(TpmError::Policy(
            "trial-session policy digest differs from the locally computed one".into(),
        ));
    }
    Ok((pcrs, values, policy))
}

/// After a policy failure: the recorded PCRs whose current value differs, or `None` when none
/// does (or the PCRs cannot be re-read; logged).
fn changed_pcrs(ctx: &mut Context, recorded: &[(u8, [u8; 32])]) -> Option<Vec<u8>> {
    let indexes: Vec<u8> = recorded.iter().map(|&(index, _)| index).collect();
    match read_pcrs_sha256(ctx, &indexes) {
        Ok(now) => {
            let mismatching: Vec<u8> = recorded
                .iter()
                .zip(now.iter())
                .filter(|(then, now)| then != now)
                .map(|((index, _), _)| *index)
                .collect();
            (!mismatching.is_empty()).then_some(mismatching)
        }
        Err(read_err) => {
            tracing::warn!(error = %read_err, "cannot re-read PCRs after a policy failure");
            None
        }
    }
}

/// Checks the PCR list of a stored record: valid by [`validate_pcr_list`] and ascending. Returns
/// the indexes.
fn check_pcr_record(pcrs: &[PcrValue]) -> Result<Vec<u8>, String> {
    let indexes: Vec<u8> = pcrs.iter().map(|p| p.index).collect();
    validate_pcr_list(&indexes)?;
    if !indexes.windows(2).all(|w| w[0] < w[1]) {
        return Err("PCR list not in ascending order".into());
    }
    Ok(indexes)
}

fn check_nv_range(index: u32) -> Result<(), String> {
    if (NV_INDEX_FIRST..=NV_INDEX_LAST).contains(&index) {
        Ok(())
    } else {
        Err(format!(
            "NV index {index:#010x} outside the vaultfs range \
             {NV_INDEX_FIRST:#010x}..={NV_INDEX_LAST:#010x}"
        ))
    }
}

/// The attributes of a vaultfs NV index as defined (TPMA_NV_WRITTEN is set by the first write):
/// ordinary, written by the owner, read only through the policy, no dictionary-attack lockout.
fn nv_index_attributes() -> Result<NvIndexAttributes, tss_esapi::Error> {
    NvIndexAttributes::builder()
        .with_nv_index_type(NvIndexType::Ordinary)
        .with_owner_write(true)
        .with_policy_read(true)
        .with_no_da(true)
        .build()
}

fn nv_index_public(index: u32, policy: &Digest) -> Result<NvPublic, tss_esapi::Error> {
    NvPublicBuilder::new()
        .with_nv_index(NvIndexTpmHandle::new(index)?)
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(nv_index_attributes()?)
        .with_index_auth_policy(policy.clone())
        .with_data_area_size(usize::from(NV_SECRET_SIZE))
        .build()
}

/// Checks that an NV public area is that of a vaultfs sealed key at `index`: [`nv_index_public`]
/// attributes, SHA-256 name algorithm, 32 bytes. With `policy`, the index must also have been
/// written and carry exactly that authPolicy.
fn check_nv_public(public: &NvPublic, index: u32, policy: Option<&[u8; 32]>) -> Result<(), String> {
    const TPMA_NV_WRITTEN: u32 = 1 << 29;
    let found = u32::from(public.nv_index());
    if found != index {
        return Err(format!("TPM returned the public area of {found:#010x}"));
    }
    if public.name_algorithm() != HashingAlgorithm::Sha256 {
        return Err("name algorithm is not SHA-256".into());
    }
    let expected = nv_index_attributes()
        .and_then(u32::try_from)
        .map_err(|e| e.to_string())?;
    let attributes = u32::try_from(public.attributes()).map_err(|e| e.to_string())?;
    if attributes & !TPMA_NV_WRITTEN != expected {
        return Err(format!(
            "attributes {attributes:#010x}, expected {expected:#010x}"
        ));
    }
    if public.data_size() != usize::from(NV_SECRET_SIZE) {
        return Err(format!("data size {}", public.data_size()));
    }
    if let Some(policy) = policy {
        if attributes & TPMA_NV_WRITTEN == 0 {
            return Err("index was never written".into());
        }
        if public.authorization_policy().value() != policy {
            return Err("authPolicy differs from the recorded PCR policy".into());
        }
    }
    Ok(())
}

/// The NV indexes defined in the vaultfs range (TPM2_GetCapability(TPM_CAP_HANDLES), paged).
fn defined_nv_indexes(ctx: &mut Context) -> Result<BTreeSet<u32>, TpmError> {
    let mut found = BTreeSet::new();
    let mut next = NV_INDEX_FIRST;
    loop {
        let (data, more) = ctx
            .execute_without_session(|ctx| {
                ctx.get_capability(
                    CapabilityType::Handles,
                    next,
                    NV_INDEX_LAST - NV_INDEX_FIRST + 1,
                )
            })
            .map_err(|e| TpmError::Capability(e.to_string()))?;
        let CapabilityData::Handles(handles) = data else {
            return Err(TpmError::Capability(
                "TPM answered TPM_CAP_HANDLES with another capability".into(),
            ));
        };
        let mut last = None;
        for &handle in handles.iter() {
            let raw = u32::from(handle);
            if raw > NV_INDEX_LAST {
                return Ok(found);
            }
            if raw >= NV_INDEX_FIRST {
                found.insert(raw);
            }
            last = Some(raw);
        }
        match last {
            Some(last) if more && last < NV_INDEX_LAST => next = last + 1,
            _ => return Ok(found),
        }
    }
}

/// Defines a vaultfs NV index at the lowest free index of the range (owner authorization, empty
/// index authValue). Retries with another index when one is taken concurrently.
fn define_nv_index(ctx: &mut Context, policy: &Digest) -> Result<(u32, NvIndexHandle), TpmError> {
    for _ in 0..NV_DEFINE_ATTEMPTS {
        let used = defined_nv_indexes(ctx)?;
        let Some(index) = (NV_INDEX_FIRST..=NV_INDEX_LAST).find(|i| !used.contains(i)) else {
            return Err(TpmError::NvDefine(format!(
                "no free NV index in {NV_INDEX_FIRST:#010x}..={NV_INDEX_LAST:#010x}"
            )));
        };
        let public =
            nv_index_public(index, policy).map_err(|e| TpmError::NvDefine(e.to_string()))?;
        match ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.nv_define_space(Provision::Owner, None, public)
        }) {
            Ok(handle) => return Ok((index, handle)),
            Err(e) if rc_kind(&e) == Some(Tss2ResponseCodeKind::NvDefined) => {
                tracing::debug!(
                    index = format_args!("{index:#010x}"),
                    "NV index taken meanwhile; trying another"
                );
            }
            Err(e) => return Err(TpmError::NvDefine(e.to_string())),
        }
    }
    Err(TpmError::NvDefine(format!(
        "free NV indexes kept being taken during {NV_DEFINE_ATTEMPTS} attempts"
    )))
}

/// An ESYS handle for the NV index `index`, or `None` when it is not defined. `err` wraps TSS
/// errors.
fn open_nv(
    ctx: &mut Context,
    index: u32,
    err: fn(String) -> TpmError,
) -> Result<Option<NvIndexHandle>, TpmError> {
    let tpm_handle = NvIndexTpmHandle::new(index).map_err(|e| err(e.to_string()))?;
    let exists = ctx
        .execute_without_session(|ctx| ctx.get_capability(CapabilityType::Handles, index, 1))
        .map_err(|e| TpmError::Capability(e.to_string()))
        .map(|(data, _)| match data {
            CapabilityData::Handles(handles) => handles.iter().any(|&h| u32::from(h) == index),
            _ => false,
        })?;
    if !exists {
        return Ok(None);
    }
    match ctx.execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::NvIndex(tpm_handle)))
    {
        Ok(handle) => Ok(Some(NvIndexHandle::from(handle))),
        // Undefined between the capability query and TPM2_NV_ReadPublic.
        Err(e) if rc_kind(&e) == Some(Tss2ResponseCodeKind::Handle) => Ok(None),
        Err(e) => Err(err(e.to_string())),
    }
}

/// Releases the ESYS resource of an NV index (the index itself stays defined).
fn close_nv(ctx: &mut Context, handle: NvIndexHandle) {
    let mut object = ObjectHandle::from(handle);
    if let Err(e) = ctx.tr_close(&mut object) {
        tracing::warn!(error = %e, "Esys_TR_Close of an NV index handle failed");
    }
}

fn rc_kind(e: &tss_esapi::Error) -> Option<Tss2ResponseCodeKind> {
    match e {
        tss_esapi::Error::Tss2Error(rc) => rc.kind(),
        tss_esapi::Error::WrapperError(_) => None,
    }
}

/// SHA-256 over the PCR values in ascending index order: the pcrDigest of TPM2_PolicyPCR.
fn pcr_composite_digest(values: &[(u8, [u8; 32])]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for (_, value) in values {
        hash.update(value);
    }
    hash.finalize().into()
}

/// The policy digest TPM2_PolicyPCR produces from an empty policy, computed locally (TPM 2.0
/// Part 3, 23.7): SHA-256(0^32 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || pcrDigest).
fn policy_pcr_digest(sorted_pcrs: &[u8], composite: &[u8; 32]) -> [u8; 32] {
    let mut select = [0u8; PCR_SELECT_OCTETS];
    for &pcr in sorted_pcrs {
        if let Some(octet) = select.get_mut(usize::from(pcr / 8)) {
            *octet |= 1 << (pcr % 8);
        }
    }
    let mut hash = Sha256::new();
    hash.update([0u8; 32]);
    hash.update(TPM_CC_POLICY_PCR.to_be_bytes());
    hash.update(1u32.to_be_bytes()); // TPML_PCR_SELECTION.count
    hash.update(TPM_ALG_SHA256.to_be_bytes());
    hash.update([PCR_SELECT_OCTETS as u8]);
    hash.update(select);
    hash.update(composite);
    hash.finalize().into()
}

/// The storage primary key: ECC P-256, restricted decrypt, AES-128-CFB (the TCG "ECC SRK"
/// template). Deterministic: the same template in the same hierarchy gives the same key.
fn storage_primary_template() -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    let parameters = PublicEccParametersBuilder::new_restricted_decryption_key(
        SymmetricDefinitionObject::AES_128_CFB,
        EccCurve::NistP256,
    )
    .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(parameters)
        .with_ecc_unique_identifier(EccPoint::new(
            EccParameter::try_from(vec![0u8; 32])?,
            EccParameter::try_from(vec![0u8; 32])?,
        ))
        .build()
}

/// The sealed data object: KeyedHash, fixedTPM | fixedParent | adminWithPolicy, no userWithAuth,
/// so only a policy session satisfying `policy` can unseal it.
fn sealed_object_template(policy: Digest) -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_admin_with_policy(true)
        .with_user_with_auth(false)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_auth_policy(policy)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
}

/// Creates the storage primary key, runs `f` with it, and flushes it whatever `f` returned.
fn with_primary<T>(
    ctx: &mut Context,
    f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, TpmError>,
) -> Result<T, TpmError> {
    let template =
        storage_primary_template().map_err(|e| TpmError::CreatePrimary(e.to_string()))?;
    let primary = ctx
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
        })
        .map_err(|e| TpmError::CreatePrimary(e.to_string()))?
        .key_handle;
    let result = f(ctx, primary);
    flush(ctx, primary.into());
    result
}

/// Starts a session (salted with `tpm_key` when given; AES-128-CFB for parameter encryption;
/// SHA-256), sets its attributes, runs `f`, and flushes the session whatever `f` returned.
fn with_session<T>(
    ctx: &mut Context,
    tpm_key: Option<KeyHandle>,
    kind: SessionType,
    encrypt: bool,
    decrypt: bool,
    f: impl FnOnce(&mut Context, AuthSession) -> Result<T, TpmError>,
) -> Result<T, TpmError> {
    let session = ctx
        .execute_without_session(|ctx| {
            ctx.start_auth_session(
                tpm_key,
                None,
                None,
                kind,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
        })
        .map_err(|e| TpmError::Session(e.to_string()))?
        .ok_or_else(|| TpmError::Session("TPM returned no session handle".into()))?;
    let result = (|| {
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_encrypt(encrypt)
            .with_decrypt(decrypt)
            .build();
        ctx.tr_sess_set_attributes(session, attributes, mask)
            .map_err(|e| TpmError::Session(e.to_string()))?;
        f(ctx, session)
    })();
    flush(ctx, SessionHandle::from(session).into());
    result
}

fn flush(ctx: &mut Context, handle: ObjectHandle) {
    if let Err(e) = ctx.execute_without_session(|ctx| ctx.flush_context(handle)) {
        tracing::warn!(error = %e, "TPM2_FlushContext failed");
    }
}

/// The parts of a blob, checked and ready to load.
struct ParsedBlob {
    public: Public,
    private: Private,
}

/// Checks a blob strictly: known version, valid PCR list in ascending order, canonical
/// TPM2B encodings, the object is a policy-only sealed data object, and its policy is exactly the
/// PolicyPCR digest of the recorded PCR values.
fn parse_blob(blob: &SealedBlob) -> Result<ParsedBlob, TpmError> {
    let bad = |m: String| TpmError::BadBlob(m);
    if blob.version != SEALED_BLOB_VERSION {
        return Err(bad(format!("unknown version {}", blob.version)));
    }
    let indexes = check_pcr_record(&blob.pcrs).map_err(bad)?;

    let public_buffer =
        PublicBuffer::unmarshall(&blob.public).map_err(|e| bad(format!("TPM2B_PUBLIC: {e}")))?;
    let canonical = public_buffer
        .marshall()
        .map_err(|e| bad(format!("TPM2B_PUBLIC: {e}")))?;
    if canonical != blob.public {
        return Err(bad(
            "TPM2B_PUBLIC has trailing or non-canonical bytes".into()
        ));
    }
    let public = Public::try_from(public_buffer).map_err(|e| bad(format!("TPM2B_PUBLIC: {e}")))?;
    let Public::KeyedHash {
        object_attributes: attrs,
        name_hashing_algorithm,
        ref auth_policy,
        ..
    } = public
    else {
        return Err(bad("object is not a KeyedHash sealed data object".into()));
    };
    if name_hashing_algorithm != HashingAlgorithm::Sha256
        || !attrs.fixed_tpm()
        || !attrs.fixed_parent()
        || !attrs.admin_with_policy()
        || attrs.user_with_auth()
        || attrs.sensitive_data_origin()
    {
        return Err(bad(
            "object attributes are not those of a policy-sealed object".into(),
        ));
    }
    let recorded: Vec<(u8, [u8; 32])> = blob.pcrs.iter().map(|p| (p.index, p.sha256)).collect();
    let expected = policy_pcr_digest(&indexes, &pcr_composite_digest(&recorded));
    if auth_policy.value() != expected {
        return Err(bad(
            "object policy does not match the recorded PCR values".into()
        ));
    }

    let private_bytes = unmarshal_tpm2b(&blob.private).map_err(bad)?;
    let private =
        Private::try_from(private_bytes).map_err(|e| bad(format!("TPM2B_PRIVATE: {e}")))?;
    Ok(ParsedBlob { public, private })
}

/// TPM2B marshalling: big-endian u16 size, then the bytes.
fn marshal_tpm2b(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let size = u16::try_from(bytes.len()).map_err(|_| format!("{} bytes", bytes.len()))?;
    let mut out = Vec::with_capacity(2 + bytes.len());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(out)
}

fn unmarshal_tpm2b(bytes: &[u8]) -> Result<&[u8], String> {
    match bytes {
        [hi, lo, rest @ ..] if usize::from(u16::from_be_bytes([*hi, *lo])) == rest.len() => {
            Ok(rest)
        }
        _ => Err("TPM2B_PRIVATE: size field does not match the data".into()),
    }
}

/// Serde as standard base64.
mod b64 {
    use base64::{engine::general_purpose::STANDARD, Engine as _};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// Serde of a 32-byte value as 64 lowercase hex digits.
mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let digits = text.as_bytes();
        if digits.len() != 64 {
            return Err(serde::de::Error::custom("expected 64 hex digits"));
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let pair = std::str::from_utf8(pair).map_err(serde::de::Error::custom)?;
            *byte = u8::from_str_radix(pair, 16).map_err(serde::de::Error::custom)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pcrs_are_valid() {
        validate_pcr_list(&DEFAULT_PCRS).unwrap();
    }

    #[test]
    fn software_tpm_detection() {
        assert!(is_software_tpm("IBM", "SW   TPM"));
        assert!(is_software_tpm("XYZ", "SW   TPM"));
        assert!(!is_software_tpm("INTC", "Intel"));
        assert!(!is_software_tpm("IFX", "SLB9670"));
        assert!(!is_software_tpm("STM", ""));
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn policy_digest_known_answers() {
        // Expected values from tpm2-tools on swtpm: `tpm2_startauthsession -S s.ctx` (trial),
        // `tpm2_policypcr -S s.ctx -l sha256:<pcrs> -f <pcr values file> -L policy.dat`.
        let composite = pcr_composite_digest(&[(0, [0u8; 32])]);
        assert_eq!(
            hex(&policy_pcr_digest(&[0], &composite)),
            "093ceb41181d47808862d7946268ee6a17a10e3d1b79b32351bc56e4beaceff0"
        );
        let mut counting = [0u8; 32];
        for (i, b) in counting.iter_mut().enumerate() {
            *b = i as u8;
        }
        let composite = pcr_composite_digest(&[(0, counting), (7, [0xff; 32])]);
        assert_eq!(
            hex(&policy_pcr_digest(&[0, 7], &composite)),
            "39932c9afa539f1ed73f3d1d955f3ec390a62a0323f5a65542edc3c7deab9232"
        );
    }

    #[test]
    fn tpm2b_round_trip_and_strictness() {
        let m = marshal_tpm2b(b"abc").unwrap();
        assert_eq!(m, [0, 3, b'a', b'b', b'c']);
        assert_eq!(unmarshal_tpm2b(&m).unwrap(), b"abc");
        assert!(unmarshal_tpm2b(&[0, 4, 1, 2, 3]).is_err());
        assert!(unmarshal_tpm2b(&[0, 2, 1, 2, 3]).is_err());
        assert!(unmarshal_tpm2b(&[0]).is_err());
    }

    #[test]
    fn pcr_value_serde_is_hex() {
        let v = PcrValue {
            index: 7,
            sha256: [0xab; 32],
        };
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(
            json,
            format!("{{\"index\":7,\"sha256\":\"{}\"}}", "ab".repeat(32))
        );
        assert_eq!(serde_json::from_str::<PcrValue>(&json).unwrap(), v);
        assert!(serde_json::from_str::<PcrValue>("{\"index\":7,\"sha256\":\"ab\"}").is_err());
    }

    #[test]
    fn blob_with_unknown_version_is_refused() {
        let blob = SealedBlob {
            version: 2,
            public: vec![],
            private: vec![],
            pcrs: vec![],
        };
        assert!(matches!(parse_blob(&blob), Err(TpmError::BadBlob(_))));
    }
}
