//! The only unsafe code of vaultfs-bench: the two kernel fscrypt ioctls that set up an
//! encrypted directory (v2 policy, AES-256-XTS contents, AES-256-CTS names) without the
//! `fscrypt` CLI and without touching /etc/fscrypt.conf. Layouts from
//! include/uapi/linux/fscrypt.h.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use zeroize::Zeroize;

const FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER: u32 = 2;
const FSCRYPT_POLICY_V2: u8 = 2;
const FSCRYPT_MODE_AES_256_XTS: u8 = 1;
const FSCRYPT_MODE_AES_256_CTS: u8 = 4;
/// Names padded to 32 bytes, the default of the fscrypt tool.
const FSCRYPT_POLICY_FLAGS_PAD_32: u8 = 0x03;

/// `_IOR('f', 19, struct fscrypt_policy_v1)`: the kernel takes the policy version from the
/// first byte and accepts a v2 policy through the v1-sized request number.
const FS_IOC_SET_ENCRYPTION_POLICY: u32 = 0x800c_6613;
/// `_IOWR('f', 23, struct fscrypt_add_key_arg)` (80 bytes without the flexible `raw`).
const FS_IOC_ADD_ENCRYPTION_KEY: u32 = 0xc050_6617;

/// Size of a v2 master key for AES-256-XTS.
pub const FSCRYPT_KEY_LEN: usize = 64;

/// `struct fscrypt_key_specifier`.
#[repr(C)]
struct KeySpecifier {
    kind: u32,
    reserved: u32,
    /// Union of `__reserved[32]`, `descriptor[8]` and `identifier[16]`.
    u: [u8; 32],
}

/// `struct fscrypt_add_key_arg` followed by its `raw[]` payload.
#[repr(C)]
struct AddKeyArg {
    key_spec: KeySpecifier,
    raw_size: u32,
    key_id: u32,
    reserved: [u32; 8],
    raw: [u8; FSCRYPT_KEY_LEN],
}

/// `struct fscrypt_policy_v2`.
#[repr(C)]
struct PolicyV2 {
    version: u8,
    contents_encryption_mode: u8,
    filenames_encryption_mode: u8,
    flags: u8,
    reserved: [u8; 4],
    master_key_identifier: [u8; 16],
}

const _: () = assert!(std::mem::size_of::<KeySpecifier>() == 40);
const _: () = assert!(std::mem::size_of::<AddKeyArg>() == 80 + FSCRYPT_KEY_LEN);
const _: () = assert!(std::mem::size_of::<PolicyV2>() == 24);

/// Adds a v2 master key to the file system that holds `fs_path` (needs CAP_SYS_ADMIN or a
/// key quota) and returns its 16-byte identifier. The key stays in the file system's keyring
/// until it is unmounted.
pub fn add_encryption_key(fs_path: &Path, key: &[u8; FSCRYPT_KEY_LEN]) -> io::Result<[u8; 16]> {
    let dir = File::open(fs_path)?;
    let mut arg = AddKeyArg {
        key_spec: KeySpecifier {
            kind: FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER,
            reserved: 0,
            u: [0; 32],
        },
        raw_size: FSCRYPT_KEY_LEN as u32,
        key_id: 0,
        reserved: [0; 8],
        raw: *key,
    };
    // SAFETY: `arg` is a live, properly aligned `#[repr(C)]` struct laid out as the kernel's
    // `fscrypt_add_key_arg` with `raw_size` bytes of `raw[]` directly after the 80-byte header,
    // so the kernel reads and writes only inside it; the fd is open for the whole call.
    let rc = unsafe {
        libc::ioctl(
            dir.as_raw_fd(),
            FS_IOC_ADD_ENCRYPTION_KEY as _,
            &mut arg as *mut AddKeyArg,
        )
    };
    let err = io::Error::last_os_error();
    arg.raw.zeroize();
    if rc != 0 {
        return Err(err);
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&arg.key_spec.u[..16]);
    Ok(id)
}

/// Makes the empty directory `dir` encrypted under the key `identifier` (policy v2,
/// AES-256-XTS contents, AES-256-CTS names, 32-byte name padding).
pub fn set_encryption_policy(dir: &Path, identifier: &[u8; 16]) -> io::Result<()> {
    let d = File::open(dir)?;
    let policy = PolicyV2 {
        version: FSCRYPT_POLICY_V2,
        contents_encryption_mode: FSCRYPT_MODE_AES_256_XTS,
        filenames_encryption_mode: FSCRYPT_MODE_AES_256_CTS,
        flags: FSCRYPT_POLICY_FLAGS_PAD_32,
        reserved: [0; 4],
        master_key_identifier: *identifier,
    };
    // SAFETY: `policy` is a live `#[repr(C)]` `fscrypt_policy_v2` that the kernel only reads
    // (it copies the size implied by the version byte, 24 bytes, which is the struct's size);
    // the fd is open for the whole call.
    let rc = unsafe {
        libc::ioctl(
            d.as_raw_fd(),
            FS_IOC_SET_ENCRYPTION_POLICY as _,
            &policy as *const PolicyV2,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
