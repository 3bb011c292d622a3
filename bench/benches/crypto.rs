//! Crypto micro-benchmarks: seal and open of 4 KiB blocks for each suite through our wrappers
//! (the backends vaultfs uses: aws-lc-rs GCM, OpenSSL XTS) and through the RustCrypto
//! implementations kept as cross-checks. Compare with the machine's ceiling:
//! `openssl speed -evp aes-256-gcm -bytes 4096` and `openssl speed -evp aes-256-xts -bytes 4096`.
//!
//! Run: `cargo bench -p vaultfs-bench --bench crypto`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use aes_gcm::aead::{AeadInPlace, KeyInit};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use vaultfs_core::{CipherSuite, SecretKey};

const BLOCK: usize = 4096;

fn ours(c: &mut Criterion) {
    let key = SecretKey::<32>::random().unwrap();
    let id = [7u8; 16];
    for suite in [CipherSuite::Aes256Gcm, CipherSuite::Aes256Xts] {
        let cipher = suite.file_cipher(&key, &id).unwrap();
        let pt = vec![0x5au8; BLOCK];
        let mut ct = vec![0u8; BLOCK + cipher.overhead()];
        let mut out = vec![0u8; BLOCK];
        let mut g = c.benchmark_group(format!("vaultfs/{}", suite.name()));
        g.throughput(Throughput::Bytes(BLOCK as u64));
        g.bench_function("seal-4k", |b| {
            let mut i = 0u64;
            b.iter(|| {
                i += 1;
                cipher.seal(black_box(i), black_box(&pt), &mut ct).unwrap();
            })
        });
        cipher.seal(1, &pt, &mut ct).unwrap();
        g.bench_function("open-4k", |b| {
            b.iter(|| cipher.open(1, black_box(&ct), &mut out).unwrap())
        });
        g.finish();
    }
}

fn rustcrypto(c: &mut Criterion) {
    let key = [3u8; 32];
    let gcm = aes_gcm::Aes256Gcm::new_from_slice(&key).unwrap();
    let nonce = aes_gcm::Nonce::from_slice(&[1u8; 12]);
    let mut g = c.benchmark_group("rustcrypto/aes-256-gcm");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    let mut buf = vec![0x5au8; BLOCK];
    g.bench_function("seal-4k", |b| {
        b.iter(|| {
            gcm.encrypt_in_place_detached(nonce, b"aad", black_box(&mut buf))
                .unwrap()
        })
    });
    g.finish();
    let c1 = aes::Aes256::new_from_slice(&key).unwrap();
    let c2 = aes::Aes256::new_from_slice(&[4u8; 32]).unwrap();
    let xts = xts_mode::Xts128::new(c1, c2);
    let mut g = c.benchmark_group("rustcrypto/aes-256-xts");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    g.bench_function("seal-4k", |b| {
        b.iter(|| xts.encrypt_sector(black_box(&mut buf), xts_mode::get_tweak_default(5)))
    });
    g.finish();
}

criterion_group!(benches, ours, rustcrypto);
criterion_main!(benches);
