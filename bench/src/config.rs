//! What is benchmarked: the systems, the workloads, and the sizes of a full or `--quick` run.

use clap::ValueEnum;

/// A file system set up fresh for every repetition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum System {
    /// A directory on the file system that holds the work directory.
    Plain,
    /// The same kind of directory, written and read with `O_DIRECT` (seq-write and seq-read
    /// only): what the disk itself takes and gives, bypassing the page cache.
    PlainDirect,
    /// bindfs (FUSE passthrough, libfuse high-level API) over a plain directory.
    Bindfs,
    /// gocryptfs (initialised with -scryptn 10, mounted with -passfile).
    Gocryptfs,
    /// A directory on a fresh ext4 image (mkfs.ext4 -O encrypt) on a loop device.
    Ext4Loop,
    /// Kernel fscrypt (policy v2, AES-256-XTS contents) on the same kind of loop image.
    Fscrypt,
    /// vaultfs with aes-256-gcm, ciphertext on the work directory's file system.
    VaultfsGcm,
    /// vaultfs with aes-256-xts, ciphertext on the work directory's file system.
    VaultfsXts,
    /// vaultfs with aes-256-xts, ciphertext on an ext4 loop image (compare with fscrypt).
    VaultfsXtsLoop,
}

impl System {
    pub const ALL: [System; 9] = [
        System::Plain,
        System::PlainDirect,
        System::Bindfs,
        System::Gocryptfs,
        System::Ext4Loop,
        System::Fscrypt,
        System::VaultfsGcm,
        System::VaultfsXts,
        System::VaultfsXtsLoop,
    ];

    pub fn name(self) -> &'static str {
        match self {
            System::Plain => "plain",
            System::PlainDirect => "plain-direct",
            System::Bindfs => "bindfs",
            System::Gocryptfs => "gocryptfs",
            System::Ext4Loop => "ext4-loop",
            System::Fscrypt => "fscrypt",
            System::VaultfsGcm => "vaultfs-gcm",
            System::VaultfsXts => "vaultfs-xts",
            System::VaultfsXtsLoop => "vaultfs-xts-loop",
        }
    }
}

/// One measured operation. Every workload starts after `sync` and dropping the page, dentry
/// and inode caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum Workload {
    /// From invoking the mount command until the mount point answers (FUSE systems only).
    MountTime,
    /// Write one file sequentially in 1 MiB requests, then fsync and close.
    SeqWrite,
    /// Read that file back in 1 MiB requests, cold cache.
    SeqRead,
    /// 4 KiB preads at fixed-seed random offsets of a file, cold cache, POSIX_FADV_RANDOM.
    RandRead,
    /// 4 KiB pwrites at fixed-seed random offsets of a file, then fsync (included).
    RandWrite,
    /// `tar -xf` of the source tree tarball (read into the page cache first), no sync.
    Untar,
    /// `ls -lR` of the untarred tree, cold cache.
    #[value(name = "ls-lR", alias = "ls-lr")]
    LsLr,
    /// readdir + lstat of every entry of the tree, cold cache.
    StatAll,
    /// `rm -rf` of the tree.
    RmRf,
    /// Create N empty files in one directory, then delete them.
    CreateDelete,
}

/// Whether a bigger number is better (throughput) or a smaller one (seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

impl Workload {
    /// Every workload, in the order one repetition runs them.
    pub const ALL: [Workload; 10] = [
        Workload::MountTime,
        Workload::SeqWrite,
        Workload::SeqRead,
        Workload::RandRead,
        Workload::RandWrite,
        Workload::Untar,
        Workload::LsLr,
        Workload::StatAll,
        Workload::RmRf,
        Workload::CreateDelete,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::MountTime => "mount-time",
            Workload::SeqWrite => "seq-write",
            Workload::SeqRead => "seq-read",
            Workload::RandRead => "rand-read",
            Workload::RandWrite => "rand-write",
            Workload::Untar => "untar",
            Workload::LsLr => "ls-lR",
            Workload::StatAll => "stat-all",
            Workload::RmRf => "rm-rf",
            Workload::CreateDelete => "create-delete",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Workload::SeqWrite | Workload::SeqRead => "MB/s",
            Workload::RandRead | Workload::RandWrite => "IOPS",
            _ => "s",
        }
    }

    pub fn better(self) -> Better {
        match self {
            Workload::SeqWrite | Workload::SeqRead | Workload::RandRead | Workload::RandWrite => {
                Better::Higher
            }
            _ => Better::Lower,
        }
    }
}

/// Sizes of one run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Sizes {
    /// Size of the sequential file.
    pub seq_bytes: u64,
    /// Request size of the sequential workloads.
    pub seq_request: usize,
    /// Size of the random-I/O file.
    pub rand_file_bytes: u64,
    /// Number of 4 KiB operations of each random workload.
    pub rand_ops: u64,
    /// Number of regular files in the source tree tarball.
    pub tree_files: usize,
    /// Number of files created and deleted.
    pub create_files: usize,
    /// Size of each (sparse) ext4 loop image.
    pub image_bytes: u64,
}

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const RAND_BLOCK: usize = 4096;

impl Sizes {
    pub fn full() -> Sizes {
        Sizes {
            seq_bytes: GIB,
            seq_request: MIB as usize,
            rand_file_bytes: 256 * MIB,
            rand_ops: 32_768,
            tree_files: 6_000,
            create_files: 10_000,
            image_bytes: 3 * GIB,
        }
    }

    pub fn quick() -> Sizes {
        Sizes {
            seq_bytes: 16 * MIB,
            seq_request: MIB as usize,
            rand_file_bytes: 16 * MIB,
            rand_ops: 2_000,
            tree_files: 200,
            create_files: 500,
            image_bytes: 3 * GIB,
        }
    }
}
