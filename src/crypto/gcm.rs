//! AES-256-GCM through aws-lc-rs. Each block carries a fresh random 96-bit nonce and a 128-bit
//! tag; the associated data binds the block to its file ID and block index.

use super::{check_lengths, CipherError, ContentCipher};
use crate::key::SecretKey;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub const NONCE_BYTES: usize = NONCE_LEN;
pub const TAG_BYTES: usize = 16;
/// On-disk bytes added to every content block: nonce + tag.
pub const BLOCK_OVERHEAD: usize = NONCE_BYTES + TAG_BYTES;
/// Bytes added by [`aead_seal`].
pub const AEAD_OVERHEAD: usize = NONCE_BYTES + TAG_BYTES;

fn key(k: &[u8; 32]) -> Result<LessSafeKey, CipherError> {
    UnboundKey::new(&AES_256_GCM, k)
        .map(LessSafeKey::new)
        .map_err(|_| CipherError::Backend)
}

/// Random bytes drawn from AWS-LC's DRBG (seeded from the OS) in batches; each nonce consumes
/// its own bytes and no byte is ever handed out twice.
struct NoncePool {
    buf: [u8; 4092],
    pos: usize,
    /// The [`fork_generation`] in which `buf` was filled: a forked child must not reuse its
    /// parent's bytes.
    generation: u64,
}

thread_local! {
    static NONCES: std::cell::RefCell<NoncePool> = const {
        std::cell::RefCell::new(NoncePool { buf: [0; 4092], pos: 4092, generation: u64::MAX })
    };
}

/// Counts the `fork()`s this process descends from, once [`after_fork_in_child`] is installed
/// as a `pthread_atfork` child handler (this crate has no unsafe code, so the program does it:
/// see [`fork_hook_installed`]).
static FORKS: AtomicU64 = AtomicU64::new(0);
static FORK_HOOK: AtomicBool = AtomicBool::new(false);

/// For `pthread_atfork(None, None, Some(after_fork_in_child))`: only increments an atomic,
/// which is async-signal-safe and so allowed in a fork child.
pub extern "C" fn after_fork_in_child() {
    FORKS.fetch_add(1, Ordering::Relaxed);
}

/// Tells the nonce pools that [`after_fork_in_child`] is registered, so they compare a fork
/// counter for every nonce instead of the process ID. `getpid()` is a system call every time:
/// one per 4 KiB block was 4 % of the daemon's CPU during a large write.
pub fn fork_hook_installed() {
    FORK_HOOK.store(true, Ordering::SeqCst);
}

/// What identifies the process a pool was filled in: the fork counter with the hook, else the
/// process ID (tagged apart from the counter's values).
fn fork_generation() -> u64 {
    if FORK_HOOK.load(Ordering::Relaxed) {
        FORKS.load(Ordering::Relaxed)
    } else {
        (1 << 63) | u64::from(std::process::id())
    }
}

/// A fresh random 96-bit nonce (no system call and no DRBG call per block).
fn random_nonce() -> Result<[u8; NONCE_BYTES], CipherError> {
    let mut n = [0u8; NONCE_BYTES];
    let generation = fork_generation();
    NONCES.with(|cell| {
        let mut p = cell.try_borrow_mut().map_err(|_| CipherError::Backend)?;
        if p.pos + NONCE_BYTES > p.buf.len() || p.generation != generation {
            aws_lc_rs::rand::fill(&mut p.buf).map_err(|_| CipherError::Backend)?;
            p.pos = 0;
            p.generation = generation;
        }
        let at = p.pos;
        n.copy_from_slice(&p.buf[at..at + NONCE_BYTES]);
        p.pos += NONCE_BYTES;
        Ok::<(), CipherError>(())
    })?;
    Ok(n)
}

/// Block AAD: block index (u64 big-endian) followed by the 16-byte file ID.
pub fn block_aad(file_id: &[u8; 16], block: u64) -> [u8; 24] {
    let mut aad = [0u8; 24];
    aad[..8].copy_from_slice(&block.to_be_bytes());
    aad[8..].copy_from_slice(file_id);
    aad
}

pub struct GcmContent {
    key: LessSafeKey,
    file_id: [u8; 16],
}

impl GcmContent {
    pub fn new(k: &SecretKey<32>, file_id: [u8; 16]) -> Result<Self, CipherError> {
        Ok(GcmContent {
            key: key(k.expose_secret())?,
            file_id,
        })
    }
}

impl ContentCipher for GcmContent {
    fn overhead(&self) -> usize {
        BLOCK_OVERHEAD
    }
    fn is_authenticated(&self) -> bool {
        true
    }

    fn seal(&self, block: u64, pt: &[u8], out: &mut [u8]) -> Result<(), CipherError> {
        check_lengths(pt.len(), out.len(), BLOCK_OVERHEAD)?;
        let nonce = random_nonce()?;
        let (n, rest) = out.split_at_mut(NONCE_BYTES);
        let (body, tag_out) = rest.split_at_mut(pt.len());
        n.copy_from_slice(&nonce);
        // Out of place: one pass over the data.
        self.key
            .seal_out_of_place_scatter(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(block_aad(&self.file_id, block)),
                pt,
                body,
                &[],
                tag_out,
            )
            .map_err(|_| CipherError::Backend)
    }

    fn open(&self, block: u64, ct: &[u8], out: &mut [u8]) -> Result<(), CipherError> {
        check_lengths(out.len(), ct.len(), BLOCK_OVERHEAD)?;
        let (n, rest) = ct.split_at(NONCE_BYTES);
        let (body, tag) = rest.split_at(out.len());
        let nonce = Nonce::try_assume_unique_for_key(n).map_err(|_| CipherError::Backend)?;
        let r = self.key.open_separate_gather(
            nonce,
            Aad::from(block_aad(&self.file_id, block)),
            body,
            tag,
            out,
        );
        if r.is_err() {
            // Never hand out unauthenticated plaintext.
            out.fill(0);
            return Err(CipherError::Auth);
        }
        Ok(())
    }
}

/// Seals a small secret or value: `nonce || ciphertext || tag`.
pub fn aead_seal(k: &SecretKey<32>, aad: &[u8], pt: &[u8]) -> Result<Vec<u8>, CipherError> {
    let key = key(k.expose_secret())?;
    let nonce = random_nonce()?;
    let mut out = Vec::with_capacity(pt.len() + AEAD_OVERHEAD);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(pt);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[NONCE_BYTES..],
        )
        .map_err(|_| CipherError::Backend)?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Opens what [`aead_seal`] produced, writing the plaintext through `sink` (so that the caller
/// decides where secret plaintext lives); the temporary buffer is wiped.
pub fn aead_open<T>(
    k: &SecretKey<32>,
    aad: &[u8],
    sealed: &[u8],
    sink: impl FnOnce(&[u8]) -> T,
) -> Result<T, CipherError> {
    if sealed.len() < AEAD_OVERHEAD {
        return Err(CipherError::Length(sealed.len()));
    }
    let key = key(k.expose_secret())?;
    let (n, rest) = sealed.split_at(NONCE_BYTES);
    let (body, tag) = rest.split_at(rest.len() - TAG_BYTES);
    let nonce = Nonce::try_assume_unique_for_key(n).map_err(|_| CipherError::Backend)?;
    let mut buf = zeroize::Zeroizing::new(body.to_vec());
    key.open_in_place_separate_tag(nonce, Aad::from(aad), tag, &mut buf)
        .map_err(|_| CipherError::Auth)?;
    Ok(sink(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_gcm::aead::{AeadInPlace, KeyInit};

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// NIST GCM spec (McGrew & Viega) test cases 13–16 for AES-256, through aws-lc-rs.
    #[test]
    fn nist_known_answers() {
        let cases = [
            // (key, iv, pt, aad, ct, tag)
            (
                "0000000000000000000000000000000000000000000000000000000000000000",
                "000000000000000000000000",
                "",
                "",
                "",
                "530f8afbc74536b9a963b4f1c4cb738b",
            ),
            (
                "0000000000000000000000000000000000000000000000000000000000000000",
                "000000000000000000000000",
                "00000000000000000000000000000000",
                "",
                "cea7403d4d606b6e074ec5d3baf39d18",
                "d0d1c8a799996bf0265b98b5d48ab919",
            ),
            (
                "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
                "cafebabefacedbaddecaf888",
                "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255",
                "",
                "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
                "b094dac5d93471bdec1a502270e3cc6c",
            ),
            (
                "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
                "cafebabefacedbaddecaf888",
                "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
                "feedfacedeadbeeffeedfacedeadbeefabaddad2",
                "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
                "76fc6ece0f4e1768cddf8853bb2d551b",
            ),
        ];
        for (k, iv, pt, aad, ct, tag) in cases {
            let lk = key(&h(k).try_into().unwrap()).unwrap();
            let mut buf = h(pt);
            let t = lk
                .seal_in_place_separate_tag(
                    Nonce::try_assume_unique_for_key(&h(iv)).unwrap(),
                    Aad::from(h(aad)),
                    &mut buf,
                )
                .unwrap();
            assert_eq!(hex::encode(&buf), ct);
            assert_eq!(hex::encode(t.as_ref()), tag);
            // The cross-check backend agrees.
            let rc = aes_gcm::Aes256Gcm::new_from_slice(&h(k)).unwrap();
            let mut buf2 = h(pt);
            let t2 = rc
                .encrypt_in_place_detached(iv_of(&h(iv)), &h(aad), &mut buf2)
                .unwrap();
            assert_eq!(buf, buf2);
            assert_eq!(t.as_ref(), t2.as_slice());
        }
    }

    fn iv_of(v: &[u8]) -> &aes_gcm::Nonce<aes_gcm::aead::consts::U12> {
        aes_gcm::Nonce::from_slice(v)
    }

    /// Our block wrapper against RustCrypto, both directions.
    #[test]
    fn block_cross_check_with_rustcrypto() {
        let k = SecretKey::<32>::random().unwrap();
        let id = [7u8; 16];
        let c = GcmContent::new(&k, id).unwrap();
        let rc = aes_gcm::Aes256Gcm::new_from_slice(k.expose_secret()).unwrap();
        for len in [1usize, 15, 16, 17, 1000, 4095, 4096] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
            let mut out = vec![0u8; len + BLOCK_OVERHEAD];
            c.seal(42, &pt, &mut out).unwrap();
            // RustCrypto opens ours.
            let (n, rest) = out.split_at(NONCE_BYTES);
            let (body, tag) = rest.split_at(len);
            let mut dec = body.to_vec();
            rc.decrypt_in_place_detached(
                iv_of(n),
                &block_aad(&id, 42),
                &mut dec,
                aes_gcm::Tag::from_slice(tag),
            )
            .unwrap();
            assert_eq!(dec, pt);
            // Ours opens RustCrypto's.
            let nonce = [9u8; 12];
            let mut body2 = pt.clone();
            let tag2 = rc
                .encrypt_in_place_detached(iv_of(&nonce), &block_aad(&id, 42), &mut body2)
                .unwrap();
            let mut disk = nonce.to_vec();
            disk.extend_from_slice(&body2);
            disk.extend_from_slice(&tag2);
            let mut back = vec![0u8; len];
            c.open(42, &disk, &mut back).unwrap();
            assert_eq!(back, pt);
        }
    }

    #[test]
    fn tamper_and_move_fail() {
        let k = SecretKey::<32>::random().unwrap();
        let c = GcmContent::new(&k, [1u8; 16]).unwrap();
        let other = GcmContent::new(&k, [2u8; 16]).unwrap();
        let pt = [0x5au8; 4096];
        let mut ct = vec![0u8; 4096 + BLOCK_OVERHEAD];
        c.seal(3, &pt, &mut ct).unwrap();
        let mut out = vec![0u8; 4096];
        c.open(3, &ct, &mut out).unwrap();
        assert_eq!(out, pt);
        assert_eq!(c.open(4, &ct, &mut out), Err(CipherError::Auth));
        assert_eq!(other.open(3, &ct, &mut out), Err(CipherError::Auth));
        assert!(
            out.iter().all(|&b| b == 0),
            "no unauthenticated plaintext leaks"
        );
        for pos in [0, 12, 100, 4096 + 12, 4096 + 27] {
            let mut t = ct.clone();
            t[pos] ^= 1;
            assert_eq!(
                c.open(3, &t, &mut out),
                Err(CipherError::Auth),
                "flip at {pos}"
            );
        }
    }

    #[test]
    fn nonces_never_repeat() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5000 {
            assert!(seen.insert(random_nonce().unwrap()), "a nonce repeated");
        }
    }

    #[test]
    fn small_aead_round_trip() {
        let k = SecretKey::<32>::random().unwrap();
        let s = aead_seal(&k, b"ctx", b"secret value").unwrap();
        assert_eq!(s.len(), 12 + AEAD_OVERHEAD);
        let v = aead_open(&k, b"ctx", &s, |p| p.to_vec()).unwrap();
        assert_eq!(v, b"secret value");
        assert_eq!(
            aead_open(&k, b"other", &s, |p| p.to_vec()),
            Err(CipherError::Auth)
        );
        assert!(aead_open(&k, b"ctx", &s[..10], |p| p.to_vec()).is_err());
    }
}
