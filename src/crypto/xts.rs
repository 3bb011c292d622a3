//! AES-256-XTS through OpenSSL: length-preserving, like kernel fscrypt. The tweak is the block
//! index (little-endian, 16 bytes) and every file has its own 64-byte key. Confidentiality only:
//! XTS cannot detect tampering.
//!
//! A final block of 16 bytes or more uses XTS ciphertext stealing. A final block shorter than 16
//! bytes (XTS cannot encrypt it) is XORed with a keystream made by XTS-encrypting a zero block
//! under a tweak with its top bit set (a tweak no full block uses). docs/FORMAT.md records what
//! that reveals.

use super::{check_lengths, CipherError, ContentCipher};
use crate::key::SecretKey;
use openssl::cipher::{Cipher, CipherRef};
use openssl::cipher_ctx::CipherCtx;
use std::sync::Mutex;

/// Bytes of the smallest unit XTS can encrypt.
const XTS_MIN: usize = 16;

pub struct XtsContent {
    enc: Pool,
    dec: Pool,
}

/// Contexts hold the expanded key; creating one per block would cost as much as the block's
/// encryption, so each file keeps a small pool and only the tweak changes per block.
struct Pool {
    proto: Mutex<Vec<CipherCtx>>,
    template: CipherCtx,
    encrypt: bool,
}

fn cipher() -> &'static CipherRef {
    Cipher::aes_256_xts()
}

impl Pool {
    fn new(key: &SecretKey<64>, encrypt: bool) -> Result<Self, CipherError> {
        let mut ctx = CipherCtx::new().map_err(|_| CipherError::Backend)?;
        let zero_iv = [0u8; 16];
        if encrypt {
            ctx.encrypt_init(Some(cipher()), Some(key.expose_secret()), Some(&zero_iv))
        } else {
            ctx.decrypt_init(Some(cipher()), Some(key.expose_secret()), Some(&zero_iv))
        }
        .map_err(|_| CipherError::Backend)?;
        Ok(Pool {
            proto: Mutex::new(Vec::new()),
            template: ctx,
            encrypt,
        })
    }

    fn run(&self, tweak: &[u8; 16], input: &[u8], out: &mut [u8]) -> Result<(), CipherError> {
        let pooled = self.proto.lock().map_err(|_| CipherError::Backend)?.pop();
        let mut ctx = match pooled {
            Some(c) => c,
            None => {
                let mut c = CipherCtx::new().map_err(|_| CipherError::Backend)?;
                c.copy(&self.template).map_err(|_| CipherError::Backend)?;
                c
            }
        };
        let r = (|| {
            if self.encrypt {
                ctx.encrypt_init(None, None, Some(tweak))
            } else {
                ctx.decrypt_init(None, None, Some(tweak))
            }
            .map_err(|_| CipherError::Backend)?;
            let n = ctx
                .cipher_update(input, Some(out))
                .map_err(|_| CipherError::Backend)?;
            if n != input.len() {
                return Err(CipherError::Backend);
            }
            Ok(())
        })();
        if let Ok(mut p) = self.proto.lock() {
            if p.len() < 16 {
                p.push(ctx);
            }
        }
        r
    }
}

pub fn tweak(block: u64) -> [u8; 16] {
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&block.to_le_bytes());
    t
}

fn tail_tweak(block: u64) -> [u8; 16] {
    let mut t = tweak(block);
    t[15] = 0x80;
    t
}

impl XtsContent {
    pub fn new(key: &SecretKey<64>) -> Result<Self, CipherError> {
        Ok(XtsContent {
            enc: Pool::new(key, true)?,
            dec: Pool::new(key, false)?,
        })
    }

    fn short_tail(&self, block: u64, input: &[u8], out: &mut [u8]) -> Result<(), CipherError> {
        let mut ks = zeroize::Zeroizing::new([0u8; XTS_MIN]);
        self.enc
            .run(&tail_tweak(block), &[0u8; XTS_MIN], &mut ks[..])?;
        for ((o, i), k) in out.iter_mut().zip(input).zip(ks.iter()) {
            *o = i ^ k;
        }
        Ok(())
    }
}

impl ContentCipher for XtsContent {
    fn overhead(&self) -> usize {
        0
    }
    fn is_authenticated(&self) -> bool {
        false
    }

    fn seal(&self, block: u64, pt: &[u8], out: &mut [u8]) -> Result<(), CipherError> {
        check_lengths(pt.len(), out.len(), 0)?;
        if pt.len() < XTS_MIN {
            return self.short_tail(block, pt, out);
        }
        self.enc.run(&tweak(block), pt, out)
    }

    fn open(&self, block: u64, ct: &[u8], out: &mut [u8]) -> Result<(), CipherError> {
        check_lengths(out.len(), ct.len(), 0)?;
        if ct.len() < XTS_MIN {
            return self.short_tail(block, ct, out);
        }
        self.dec.run(&tweak(block), ct, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::KeyInit;
    use xts_mode::{get_tweak_default, Xts128};

    fn key_v10() -> SecretKey<64> {
        let mut k = hex::decode("2718281828459045235360287471352662497757247093699959574966967627")
            .unwrap();
        k.extend(
            hex::decode("3141592653589793238462643383279502884197169399375105820974944592")
                .unwrap(),
        );
        SecretKey::from_slice(&k).unwrap()
    }

    /// IEEE 1619-2007 vector 10 (XTS-AES-256, data unit 0xff, 512 bytes), through our wrapper.
    #[test]
    fn ieee1619_vector_10() {
        let x = XtsContent::new(&key_v10()).unwrap();
        let pt: Vec<u8> = (0..512).map(|i| (i % 256) as u8).collect();
        let mut ct = vec![0u8; 512];
        x.enc.run(&tweak(0xff), &pt, &mut ct).unwrap();
        assert_eq!(
            hex::encode(&ct[..64]),
            "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b\
             5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd"
        );
        let mut back = vec![0u8; 512];
        x.open(0xff, &ct, &mut back).unwrap();
        assert_eq!(back, pt);
        // Through the block API too (same tweak layout).
        let mut ct2 = vec![0u8; 512];
        x.seal(0xff, &pt, &mut ct2).unwrap();
        assert_eq!(ct, ct2);
    }

    /// Cross-check against RustCrypto's xts-mode, both directions, full blocks and stolen tails.
    #[test]
    fn cross_check_with_rustcrypto() {
        let k = SecretKey::<64>::random().unwrap();
        let x = XtsContent::new(&k).unwrap();
        let c1 = aes::Aes256::new_from_slice(&k.expose_secret()[..32]).unwrap();
        let c2 = aes::Aes256::new_from_slice(&k.expose_secret()[32..]).unwrap();
        let rc = Xts128::new(c1, c2);
        for len in [16usize, 17, 31, 32, 100, 4095, 4096] {
            for block in [0u64, 1, 77, u64::from(u32::MAX) + 5] {
                let pt: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                let mut ours = vec![0u8; len];
                x.seal(block, &pt, &mut ours).unwrap();
                let mut theirs = pt.clone();
                rc.encrypt_sector(&mut theirs, get_tweak_default(u128::from(block)));
                assert_eq!(ours, theirs, "len {len} block {block}");
                let mut back = vec![0u8; len];
                x.open(block, &theirs, &mut back).unwrap();
                assert_eq!(back, pt);
            }
        }
    }

    #[test]
    fn short_tails_round_trip_and_differ_by_block() {
        let x = XtsContent::new(&SecretKey::<64>::random().unwrap()).unwrap();
        for len in 1..16 {
            let pt = vec![0xabu8; len];
            let mut a = vec![0u8; len];
            let mut b = vec![0u8; len];
            x.seal(5, &pt, &mut a).unwrap();
            x.seal(6, &pt, &mut b).unwrap();
            assert_ne!(a, pt);
            assert_ne!(a, b);
            let mut back = vec![0u8; len];
            x.open(5, &a, &mut back).unwrap();
            assert_eq!(back, pt);
        }
    }

    #[test]
    fn length_checked() {
        let x = XtsContent::new(&SecretKey::<64>::random().unwrap()).unwrap();
        let mut out = vec![0u8; 10];
        assert!(x.seal(0, &[0u8; 11], &mut out).is_err());
        assert!(x.seal(0, &[], &mut []).is_err());
        let mut big = vec![0u8; 4097];
        assert!(x.seal(0, &[0u8; 4097], &mut big).is_err());
    }
}
