//! The TPM module against a real software TPM (swtpm), one swtpm per test.

mod common;

use sha2::{Digest, Sha256};
use vault_broker::tpm::{
    validate_pcr_list, NvSealed, SealedBlob, Tpm, TpmError, DEFAULT_PCRS, NV_INDEX_FIRST,
    NV_INDEX_LAST, NV_SEALED_VERSION,
};
use vaultfs_core::SecretKey;

/// Opens the TPM and simulates a measured boot (PCRs 0 and 4 extended).
fn booted(swtpm: &common::Swtpm) -> Tpm {
    booted_via(&swtpm.tcti())
}

fn booted_via(tcti: &str) -> Tpm {
    let mut tpm = Tpm::open(tcti).unwrap_or_else(|e| panic!("open {tcti}: {e}"));
    for (pcr, measurement) in [(0, &b"firmware"[..]), (4, b"boot loader")] {
        tpm.extend_pcr(pcr, measurement)
            .unwrap_or_else(|e| panic!("extend PCR {pcr}: {e}"));
    }
    tpm
}

fn extended(old: &[u8; 32], data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(old);
    h.update(Sha256::digest(data));
    h.finalize().into()
}

#[test]
fn seal_unseal_round_trip() {
    let swtpm = swtpm_or_skip!();
    let mut tpm = booted(&swtpm);
    let secret = SecretKey::<32>::random().unwrap();
    let blob = tpm.seal(&secret, &DEFAULT_PCRS).unwrap();
    assert_eq!(blob.pcr_indexes(), DEFAULT_PCRS.to_vec());
    let unsealed = tpm.unseal(&blob).unwrap();
    assert_eq!(unsealed.expose_secret(), secret.expose_secret());
    // Unseal works repeatedly and from a fresh context (the primary key is deterministic).
    drop(tpm);
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(
        tpm.unseal(&blob).unwrap().expose_secret(),
        secret.expose_secret()
    );
}

#[test]
fn extending_pcr7_breaks_unseal_with_mismatch() {
    let swtpm = swtpm_or_skip!();
    let mut tpm = booted(&swtpm);
    let secret = SecretKey::<32>::random().unwrap();
    let blob = tpm.seal(&secret, &DEFAULT_PCRS).unwrap();
    tpm.extend_pcr(7, b"secure boot policy changed").unwrap();
    match tpm.unseal(&blob) {
        Err(TpmError::PcrMismatch { mismatching }) => assert_eq!(mismatching, vec![7]),
        other => panic!("expected PcrMismatch {{ [7] }}, got {other:?}"),
    }
    // A PCR outside the sealing set (5, 15) changes nothing.
    let swtpm2 = swtpm_or_skip!();
    let mut tpm2 = booted(&swtpm2);
    let blob2 = tpm2.seal(&secret, &DEFAULT_PCRS).unwrap();
    tpm2.extend_pcr(5, b"gpt").unwrap();
    tpm2.extend_pcr(15, b"user").unwrap();
    assert_eq!(
        tpm2.unseal(&blob2).unwrap().expose_secret(),
        secret.expose_secret()
    );
}

#[test]
fn seal_refused_without_measured_boot() {
    let swtpm = swtpm_or_skip!();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let secret = SecretKey::<32>::random().unwrap();
    // Fresh swtpm: everything zero.
    match tpm.seal(&secret, &DEFAULT_PCRS) {
        Err(TpmError::NoMeasuredBoot { zero }) => assert_eq!(zero, vec![0, 4]),
        other => panic!("expected NoMeasuredBoot, got {other:?}"),
    }
    // Only PCR 4 measured: PCR 0 still all zeros.
    tpm.extend_pcr(4, b"boot loader").unwrap();
    match tpm.seal(&secret, &DEFAULT_PCRS) {
        Err(TpmError::NoMeasuredBoot { zero }) => assert_eq!(zero, vec![0]),
        other => panic!("expected NoMeasuredBoot, got {other:?}"),
    }
    // PCR 4 is checked even when it is not in the sealing set.
    let swtpm2 = swtpm_or_skip!();
    let mut tpm2 = Tpm::open(&swtpm2.tcti()).unwrap();
    tpm2.extend_pcr(0, b"firmware").unwrap();
    match tpm2.seal(&secret, &[0, 7]) {
        Err(TpmError::NoMeasuredBoot { zero }) => assert_eq!(zero, vec![4]),
        other => panic!("expected NoMeasuredBoot, got {other:?}"),
    }
    // The explicit opt-out seals anyway.
    let blob = tpm2.seal_checked(&secret, &[0, 7], false).unwrap();
    assert_eq!(
        tpm2.unseal(&blob).unwrap().expose_secret(),
        secret.expose_secret()
    );
}

#[test]
fn seal_refuses_invalid_pcr_list() {
    let swtpm = swtpm_or_skip!();
    let mut tpm = booted(&swtpm);
    let secret = SecretKey::<32>::random().unwrap();
    for bad in [&[1u8, 2][..], &[0, 5], &[0, 0], &[0, 16]] {
        assert!(
            matches!(tpm.seal(&secret, bad), Err(TpmError::InvalidPcrList(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn pcr_list_rules() {
    assert!(validate_pcr_list(&DEFAULT_PCRS).is_ok());
    assert!(validate_pcr_list(&[0]).is_ok());
    assert!(validate_pcr_list(&[15, 0, 7]).is_ok());
    // PCR 0 must be present.
    assert!(validate_pcr_list(&[]).is_err());
    assert!(validate_pcr_list(&[1, 2, 3]).is_err());
    // PCR 5 must be absent.
    assert!(validate_pcr_list(&[0, 5]).is_err());
    // No duplicates.
    assert!(validate_pcr_list(&[0, 1, 1]).is_err());
    // All in 0..=15.
    assert!(validate_pcr_list(&[0, 16]).is_err());
    assert!(validate_pcr_list(&[0, 23]).is_err());
    // At most 15 entries (a 16th always breaks another rule too; 15 is the valid maximum).
    let sixteen: Vec<u8> = (0..16).collect();
    assert!(validate_pcr_list(&sixteen).is_err());
    let fifteen: Vec<u8> = (0..16).filter(|&p| p != 5).collect();
    assert_eq!(fifteen.len(), 15);
    assert!(validate_pcr_list(&fifteen).is_ok());
    assert_eq!(
        DEFAULT_PCRS,
        [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    );
}

#[test]
fn blob_serde_round_trip() {
    let swtpm = swtpm_or_skip!();
    let mut tpm = booted(&swtpm);
    let secret = SecretKey::<32>::random().unwrap();
    let blob = tpm.seal(&secret, &DEFAULT_PCRS).unwrap();
    let json = serde_json::to_string_pretty(&blob).unwrap();
    let back: SealedBlob = serde_json::from_str(&json).unwrap();
    assert_eq!(back, blob);
    assert_eq!(
        tpm.unseal(&back).unwrap().expose_secret(),
        secret.expose_secret()
    );
    // Unknown fields are refused.
    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value["extra"] = serde_json::json!(1);
    assert!(serde_json::from_value::<SealedBlob>(value).is_err());
}

#[test]
fn tampered_blobs_are_refused() {
    let swtpm = swtpm_or_skip!();
    let mut tpm = booted(&swtpm);
    let secret = SecretKey::<32>::random().unwrap();
    let blob = tpm.seal(&secret, &DEFAULT_PCRS).unwrap();

    let mut b = blob.clone();
    b.version = 2;
    assert!(matches!(tpm.unseal(&b), Err(TpmError::BadBlob(_))));

    // Recorded PCR values that do not match the object's policy.
    let mut b = blob.clone();
    b.pcrs[3].sha256[0] ^= 1;
    assert!(matches!(tpm.unseal(&b), Err(TpmError::BadBlob(_))));

    // Dropping a PCR from the list.
    let mut b = blob.clone();
    b.pcrs.pop();
    assert!(matches!(tpm.unseal(&b), Err(TpmError::BadBlob(_))));

    // Trailing bytes.
    let mut b = blob.clone();
    b.public.push(0);
    assert!(matches!(tpm.unseal(&b), Err(TpmError::BadBlob(_))));
    let mut b = blob.clone();
    b.private.push(0);
    assert!(matches!(tpm.unseal(&b), Err(TpmError::BadBlob(_))));

    // A flipped bit in the encrypted private part: the TPM's integrity check refuses the load.
    let mut b = blob.clone();
    let last = b.private.len() - 1;
    b.private[last] ^= 0x80;
    assert!(matches!(tpm.unseal(&b), Err(TpmError::Load(_))));

    // The original still unseals.
    assert_eq!(
        tpm.unseal(&blob).unwrap().expose_secret(),
        secret.expose_secret()
    );
}

#[test]
fn blob_from_another_tpm_does_not_load() {
    let swtpm_a = swtpm_or_skip!();
    let swtpm_b = swtpm_or_skip!();
    let mut a = booted(&swtpm_a);
    let mut b = booted(&swtpm_b);
    let secret = SecretKey::<32>::random().unwrap();
    let blob = a.seal(&secret, &DEFAULT_PCRS).unwrap();
    // Same PCR values on both, but b has a different storage seed.
    assert!(matches!(b.unseal(&blob), Err(TpmError::Load(_))));
}

#[test]
fn swtpm_is_software() {
    let swtpm = swtpm_or_skip!();
    let tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert!(tpm.is_software());
    let info = tpm.info();
    assert_eq!(info.manufacturer, "IBM");
    assert!(
        vault_broker::tpm::is_software_tpm(&info.manufacturer, &info.vendor),
        "vendor {:?}",
        info.vendor
    );
}

#[test]
fn sealed_blob_does_not_contain_the_secret() {
    let swtpm = swtpm_or_skip!();
    let mut tpm = booted(&swtpm);
    let secret = SecretKey::<32>::random().unwrap();
    let blob = tpm.seal(&secret, &DEFAULT_PCRS).unwrap();
    let key = secret.expose_secret();
    // Not even an 8-byte window of the secret appears anywhere in the blob.
    let json = serde_json::to_vec(&blob).unwrap();
    for haystack in [&blob.private[..], &blob.public[..], &json[..]] {
        for window in key.windows(8) {
            assert!(
                !haystack.windows(8).any(|w| w == window),
                "secret bytes found in the sealed blob"
            );
        }
    }
    // The TPM2B_PRIVATE is an encrypted, integrity-protected sensitive area: much larger than 32.
    assert!(blob.private.len() > 2 + 32 + 32);
}

#[test]
fn pcr_reads_and_extends() {
    let swtpm = swtpm_or_skip!();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    // More than 8 PCRs: several TPM2_PCR_Read calls.
    let all: Vec<u8> = (0..24).rev().collect();
    let values = tpm.read_pcrs(&all).unwrap();
    assert_eq!(values.len(), 24);
    assert_eq!(
        values.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        (0..24).collect::<Vec<u8>>()
    );
    // swtpm starts with 0..=16 and 23 at zero, 17..=22 at all-ones (locality PCRs).
    assert_eq!(values[0].1, [0u8; 32]);

    tpm.extend_pcr(9, b"measurement").unwrap();
    let after = tpm.read_pcrs(&[9, 9, 10]).unwrap();
    assert_eq!(after.len(), 2);
    assert_eq!(after[0], (9, extended(&[0u8; 32], b"measurement")));
    assert_eq!(after[1], (10, [0u8; 32]));

    assert!(matches!(
        tpm.read_pcrs(&[24]),
        Err(TpmError::InvalidPcrList(_))
    ));
    assert!(matches!(
        tpm.extend_pcr(24, b"x"),
        Err(TpmError::PcrExtend { pcr: 24, .. })
    ));
}

#[test]
fn random_keys_from_the_tpm() {
    let swtpm = swtpm_or_skip!();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let a = tpm.random_key().unwrap();
    let b = tpm.random_key().unwrap();
    assert_ne!(a.expose_secret(), b.expose_secret());
    assert_ne!(a.expose_secret(), &[0u8; 32]);
}

#[test]
fn bad_tcti_is_an_error() {
    assert!(matches!(Tpm::open("bogus:x"), Err(TpmError::Tcti { .. })));
    // Nothing listening there.
    assert!(matches!(
        Tpm::open("swtpm:host=127.0.0.1,port=1"),
        Err(TpmError::Open { .. })
    ));
}

#[test]
fn tpm_can_move_to_another_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<Tpm>();
}

/// One TPM command parsed from the tap's recording.
struct Command {
    code: u32,
    handles: Vec<u32>,
    /// TPMA_SESSION of each session in the authorization area.
    session_attributes: Vec<u8>,
    /// Parameters after the authorization area.
    params: Vec<u8>,
}

const TPM_CC_NV_WRITE: u32 = 0x137;
const TPM_CC_NV_READ: u32 = 0x14E;
const TPM_CC_CREATE: u32 = 0x153;
const TPM_CC_UNSEAL: u32 = 0x15E;
const TPM_CC_START_AUTH_SESSION: u32 = 0x176;
const TPM_CC_GET_RANDOM: u32 = 0x17B;
const TPM_RH_NULL: u32 = 0x4000_0007;
const TPMA_SESSION_DECRYPT: u8 = 0x20;
const TPMA_SESSION_ENCRYPT: u8 = 0x40;

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Splits a command stream into commands (TPM 2.0 Part 1, 18.x command layout). Handles,
/// sessions and parameters are parsed only for the commands this test looks at.
fn parse_commands(stream: &[u8]) -> Vec<Command> {
    let handle_count = |code: u32| match code {
        TPM_CC_START_AUTH_SESSION => Some(2),
        TPM_CC_CREATE | TPM_CC_UNSEAL => Some(1),
        TPM_CC_NV_WRITE | TPM_CC_NV_READ => Some(2),
        TPM_CC_GET_RANDOM => Some(0),
        _ => None,
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at + 10 <= stream.len() {
        let tag = be16(stream, at);
        let size = be32(stream, at + 2) as usize;
        let cmd = &stream[at..at + size];
        at += size;
        let code = be32(cmd, 6);
        let Some(n) = handle_count(code) else {
            continue;
        };
        let handles: Vec<u32> = (0..n).map(|i| be32(cmd, 10 + 4 * i)).collect();
        let mut p = 10 + 4 * n;
        let mut session_attributes = Vec::new();
        if tag == 0x8002 {
            let auth_size = be32(cmd, p) as usize;
            let end = p + 4 + auth_size;
            let mut s = p + 4;
            while s < end {
                s += 4; // session handle
                s += 2 + be16(cmd, s); // nonce
                session_attributes.push(cmd[s]);
                s += 1;
                s += 2 + be16(cmd, s); // hmac
            }
            p = end;
        }
        out.push(Command {
            code,
            handles,
            session_attributes,
            params: cmd[p..].to_vec(),
        });
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn secret_never_crosses_the_bus_in_clear() {
    let swtpm = swtpm_or_skip!();
    let tap = common::BusTap::start(&swtpm);
    let mut tpm = booted_via(&tap.tcti());
    let secret = SecretKey::<32>::random().unwrap();
    let blob = tpm.seal(&secret, &DEFAULT_PCRS).unwrap();
    let unsealed = tpm.unseal(&blob).unwrap();
    assert_eq!(unsealed.expose_secret(), secret.expose_secret());
    let random = tpm.random_key().unwrap();
    drop(tpm);

    let sent = tap.sent().concat();
    let received = tap.received().concat();
    // The tap does see the traffic: PCR extends carry their digest in clear.
    assert!(contains(&sent, &Sha256::digest(b"firmware")));
    for key in [&secret, &unsealed, &random] {
        let key = key.expose_secret();
        for window in key.windows(8) {
            assert!(
                !contains(&sent, window),
                "key bytes sent to the TPM in clear"
            );
            assert!(
                !contains(&received, window),
                "key bytes returned by the TPM in clear"
            );
        }
    }

    let commands: Vec<Command> = tap
        .sent()
        .iter()
        .flat_map(|stream| parse_commands(stream))
        .collect();
    // Sessions used for the secret are salted (tpmKey set, non-empty encryptedSalt).
    let salted = commands
        .iter()
        .filter(|c| c.code == TPM_CC_START_AUTH_SESSION)
        .filter(|c| c.handles[0] != TPM_RH_NULL && be16(&c.params, 2 + be16(&c.params, 0)) > 0)
        .count();
    assert!(
        salted >= 3,
        "expected salted sessions for seal, unseal and random, got {salted}"
    );
    // TPM2_Create encrypts its first parameter (the secret), TPM2_Unseal and TPM2_GetRandom
    // their response.
    let create: Vec<&Command> = commands
        .iter()
        .filter(|c| c.code == TPM_CC_CREATE)
        .collect();
    assert_eq!(create.len(), 1);
    assert!(create[0]
        .session_attributes
        .iter()
        .any(|a| a & TPMA_SESSION_DECRYPT != 0));
    let unseal: Vec<&Command> = commands
        .iter()
        .filter(|c| c.code == TPM_CC_UNSEAL)
        .collect();
    assert_eq!(unseal.len(), 1);
    assert!(unseal[0]
        .session_attributes
        .iter()
        .any(|a| a & TPMA_SESSION_ENCRYPT != 0));
    let get_random: Vec<&Command> = commands
        .iter()
        .filter(|c| c.code == TPM_CC_GET_RANDOM)
        .collect();
    assert!(!get_random.is_empty());
    assert!(get_random.iter().all(|c| c
        .session_attributes
        .iter()
        .any(|a| a & TPMA_SESSION_ENCRYPT != 0)));
}

// ---------------------------------------------------------------------------------------------
// NV-index sealing (crypto-erase).

fn assert_same(a: &SecretKey<32>, b: &SecretKey<32>) {
    assert_eq!(a.expose_secret(), b.expose_secret());
}

fn expect_nv_missing(result: Result<SecretKey<32>, TpmError>, index: u32) {
    match result {
        Err(TpmError::NvMissing { index: i }) => assert_eq!(i, index),
        Err(other) => panic!("expected NvMissing {{ {index:#x} }}, got {other:?}"),
        Ok(_) => panic!("expected NvMissing {{ {index:#x} }}, got a key"),
    }
}

#[test]
fn nv_seal_unseal_round_trip() {
    let swtpm = swtpm_or_skip!();
    let mut tpm = booted(&swtpm);
    let secret = SecretKey::<32>::random().unwrap();
    let sealed = tpm.nv_seal(&secret, &DEFAULT_PCRS).unwrap();
    assert_eq!(sealed.version, NV_SEALED_VERSION);
    assert!((NV_INDEX_FIRST..=NV_INDEX_LAST).contains(&sealed.index));
    assert_eq!(sealed.pcr_indexes(), DEFAULT_PCRS.to_vec());
    let now = tpm.read_pcrs(&DEFAULT_PCRS).unwrap();
    let recorded: Vec<(u8, [u8; 32])> = sealed.pcrs.iter().map(|p| (p.index, p.sha256)).collect();
    assert_eq!(recorded, now);
    assert_eq!(tpm.nv_indexes().unwrap(), vec![sealed.index]);

    assert_same(&tpm.nv_unseal(&sealed).unwrap(), &secret);
    // Repeatedly, and from a fresh context.
    assert_same(&tpm.nv_unseal(&sealed).unwrap(), &secret);
    drop(tpm);
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert_same(&tpm.nv_unseal(&sealed).unwrap(), &secret);

    // A PCR outside the sealing set changes nothing.
    tpm.extend_pcr(15, b"user").unwrap();
    assert_same(&tpm.nv_unseal(&sealed).unwrap(), &secret);
}

#[test]
fn nv_extending_pcr7_breaks_unseal_with_mismatch() {
    let swtpm = swtpm_or_skip!();
    let mut tpm = booted(&swtpm);
    let secret = SecretKey::<32>::random().unwrap();
    let sealed = tpm.nv_seal(&secret, &DEFAULT_PCRS).unwrap();
    tpm.extend_pcr(7, b"secure boot policy changed").unwrap();
    for _ in 0..2 {
        match tpm.nv_unseal(&sealed) {
            Err(TpmError::PcrMismatch { mismatching }) => assert_eq!(mismatching, vec![7]),
            Err(other) => panic!("expected PcrMismatch {{ [7] }}, got {other:?}"),
            Ok(_) => panic!("expected PcrMismatch {{ [7] }}, got the key"),
        }
    }
    // The index is still there (a PCR change is not a destroy).
    assert_eq!(tpm.nv_indexes().unwrap(), vec![sealed.index]);
}

#[test]
fn nv_destroy_erases_the_key_for_good() {
    let swtpm = swtpm_or_skip!();
    let mut tpm = booted(&swtpm);
    let secret = SecretKey::<32>::random().unwrap();
    let sealed = tpm.nv_seal(&secret, &DEFAULT_PCRS).unwrap();
    // An attacker's copy of the stored record, taken before the delete.
    let copy_json = serde_json::to_string(&sealed).unwrap();
    let copy = sealed.clone();
    assert_same(&tpm.nv_unseal(&copy).unwrap(), &secret);

    tpm.nv_destroy(sealed.index).unwrap();
    assert!(tpm.nv_indexes().unwrap().is_empty());
    expect_nv_missing(tpm.nv_unseal(&sealed), sealed.index);
    expect_nv_missing(tpm.nv_unseal(&copy), sealed.index);
    let from_disk: NvSealed = serde_json::from_str(&copy_json).unwrap();
    expect_nv_missing(tpm.nv_unseal(&from_disk), sealed.index);
    // Idempotent.
    tpm.nv_destroy(sealed.index).unwrap();
    // Still gone from a fresh context.
    drop(tpm);
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    expect_nv_missing(tpm.nv_unseal(&from_disk), sealed.index);

    // The freed index is reused by the next vault; the old record does not open it when the new
    // vault's policy differs ...
    let other = SecretKey::<32>::random().unwrap();
    let reused = tpm.nv_seal(&other, &[0, 4, 7]).unwrap();
    assert_eq!(reused.index, sealed.index);
    expect_nv_missing(tpm.nv_unseal(&from_disk), sealed.index);
    tpm.nv_destroy(reused.index).unwrap();
    // ... and with an identical policy (same PCR set and values) it reaches only the *new*
    // vault's key: the destroyed one is gone from the TPM. (A stale record is no capability: the
    // PCR policy is the only read protection of an index, record or not.)
    let third = SecretKey::<32>::random().unwrap();
    let reused = tpm.nv_seal(&third, &DEFAULT_PCRS).unwrap();
    assert_eq!(reused.index, sealed.index);
    let key = tpm.nv_unseal(&from_disk).unwrap();
    assert_same(&key, &third);
    assert_ne!(key.expose_secret(), secret.expose_secret());
}

#[test]
fn nv_vaults_get_distinct_indexes_and_are_destroyed_independently() {
    let swtpm = swtpm_or_skip!();
    let mut tpm = booted(&swtpm);
    let a_key = SecretKey::<32>::random().unwrap();
    let b_key = SecretKey::<32>::random().unwrap();
    let c_key = SecretKey::<32>::random().unwrap();
    let a = tpm.nv_seal(&a_key, &DEFAULT_PCRS).unwrap();
    let b = tpm.nv_seal(&b_key, &DEFAULT_PCRS).unwrap();
    let c = tpm.nv_seal(&c_key, &[0, 7]).unwrap();
    assert_ne!(a.index, b.index);
    assert_ne!(b.index, c.index);
    assert_ne!(a.index, c.index);
    let mut all = vec![a.index, b.index, c.index];
    all.sort_unstable();
    assert_eq!(tpm.nv_indexes().unwrap(), all);

    tpm.nv_destroy(a.index).unwrap();
    expect_nv_missing(tpm.nv_unseal(&a), a.index);
    assert_same(&tpm.nv_unseal(&b).unwrap(), &b_key);
    assert_same(&tpm.nv_unseal(&c).unwrap(), &c_key);
    assert_eq!(tpm.nv_indexes().unwrap(), vec![b.index, c.index]);

    // The same key sealed twice gets two indexes; destroying one leaves the other.
    let d = tpm.nv_seal(&b_key, &DEFAULT_PCRS).unwrap();
    assert!(![b.index, c.index].contains(&d.index));
    tpm.nv_destroy(b.index).unwrap();
    assert_same(&tpm.nv_unseal(&d).unwrap(), &b_key);
    assert_same(&tpm.nv_unseal(&c).unwrap(), &c_key);
}

#[test]
fn nv_sealed_serde_round_trip() {
    let swtpm = swtpm_or_skip!();
    let mut tpm = booted(&swtpm);
    let secret = SecretKey::<32>::random().unwrap();
    let sealed = tpm.nv_seal(&secret, &DEFAULT_PCRS).unwrap();
    let json = serde_json::to_string_pretty(&sealed).unwrap();
    let back: NvSealed = serde_json::from_str(&json).unwrap();
    assert_eq!(back, sealed);
    assert_same(&tpm.nv_unseal(&back).unwrap(), &secret);

    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["index", "pcrs", "version"]);
    // Unknown fields are refused.
    let mut extra = value.clone();
    extra["extra"] = serde_json::json!(1);
    assert!(serde_json::from_value::<NvSealed>(extra).is_err());

    // Nothing of the secret in the record.
    let bytes = serde_json::to_vec(&sealed).unwrap();
    for window in secret.expose_secret().windows(8) {
        assert!(!contains(&bytes, window), "secret bytes in the NV record");
    }
}

#[test]
fn nv_seal_refusals_and_bad_records() {
    let swtpm = swtpm_or_skip!();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let secret = SecretKey::<32>::random().unwrap();
    // Fresh swtpm: no measured boot.
    match tpm.nv_seal(&secret, &DEFAULT_PCRS) {
        Err(TpmError::NoMeasuredBoot { zero }) => assert_eq!(zero, vec![0, 4]),
        other => panic!("expected NoMeasuredBoot, got {other:?}"),
    }
    assert!(
        tpm.nv_indexes().unwrap().is_empty(),
        "refused seal left an index"
    );
    let mut tpm = booted(&swtpm);
    for bad in [&[1u8, 2][..], &[0, 5], &[0, 0], &[0, 16]] {
        assert!(
            matches!(tpm.nv_seal(&secret, bad), Err(TpmError::InvalidPcrList(_))),
            "{bad:?}"
        );
    }
    assert!(tpm.nv_indexes().unwrap().is_empty());

    let sealed = tpm.nv_seal(&secret, &DEFAULT_PCRS).unwrap();
    let mut s = sealed.clone();
    s.version = 2;
    assert!(matches!(tpm.nv_unseal(&s), Err(TpmError::BadBlob(_))));
    let mut s = sealed.clone();
    s.index = 0x0150_0000;
    assert!(matches!(tpm.nv_unseal(&s), Err(TpmError::BadBlob(_))));
    let mut s = sealed.clone();
    s.pcrs.reverse();
    assert!(matches!(tpm.nv_unseal(&s), Err(TpmError::BadBlob(_))));
    let mut s = sealed.clone();
    s.pcrs.remove(0); // PCR 0 must be there
    assert!(matches!(tpm.nv_unseal(&s), Err(TpmError::BadBlob(_))));
    // Recorded values that are not the index's policy: the record does not open the index.
    let mut s = sealed.clone();
    s.pcrs[3].sha256[0] ^= 1;
    expect_nv_missing(tpm.nv_unseal(&s), sealed.index);
    // A record naming a free index of the range.
    let mut s = sealed.clone();
    s.index = NV_INDEX_LAST;
    expect_nv_missing(tpm.nv_unseal(&s), NV_INDEX_LAST);

    // nv_destroy stays inside the vaultfs range (e.g. never the EK certificate at 0x01c00002).
    assert!(matches!(
        tpm.nv_destroy(0x01C0_0002),
        Err(TpmError::NvUndefine(_))
    ));
    assert!(matches!(
        tpm.nv_destroy(NV_INDEX_LAST + 1),
        Err(TpmError::NvUndefine(_))
    ));
    // Absent index: Ok.
    tpm.nv_destroy(NV_INDEX_LAST).unwrap();
    // The original is intact.
    assert_same(&tpm.nv_unseal(&sealed).unwrap(), &secret);
}

#[test]
fn nv_secret_never_crosses_the_bus_in_clear() {
    let swtpm = swtpm_or_skip!();
    let tap = common::BusTap::start(&swtpm);
    let mut tpm = booted_via(&tap.tcti());
    let secret = SecretKey::<32>::random().unwrap();
    let sealed = tpm.nv_seal(&secret, &DEFAULT_PCRS).unwrap();
    let read = tpm.nv_unseal(&sealed).unwrap();
    assert_same(&read, &secret);
    tpm.nv_destroy(sealed.index).unwrap();
    drop(tpm);

    let sent = tap.sent().concat();
    let received = tap.received().concat();
    // The tap does see the traffic: PCR extends carry their digest in clear.
    assert!(contains(&sent, &Sha256::digest(b"firmware")));
    for window in secret.expose_secret().windows(8) {
        assert!(
            !contains(&sent, window),
            "key bytes sent to the TPM in clear"
        );
        assert!(
            !contains(&received, window),
            "key bytes returned by the TPM in clear"
        );
    }

    let commands: Vec<Command> = tap
        .sent()
        .iter()
        .flat_map(|stream| parse_commands(stream))
        .collect();
    let salted = commands
        .iter()
        .filter(|c| c.code == TPM_CC_START_AUTH_SESSION)
        .filter(|c| c.handles[0] != TPM_RH_NULL && be16(&c.params, 2 + be16(&c.params, 0)) > 0)
        .count();
    assert!(
        salted >= 2,
        "expected salted sessions for NV write and NV read, got {salted}"
    );
    // TPM2_NV_Write encrypts its first parameter (the data), TPM2_NV_Read its response.
    let writes: Vec<&Command> = commands
        .iter()
        .filter(|c| c.code == TPM_CC_NV_WRITE)
        .collect();
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].handles, [0x4000_0001, sealed.index]); // TPM_RH_OWNER, the index
    assert!(writes[0]
        .session_attributes
        .iter()
        .any(|a| a & TPMA_SESSION_DECRYPT != 0));
    let reads: Vec<&Command> = commands
        .iter()
        .filter(|c| c.code == TPM_CC_NV_READ)
        .collect();
    assert_eq!(reads.len(), 1);
    assert_eq!(reads[0].handles, [sealed.index, sealed.index]); // policy auth by the index
    assert!(reads[0]
        .session_attributes
        .iter()
        .any(|a| a & TPMA_SESSION_ENCRYPT != 0));
}
