//! The filesystem logic, free of fuser types: an inode table over O_PATH descriptors of the
//! backing tree, name encryption per directory, and content I/O through [`Content`]. Every
//! operation returns `Result<_, Errno>`; the adapter in `adapter.rs` turns results into replies.

use crate::content::{Content, ContentError};
use crate::statahead::{Job, Queue, Statahead};
use parking_lot::{Mutex, RwLock};
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags, Stat};
use std::collections::HashMap;
use std::ffi::{CStr, OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::SystemTime;
use tracing::{error, warn};
use vaultfs_core::crypto::{aead_open, aead_seal};
use vaultfs_core::format::{Layout, DIRIV_FILE, DIRIV_LEN, RESERVED_PREFIX};
use vaultfs_core::names::{self, BackingName, NameCipher};
use vaultfs_core::vault::VaultKeys;
use vaultfs_core::{CipherSuite, SecretKey};

/// A positive errno value.
pub type Errno = i32;
pub type FsResult<T> = Result<T, Errno>;

pub const ROOT_INO: u64 = 1;

fn en(e: rustix::io::Errno) -> Errno {
    e.raw_os_error()
}

fn ce(e: ContentError) -> Errno {
    e.errno()
}

/// File types we present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => Kind::File,
        }
    }
}

/// Attributes as presented through the mount.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub kind: Kind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
}

impl Attr {
    /// What READDIRPLUS gives for "." and "..": the kernel uses only the number and type.
    fn dot(ino: u64) -> Attr {
        Attr {
            ino,
            size: 0,
            blocks: 0,
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            kind: Kind::Dir,
            perm: 0,
            nlink: 0,
            uid: 0,
            gid: 0,
            rdev: 0,
        }
    }
}

/// Who is asking.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// The calling thread (0 when the kernel itself asks).
    pub pid: u32,
}

impl Caller {
    /// Whether the caller is in group `gid`: its own group, or one of its supplementary groups
    /// (read from `/proc/PID/status`; when that cannot be read, only its own group counts).
    fn in_group(&self, gid: u32) -> bool {
        if self.gid == gid {
            return true;
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid));
        status.ok().is_some_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
        })
    }
}

struct Inode {
    ino: u64,
    /// O_PATH descriptor of the backing object.
    fd: OwnedFd,
    kind: Kind,
    nlookup: AtomicU64,
    diriv: OnceLock<[u8; DIRIV_LEN]>,
    /// A listing of its parent queued it for read-ahead: it is being walked, so a listing of
    /// it reads two levels ahead (see `queue_read_ahead`).
    read_ahead_queued: AtomicBool,
    /// Content state of a regular file, while anyone holds it (handles, running requests):
    /// see `VaultFs::content_with`.
    content: Mutex<Weak<RwLock<Content>>>,
}

impl Inode {
    fn proc_path(&self) -> String {
        format!("/proc/self/fd/{}", self.fd.as_raw_fd())
    }
}

/// One decrypted directory entry.
pub struct DirEntryOut {
    pub ino: u64,
    pub kind: Kind,
    pub name: OsString,
    /// The entry's name in the backing directory (what a stat of it needs).
    backing: String,
}

enum Handle {
    File {
        inode: Arc<Inode>,
        content: Arc<RwLock<Content>>,
        /// Opened write-only: reads through it are the kernel's own (filling a page cache page
        /// that a write only partly covers), which do not count as accesses.
        write_only: bool,
    },
}

pub struct Options {
    pub read_only: bool,
    /// Reads leave access times alone (`-o noatime`); otherwise they follow relatime.
    pub noatime: bool,
}

pub struct VaultFs {
    suite: CipherSuite,
    layout: Layout,
    contents: Arc<SecretKey<32>>,
    names: NameCipher,
    aux: SecretKey<32>,
    root_backing_ino: u64,
    inodes: RwLock<HashMap<u64, Arc<Inode>>>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    is_root: bool,
    /// Our effective uid and gid.
    uid: u32,
    gid: u32,
    opts: Options,
    /// Background read-ahead of the subdirectories a listing finds.
    statahead: Statahead,
    /// Whether read-ahead is on: only on local file systems, where `O_NOATIME` keeps it from
    /// changing directories' atimes.
    read_ahead_on: bool,
    /// The session's `/dev/fuse` descriptor, for notifications to the kernel (set once
    /// mounted; None in unit tests).
    notify: OnceLock<OwnedFd>,
}

fn ts(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        SystemTime::UNIX_EPOCH + std::time::Duration::new(sec as u64, nsec as u32)
    } else {
        SystemTime::UNIX_EPOCH - std::time::Duration::from_secs(sec.unsigned_abs())
            + std::time::Duration::from_nanos(nsec as u64)
    }
}

const SYMLINK_AAD: &[u8] = b"vaultfs v1 symlink target";
const XATTR_PREFIX: &str = "user.vfs.";

fn b64url() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

impl VaultFs {
    pub fn new(cipherdir: &Path, keys: VaultKeys, opts: Options) -> std::io::Result<VaultFs> {
        let fd = rustix::fs::open(
            cipherdir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(&fd)?;
        let fs = VaultFs {
            suite: keys.suite,
            layout: Layout::new(keys.suite.overhead()),
            contents: Arc::new(keys.contents),
            names: keys.names,
            aux: keys.aux,
            root_backing_ino: st.st_ino,
            inodes: RwLock::new(HashMap::new()),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            is_root: rustix::process::geteuid().is_root(),
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            opts,
            statahead: Statahead::default(),
            notify: OnceLock::new(),
            // `f_type`'s integer type differs between architectures.
            #[allow(clippy::unnecessary_cast)]
            read_ahead_on: rustix::fs::fstatfs(&fd)
                .is_ok_and(|sf| LOCAL_FS_MAGIC.contains(&(sf.f_type as i64))),
        };
        let root = Arc::new(Inode {
            ino: ROOT_INO,
            fd,
            kind: Kind::Dir,
            nlookup: AtomicU64::new(1),
            diriv: OnceLock::new(),
            read_ahead_queued: AtomicBool::new(false),
            content: Mutex::new(Weak::new()),
        });
        // Fail at mount, not at first use, if the root directory IV is missing.
        fs.diriv(&root).map_err(std::io::Error::from_raw_os_error)?;
        fs.inodes.write().insert(ROOT_INO, root);
        Ok(fs)
    }

    /// Maps a backing inode number to a FUSE node ID: the root becomes 1, and a backing inode 1
    /// (if any) takes the root's number, so the mapping stays one-to-one.
    fn node_id(&self, backing: u64) -> u64 {
        if backing == self.root_backing_ino {
            ROOT_INO
        } else if backing == ROOT_INO {
            self.root_backing_ino
        } else {
            backing
        }
    }

    fn inode(&self, ino: u64) -> FsResult<Arc<Inode>> {
        self.inodes.read().get(&ino).cloned().ok_or(libc::ESTALE)
    }

    fn diriv(&self, dir: &Inode) -> FsResult<[u8; DIRIV_LEN]> {
        if let Some(iv) = dir.diriv.get() {
            return Ok(*iv);
        }
        load_diriv(dir).map_err(|(e, errno)| match errno {
            // Not damage: no descriptor left to read it with.
            Some(n @ (rustix::io::Errno::MFILE | rustix::io::Errno::NFILE)) => self.open_failed(n),
            _ => {
                error!(dir = dir.ino, "directory IV file {e}");
                libc::EIO
            }
        })
    }

    fn backing_name(&self, dir: &Inode, name: &OsStr) -> FsResult<BackingName> {
        let iv = self.diriv(dir)?;
        let enc = self
            .names
            .encrypt(&iv, name.as_bytes())
            .map_err(|e| match e {
                names::NameError::TooLong => libc::ENAMETOOLONG,
                _ => libc::EINVAL,
            })?;
        Ok(names::backing_name(enc))
    }

    fn attr_of(&self, st: &Stat) -> Attr {
        let kind = Kind::from_mode(st.st_mode);
        let size = match kind {
            Kind::File => self.layout.plain_size_lossy(st.st_size as u64),
            // The target's length follows from the stored length (unpadded base64 of the sealed
            // target), so a stat does not read the link, which would change its atime.
            Kind::Symlink => (st.st_size as u64 * 3 / 4)
                .saturating_sub(vaultfs_core::crypto::AEAD_OVERHEAD as u64),
            _ => st.st_size as u64,
        };
        Attr {
            ino: self.node_id(st.st_ino),
            size,
            blocks: st.st_blocks as u64,
            atime: ts(st.st_atime, st.st_atime_nsec as i64),
            mtime: ts(st.st_mtime, st.st_mtime_nsec as i64),
            ctime: ts(st.st_ctime, st.st_ctime_nsec as i64),
            kind,
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
        }
    }

    fn stat_inode(&self, inode: &Inode) -> FsResult<Attr> {
        let st = rustix::fs::statat(
            &inode.fd,
            "",
            AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(en)?;
        Ok(self.attr_with_content(inode, &st))
    }

    fn attr_with_content(&self, inode: &Inode, st: &Stat) -> Attr {
        let mut a = self.attr_of(st);
        // An open file's size is the one its content state keeps.
        let live = inode.content.lock().upgrade();
        if let Some(c) = live {
            a.size = c.read().size();
        }
        a
    }

    /// Registers a looked-up backing object (new O_PATH fd) and counts the lookup.
    fn remember(&self, fd: OwnedFd) -> FsResult<Attr> {
        let st = rustix::fs::statat(&fd, "", AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW)
            .map_err(en)?;
        let ino = self.node_id(st.st_ino);
        let mut table = self.inodes.write();
        let inode = table.entry(ino).or_insert_with(|| {
            Arc::new(Inode {
                ino,
                fd,
                kind: Kind::from_mode(st.st_mode),
                nlookup: AtomicU64::new(0),
                diriv: OnceLock::new(),
                read_ahead_queued: AtomicBool::new(false),
                content: Mutex::new(Weak::new()),
            })
        });
        inode.nlookup.fetch_add(1, Ordering::Relaxed);
        let inode = Arc::clone(inode);
        drop(table);
        Ok(self.attr_with_content(&inode, &st))
    }

    fn open_child(&self, dir: &Inode, bn: &str) -> FsResult<OwnedFd> {
        rustix::fs::openat(
            &dir.fd,
            bn,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.open_failed(e))
    }

    /// The errno for a descriptor that could not be opened, saying in the log (once) when the
    /// reason is the descriptor limit.
    fn open_failed(&self, e: rustix::io::Errno) -> Errno {
        if matches!(e, rustix::io::Errno::MFILE | rustix::io::Errno::NFILE) {
            self.out_of_descriptors();
        }
        en(e)
    }

    /// An `O_PATH` descriptor of the object `fd` refers to (through its /proc link, so it is
    /// that object whatever its names have become).
    fn path_fd(&self, fd: BorrowedFd<'_>) -> FsResult<OwnedFd> {
        rustix::fs::open(
            format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str(),
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.open_failed(e))
    }

    /// Says once, in the log, that the descriptor limit stops lookups and creates: the daemon
    /// holds one descriptor per inode the kernel caches (the limit is raised as far as allowed
    /// at start; see CLI.md).
    fn out_of_descriptors(&self) {
        static SAID: AtomicBool = AtomicBool::new(false);
        if !SAID.swap(true, Ordering::Relaxed) {
            let cached = self.inodes.read().len();
            let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
            warn!(
                cached,
                ?limit,
                "out of file descriptors: lookups and creates fail with EMFILE until the kernel \
                 forgets inodes (raise the limit, e.g. LimitNOFILE=, or drop caches)"
            );
        }
    }

    /// Removes the backing entry `bn` just made in `dir`, and its long-name side file, after a
    /// later step of the create failed (no descriptor left for it, for instance), so that a
    /// create that fails leaves nothing behind, as on ext4. `flags`: `REMOVEDIR` for a
    /// directory.
    fn undo_create(&self, dir: &Inode, bn: &BackingName, flags: AtFlags) {
        if let Err(e) = rustix::fs::unlinkat(&dir.fd, bn.name(), flags) {
            warn!("a failed create left its backing entry behind: {e}");
        }
        self.remove_long_side(dir, bn);
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let dir = self.inode(parent)?;
        let bn = self.backing_name(&dir, name)?;
        self.lookup_backing(&dir, bn.name())
    }

    /// Looks up the backing entry `bn` of `dir` and counts a lookup of its inode.
    fn lookup_backing(&self, dir: &Inode, bn: &str) -> FsResult<Attr> {
        // One stat answers a lookup of a known inode; only a new one needs a descriptor.
        let st = rustix::fs::statat(&dir.fd, bn, AtFlags::SYMLINK_NOFOLLOW).map_err(en)?;
        let ino = self.node_id(st.st_ino);
        if let Some(inode) = self.inodes.read().get(&ino).cloned() {
            inode.nlookup.fetch_add(1, Ordering::Relaxed);
            return Ok(self.attr_with_content(&inode, &st));
        }
        self.remember(self.open_child(dir, bn)?)
    }

    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let forgotten = {
            let mut table = self.inodes.write();
            match table.get(&ino) {
                Some(i) => {
                    let prev = i
                        .nlookup
                        .fetch_sub(n.min(i.nlookup.load(Ordering::Relaxed)), Ordering::Relaxed);
                    if prev <= n {
                        table.remove(&ino)
                    } else {
                        None
                    }
                }
                None => None,
            }
        };
        // Dropped after the table's lock: closing the last descriptor of a file unlinked
        // through the mount is where the backing file system frees it (for a large file, its
        // blocks), and every request that looks up an inode waits for that lock.
        drop(forgotten);
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let inode = self.inode(ino)?;
        self.stat_inode(&inode)
    }

    /// Writes a long name's side file crash-safely.
    fn write_long_side(&self, dir: &Inode, bn: &BackingName) -> FsResult<()> {
        if let BackingName::Long { name, full } = bn {
            let side = names::long_side_file(name);
            let f = rustix::fs::openat(
                &dir.fd,
                side.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o400),
            )
            .map_err(en)?;
            rustix::io::write(&f, full.as_bytes()).map_err(en)?;
            rustix::fs::fsync(&f).map_err(en)?;
            self.fsync_dir(dir)?;
        }
        Ok(())
    }

    fn remove_long_side(&self, dir: &Inode, bn: &BackingName) {
        if let BackingName::Long { name, .. } = bn {
            let _ = rustix::fs::unlinkat(
                &dir.fd,
                names::long_side_file(name).as_str(),
                AtFlags::empty(),
            );
        }
    }

    fn fsync_dir(&self, dir: &Inode) -> FsResult<()> {
        rustix::fs::fsync(open_dir(&dir.fd, ".")?).map_err(en)
    }

    /// Owner of a new object: the caller, with the group of a set-group-ID parent. Nothing to
    /// do when the caller is who we are: the backing file system has already given the object
    /// our uid, and our gid or (set-group-ID parent) the parent's, just as it would the caller.
    /// Gives a node just made by the daemon to `caller` (group from a set-group-ID parent).
    /// A chown clears set-user-ID and set-group-ID on anything but a directory (for root too),
    /// while ext4 leaves a new node the bits its creator asked for, so `perm` (the node's
    /// permission bits as made) is put back when it has them.
    fn chown_new(
        &self,
        dir: &Inode,
        fd: BorrowedFd<'_>,
        caller: Caller,
        perm: u32,
    ) -> FsResult<()> {
        if !self.is_root || (caller.uid == self.uid && caller.gid == self.gid) {
            return Ok(());
        }
        let pst = rustix::fs::statat(&dir.fd, "", AtFlags::EMPTY_PATH).map_err(en)?;
        let gid = if pst.st_mode & libc::S_ISGID != 0 {
            pst.st_gid
        } else {
            caller.gid
        };
        rustix::fs::chownat(
            fd,
            "",
            Some(rustix::fs::Uid::from_raw(caller.uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(en)?;
        if perm & (libc::S_ISUID | libc::S_ISGID) != 0 {
            // `fd` may be an O_PATH descriptor: change the mode through its /proc link.
            let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
            rustix::fs::chmod(path.as_str(), Mode::from_raw_mode(perm)).map_err(en)?;
        }
        Ok(())
    }

    fn check_writable(&self) -> FsResult<()> {
        if self.opts.read_only {
            return Err(libc::EROFS);
        }
        Ok(())
    }

    /// Creates and opens a regular file.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        caller: Caller,
    ) -> FsResult<(Attr, u64)> {
        self.check_writable()?;
        let dir = self.inode(parent)?;
        let bn = self.backing_name(&dir, name)?;
        self.write_long_side(&dir, &bn)?;
        let perm = mode & !umask & 0o7777;
        // Create it exclusively, so that we know whether it is new: an existing file (CREATE
        // without O_EXCL for a name the kernel took to be free) keeps its owner and mode.
        let of = OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        let (file, created) = match rustix::fs::openat(
            &dir.fd,
            bn.name(),
            of | OFlags::CREATE | OFlags::EXCL | OFlags::NOATIME,
            Mode::from_raw_mode(perm),
        ) {
            Ok(f) => (f, true),
            Err(rustix::io::Errno::EXIST) if flags & libc::O_EXCL == 0 => {
                (open_noatime(&dir.fd, bn.name(), of)?, false)
            }
            Err(e) => return Err(en(e)),
        };
        let done = (|| {
            if created {
                // The kernel has already dropped a set-group-ID the caller may not have.
                self.chown_new(&dir, file.as_fd(), caller, perm)?;
            }
            // The inode is the one `file` opened, not whatever the name holds by now: another
            // rename may have put a different file there meanwhile, whose content state would
            // then be built on this file's descriptor.
            let attr = self.remember(self.path_fd(file.as_fd())?)?;
            match self.open_inode(attr.ino, Some(file), flags) {
                Ok(fh) => Ok((attr, fh)),
                Err(e) => {
                    // The kernel never hears of this lookup.
                    self.forget(attr.ino, 1);
                    Err(e)
                }
            }
        })();
        let (attr, fh) = match done {
            Ok(x) => x,
            Err(e) => {
                if created {
                    self.undo_create(&dir, &bn, AtFlags::empty());
                }
                return Err(e);
            }
        };
        if flags & libc::O_TRUNC != 0 && attr.size > 0 {
            // An existing file was emptied: its times changed too.
            return Ok((self.getattr(attr.ino)?, fh));
        }
        Ok((attr, fh))
    }

    /// The content state of the regular file `inode`: the one its handles and running requests
    /// share, or a new one (on `already`, a read-write descriptor of it, if given) when nobody
    /// holds it. There is never more than one per inode: each keeps its own lock, size and
    /// cipher, so two would undo each other's truncates and seal blocks under a header the
    /// other has replaced.
    fn content_with(
        &self,
        inode: &Inode,
        already: Option<OwnedFd>,
    ) -> FsResult<Arc<RwLock<Content>>> {
        let mut slot = inode.content.lock();
        if let Some(c) = slot.upgrade() {
            return Ok(c);
        }
        let fd = match already {
            Some(fd) => fd,
            None => {
                let rw = if self.opts.read_only {
                    OFlags::RDONLY
                } else {
                    OFlags::RDWR
                };
                open_noatime(
                    rustix::fs::CWD,
                    inode.proc_path().as_str(),
                    rw | OFlags::CLOEXEC,
                )?
            }
        };
        let c = Content::open(fd, self.suite, Arc::clone(&self.contents)).map_err(|e| {
            error!(ino = inode.ino, "cannot open file contents: {e}");
            ce(e)
        })?;
        let c = Arc::new(RwLock::new(c));
        *slot = Arc::downgrade(&c);
        Ok(c)
    }

    fn open_inode(&self, ino: u64, already: Option<OwnedFd>, flags: i32) -> FsResult<u64> {
        let inode = self.inode(ino)?;
        if inode.kind != Kind::File {
            return Err(libc::EINVAL);
        }
        let content = self.content_with(&inode, already)?;
        if flags & libc::O_TRUNC != 0 && !self.opts.read_only {
            content.write().truncate(0).map_err(ce)?;
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let write_only = flags & libc::O_ACCMODE == libc::O_WRONLY;
        self.handles.write().insert(
            fh,
            Arc::new(Handle::File {
                inode,
                content,
                write_only,
            }),
        );
        Ok(fh)
    }

    /// What the kernel does when `caller`, without `CAP_FSETID`, writes to or truncates the
    /// regular file `ino`: set-user-ID is cleared, and set-group-ID too where group-execute is
    /// set or the caller is not in the file's group. With `FUSE_HANDLE_KILLPRIV_V2` the kernel
    /// leaves this to the file system and flags the requests it applies to (see
    /// DESIGN-DECISIONS.md). Changes nothing if neither bit is set.
    ///
    /// Besides truncates (`FATTR_KILL_SUIDGID`), `O_TRUNC` opens and writes (their kill
    /// flags), a SETATTR without a field asks for it: a write, fallocate or copy by such a
    /// caller first has the kernel drop the bits through `file_remove_privs`, which with
    /// `FUSE_HANDLE_KILLPRIV_V2` strips the kill request from the SETATTR and sends what is
    /// left, nothing. It is applied there, not only at the WRITE that follows, so that the
    /// SETATTR's reply carries the new mode: the kernel caches that reply's attributes and,
    /// asked for the mode alone (`stat -c %a`), would go on answering the old one for the
    /// attribute timeout, as nothing after a write invalidates a cached mode.
    pub fn kill_suid_sgid(&self, ino: u64, caller: Caller) -> FsResult<()> {
        self.kill_privs(&*self.inode(ino)?, caller)
    }

    /// [`VaultFs::kill_suid_sgid`] for the file behind the open handle `fh`.
    pub fn kill_suid_sgid_fh(&self, fh: u64, caller: Caller) -> FsResult<()> {
        self.kill_privs(&self.file_content(fh)?.0, caller)
    }

    fn kill_privs(&self, inode: &Inode, caller: Caller) -> FsResult<()> {
        if inode.kind != Kind::File {
            return Ok(());
        }
        let st = rustix::fs::statat(&inode.fd, "", AtFlags::EMPTY_PATH).map_err(en)?;
        let mode = st.st_mode & 0o7777;
        if mode & (libc::S_ISUID | libc::S_ISGID) == 0 {
            return Ok(());
        }
        let mut kept = mode & !libc::S_ISUID;
        if mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || !caller.in_group(st.st_gid)) {
            kept &= !libc::S_ISGID;
        }
        if kept != mode {
            self.check_writable()?;
            rustix::fs::chmod(inode.proc_path().as_str(), Mode::from_raw_mode(kept)).map_err(en)?;
            // No reply to an OPEN or WRITE carries attributes, and nothing after them makes
            // the kernel drop a mode it caches: tell it.
            self.invalidate_attributes(inode.ino);
        }
        Ok(())
    }

    /// Gives the file system the session's `/dev/fuse` descriptor for notifications.
    pub fn set_notify_fd(&self, fd: OwnedFd) {
        let _ = self.notify.set(fd);
    }

    /// Makes the kernel forget the attributes it caches for `ino` (`FUSE_NOTIFY_INVAL_INODE`
    /// with offset -1: attributes only, no pages, so it takes no lock a request in progress
    /// could hold and may be sent while serving one). Best effort: a failure (unmounting,
    /// an inode the kernel has already forgotten) leaves only the attribute timeout.
    fn invalidate_attributes(&self, ino: u64) {
        let Some(fd) = self.notify.get() else { return };
        // fuse_out_header { len: u32, error: i32 (the notification code), unique: u64 (0) },
        // then fuse_notify_inval_inode_out { ino: u64, off: i64, len: i64 }.
        const FUSE_NOTIFY_INVAL_INODE: i32 = 2;
        let mut msg = [0u8; 40];
        msg[0..4].copy_from_slice(&40u32.to_le_bytes());
        msg[4..8].copy_from_slice(&FUSE_NOTIFY_INVAL_INODE.to_le_bytes());
        msg[16..24].copy_from_slice(&ino.to_le_bytes());
        msg[24..32].copy_from_slice(&(-1i64).to_le_bytes());
        if let Err(e) = rustix::io::write(fd, &msg) {
            tracing::debug!(ino, "attribute invalidation not sent: {e}");
        }
    }

    pub fn open(&self, ino: u64, flags: i32) -> FsResult<u64> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            self.check_writable()?;
        }
        self.open_inode(ino, None, flags)
    }

    fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        self.handles.read().get(&fh).cloned().ok_or(libc::EBADF)
    }

    fn file_content(&self, fh: u64) -> FsResult<(Arc<Inode>, Arc<RwLock<Content>>)> {
        match &*self.handle(fh)? {
            Handle::File { inode, content, .. } => Ok((Arc::clone(inode), Arc::clone(content))),
        }
    }

    /// Reads up to `size` bytes at `off` and hands them to `f` (a reply), from a reused buffer.
    pub fn read<T>(&self, fh: u64, off: u64, size: u32, f: impl FnOnce(&[u8]) -> T) -> FsResult<T> {
        self.reading(fh, off, |c| c.read_with(off, size as usize, f))
    }

    /// Reads up to `out.len()` bytes at `off` straight into `out` (a reply buffer); returns how
    /// many.
    pub fn read_into(&self, fh: u64, off: u64, out: &mut [u8]) -> FsResult<usize> {
        self.reading(fh, off, |c| c.read_into(off, out))
    }

    /// Runs a read of the open file `fh` under its read lock; a failure is logged and mapped.
    fn reading<T>(
        &self,
        fh: u64,
        off: u64,
        read: impl FnOnce(&Content) -> Result<T, ContentError>,
    ) -> FsResult<T> {
        let h = self.handle(fh)?;
        let Handle::File {
            inode,
            content: c,
            write_only,
        } = &*h;
        let c = c.read();
        // Before the read, whose reply (sent from inside `read`) lets the caller go on: a
        // stat right after the read must see the access time it set.
        if !self.opts.noatime && !self.opts.read_only && !write_only {
            c.note_read();
        }
        read(&c).map_err(|e| {
            error!(ino = inode.ino, offset = off, file = %c.backing_path(), "read failed: {e}");
            ce(e)
        })
    }

    pub fn write(&self, fh: u64, off: u64, data: &[u8]) -> FsResult<u32> {
        self.check_writable()?;
        let (inode, content) = self.file_content(fh)?;
        let failed = |c: &Content, e: ContentError| {
            let errno = e.errno();
            if errno == libc::ENOSPC || errno == libc::EDQUOT {
                if let Some(dropped) = no_space_log_due() {
                    warn!(
                        ino = inode.ino,
                        file = %c.backing_path(),
                        dropped,
                        "write failed: {e} (logged at most once a minute; `dropped`: how many \
                         such failures since the last line)"
                    );
                }
            } else {
                error!(ino = inode.ino, offset = off, file = %c.backing_path(), "write failed: {e}");
            }
            errno
        };
        // A large write at a block boundary is sealed before the file's lock is taken, so that
        // the workers handling a stream's requests encrypt at the same time; the lock then only
        // covers checking the seal and the pwrite.
        let plan = crate::content::may_seal_ahead(off, data.len())
            .then(|| content.read().seal_plan(off, data.len()))
            .flatten();
        if let Some(plan) = plan {
            let committed = crate::content::with_scratch(plan.disk_len(), |disk| {
                plan.seal(data, disk)?;
                content.write().commit_sealed(&plan, disk)
            });
            match committed {
                Ok(true) => return Ok(data.len() as u32),
                Ok(false) => {} // the file changed meanwhile: write it the ordinary way
                Err(e) => return Err(failed(&content.read(), e)),
            }
        }
        let mut c = content.write();
        c.write(off, data)
            .map(|n| n as u32)
            .map_err(|e| failed(&c, e))
    }

    pub fn release(&self, fh: u64) {
        // The file's content state goes with the last of its holders (handles, and requests
        // still running), not with the last handle: see `VaultFs::content_with`.
        let h = self.handles.write().remove(&fh);
        drop(h);
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let (_, c) = self.file_content(fh)?;
        let c = c.read();
        if datasync {
            rustix::fs::fdatasync(c.fd()).map_err(en)
        } else {
            rustix::fs::fsync(c.fd()).map_err(en)
        }
    }

    /// `fallocate`: mode 0 and `KEEP_SIZE` reserve space (0 also extends the file);
    /// `PUNCH_HOLE | KEEP_SIZE` and `ZERO_RANGE` (with or without `KEEP_SIZE`) make the range
    /// read as zeros ([`Content::zero_range`]), `ZERO_RANGE` without `KEEP_SIZE` extending the
    /// file as mode 0 does. Collapsing and inserting ranges would move every later block to
    /// another index, which the format binds into each block's authentication: `EOPNOTSUPP`.
    pub fn fallocate(&self, fh: u64, off: u64, len: u64, mode: i32) -> FsResult<()> {
        self.check_writable()?;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let zero = match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => false,
            libc::FALLOC_FL_PUNCH_HOLE if keep => true,
            libc::FALLOC_FL_ZERO_RANGE => true,
            _ => return Err(libc::EOPNOTSUPP),
        };
        let (_, c) = self.file_content(fh)?;
        let mut c = c.write();
        let end = off.checked_add(len).ok_or(libc::EFBIG)?;
        if end > crate::content::MAX_FILE_SIZE {
            return Err(libc::EFBIG);
        }
        if zero {
            // The part within the file; what lies beyond it reads as zeros anyway.
            c.zero_range(off, len).map_err(ce)?;
        }
        if end > c.size() && !keep {
            c.truncate(end).map_err(ce)?;
        }
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            return Ok(());
        }
        // Reserve the backing blocks too, so later writes in the range do not hit ENOSPC.
        let from = self.layout.block_offset(off / 4096);
        let to = self.layout.backing_size(end);
        if to > from {
            let _ = rustix::fs::fallocate(
                c.fd(),
                rustix::fs::FallocateFlags::KEEP_SIZE,
                from,
                to - from,
            );
        }
        Ok(())
    }

    /// setattr: each present field applied in turn, as the kernel asks.
    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<Option<SystemTime>>,
        mtime: Option<Option<SystemTime>>,
        fh: Option<u64>,
    ) -> FsResult<Attr> {
        self.check_writable()?;
        let inode = self.inode(ino)?;
        if let Some(m) = mode {
            if inode.kind == Kind::Symlink {
                return Err(libc::EOPNOTSUPP);
            }
            rustix::fs::chmod(inode.proc_path().as_str(), Mode::from_raw_mode(m & 0o7777))
                .map_err(en)?;
        }
        // A SETATTR with no field (`chown(f, -1, -1)`, or the kernel clearing set-ID bits) still
        // changes the ctime, as on ext4: a backing chown to -1, -1 does that.
        let no_field = [mode, uid, gid].iter().all(Option::is_none)
            && size.is_none()
            && atime.is_none()
            && mtime.is_none();
        if uid.is_some() || gid.is_some() || no_field {
            rustix::fs::chownat(
                &inode.fd,
                "",
                uid.map(rustix::fs::Uid::from_raw),
                gid.map(rustix::fs::Gid::from_raw),
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(en)?;
        }
        if let Some(sz) = size {
            if inode.kind != Kind::File {
                return Err(libc::EISDIR);
            }
            let c = match fh.and_then(|f| self.file_content(f).ok()) {
                Some((_, c)) => c,
                // Not open through that handle: the file's one content state, made here if
                // nobody holds it, and shared with any open meanwhile.
                None => self.content_with(&inode, None)?,
            };
            c.write().truncate(sz).map_err(ce)?;
        }
        if atime.is_some() || mtime.is_some() {
            let conv = |t: Option<Option<SystemTime>>| -> rustix::fs::Timespec {
                match t {
                    None => rustix::fs::Timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    },
                    Some(None) => rustix::fs::Timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    },
                    Some(Some(t)) => match t.duration_since(SystemTime::UNIX_EPOCH) {
                        Ok(d) => rustix::fs::Timespec {
                            tv_sec: d.as_secs() as i64,
                            tv_nsec: i64::from(d.subsec_nanos()),
                        },
                        Err(e) => {
                            let d = e.duration();
                            let mut s = -(d.as_secs() as i64);
                            let mut n = i64::from(d.subsec_nanos());
                            if n > 0 {
                                s -= 1;
                                n = 1_000_000_000 - n;
                            }
                            rustix::fs::Timespec {
                                tv_sec: s,
                                tv_nsec: n,
                            }
                        }
                    },
                }
            };
            let times = rustix::fs::Timestamps {
                last_access: conv(atime),
                last_modification: conv(mtime),
            };
            // The object itself, through its O_PATH descriptor (for a symlink: the link).
            rustix::fs::utimensat(
                &inode.fd,
                "",
                &times,
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(en)?;
        }
        self.stat_inode(&inode)
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        self.check_writable()?;
        let dir = self.inode(parent)?;
        let bn = self.backing_name(&dir, name)?;
        // Build the directory under a temporary name with its IV in place, then move it in, so a
        // crash never leaves a directory without an IV.
        let tmp = format!("{RESERVED_PREFIX}tmp.{}", random_hex());
        rustix::fs::mkdirat(&dir.fd, tmp.as_str(), Mode::from_raw_mode(0o700)).map_err(en)?;
        let result = (|| {
            let nd = open_dir(&dir.fd, tmp.as_str())?;
            let mut iv = [0u8; DIRIV_LEN];
            getrandom::getrandom(&mut iv).map_err(|_| libc::EIO)?;
            let f = rustix::fs::openat(
                &nd,
                DIRIV_FILE,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o400),
            )
            .map_err(en)?;
            rustix::io::write(&f, &iv).map_err(en)?;
            // The IV is durable before the directory can appear under its name (the rename
            // below commits after this in the journal); the mkdir itself, like on ext4, becomes
            // durable with the next fsync of the parent.
            rustix::fs::fsync(&f).map_err(en)?;
            let mut perm = mode & !umask & 0o7777;
            let pst = rustix::fs::statat(&dir.fd, "", AtFlags::EMPTY_PATH).map_err(en)?;
            if pst.st_mode & libc::S_ISGID != 0 {
                perm |= libc::S_ISGID;
            }
            rustix::fs::fchmod(&nd, Mode::from_raw_mode(perm)).map_err(en)?;
            // A chown leaves a directory's bits alone.
            self.chown_new(&dir, nd.as_fd(), caller, 0)?;
            self.write_long_side(&dir, &bn)?;
            rustix::fs::renameat_with(
                &dir.fd,
                tmp.as_str(),
                &dir.fd,
                bn.name(),
                RenameFlags::NOREPLACE,
            )
            .map_err(en)?;
            Ok(nd)
        })();
        let nd = match result {
            Ok(nd) => nd,
            Err(e) => {
                let _ = rustix::fs::unlinkat(
                    &dir.fd,
                    format!("{tmp}/{DIRIV_FILE}").as_str(),
                    AtFlags::empty(),
                );
                let _ = rustix::fs::unlinkat(&dir.fd, tmp.as_str(), AtFlags::REMOVEDIR);
                return Err(e);
            }
        };
        // The directory made here, whatever its name holds by now.
        self.path_fd(nd.as_fd())
            .and_then(|fd| self.remember(fd))
            .inspect_err(|_| {
                // Out of sight again first (the IV goes before the directory), then removed.
                if rustix::fs::renameat(&dir.fd, bn.name(), &dir.fd, tmp.as_str()).is_ok() {
                    let _ = rustix::fs::unlinkat(
                        &dir.fd,
                        format!("{tmp}/{DIRIV_FILE}").as_str(),
                        AtFlags::empty(),
                    );
                    self.undo_create(&dir, &BackingName::Short(tmp.clone()), AtFlags::REMOVEDIR);
                }
                self.remove_long_side(&dir, &bn);
            })
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        self.check_writable()?;
        let kind = Kind::from_mode(mode);
        if kind == Kind::File {
            let (a, fh) = self.create(parent, name, mode, umask, libc::O_EXCL, caller)?;
            self.release(fh);
            return Ok(a);
        }
        let dir = self.inode(parent)?;
        let bn = self.backing_name(&dir, name)?;
        self.write_long_side(&dir, &bn)?;
        let ft = rustix::fs::FileType::from_raw_mode(mode);
        rustix::fs::mknodat(
            &dir.fd,
            bn.name(),
            ft,
            Mode::from_raw_mode(mode & !umask & 0o7777),
            u64::from(rdev),
        )
        .map_err(en)?;
        let made = (|| {
            let fd = self.open_child(&dir, bn.name())?;
            self.chown_new(&dir, fd.as_fd(), caller, mode & !umask & 0o7777)?;
            self.remember(fd)
        })();
        made.inspect_err(|_| self.undo_create(&dir, &bn, AtFlags::empty()))
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
        caller: Caller,
    ) -> FsResult<Attr> {
        self.check_writable()?;
        let dir = self.inode(parent)?;
        let bn = self.backing_name(&dir, name)?;
        let sealed = aead_seal(&self.aux, SYMLINK_AAD, target.as_bytes()).map_err(|_| libc::EIO)?;
        let enc = base64::Engine::encode(&b64url(), sealed);
        if enc.len() >= 4096 {
            return Err(libc::ENAMETOOLONG);
        }
        self.write_long_side(&dir, &bn)?;
        rustix::fs::symlinkat(enc.as_str(), &dir.fd, bn.name()).map_err(en)?;
        let made = (|| {
            let fd = self.open_child(&dir, bn.name())?;
            self.chown_new(&dir, fd.as_fd(), caller, 0)?;
            self.remember(fd)
        })();
        made.inspect_err(|_| self.undo_create(&dir, &bn, AtFlags::empty()))
    }

    fn read_symlink_fd(&self, fd: BorrowedFd<'_>) -> FsResult<Vec<u8>> {
        let raw = rustix::fs::readlinkat(fd, "", Vec::new()).map_err(en)?;
        let sealed = base64::Engine::decode(&b64url(), raw.as_bytes()).map_err(|_| libc::EIO)?;
        aead_open(&self.aux, SYMLINK_AAD, &sealed, |p| p.to_vec()).map_err(|_| libc::EIO)
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let inode = self.inode(ino)?;
        self.read_symlink_fd(inode.fd.as_fd()).inspect_err(|_| {
            error!(ino, "symlink target failed authentication or decoding");
        })
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<Attr> {
        self.check_writable()?;
        let inode = self.inode(ino)?;
        let dir = self.inode(newparent)?;
        let bn = self.backing_name(&dir, newname)?;
        self.write_long_side(&dir, &bn)?;
        rustix::fs::linkat(&inode.fd, "", &dir.fd, bn.name(), AtFlags::EMPTY_PATH).map_err(en)?;
        inode.nlookup.fetch_add(1, Ordering::Relaxed);
        self.stat_inode(&inode)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.check_writable()?;
        let dir = self.inode(parent)?;
        let bn = self.backing_name(&dir, name)?;
        // unlinkat refuses a directory with EISDIR itself, as unlink(2) does on ext4.
        rustix::fs::unlinkat(&dir.fd, bn.name(), AtFlags::empty()).map_err(en)?;
        self.remove_long_side(&dir, &bn);
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.check_writable()?;
        let dir = self.inode(parent)?;
        let bn = self.backing_name(&dir, name)?;
        let child = rustix::fs::openat(
            &dir.fd,
            bn.name(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(en)?;
        for e in rustix::fs::Dir::read_from(&child).map_err(en)? {
            let e = e.map_err(en)?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." && n != DIRIV_FILE.as_bytes() {
                return Err(libc::ENOTEMPTY);
            }
        }
        // Move it aside first, so a crash never leaves a visible directory without its IV.
        let tmp = format!("{RESERVED_PREFIX}tmp.{}", random_hex());
        rustix::fs::renameat(&dir.fd, bn.name(), &dir.fd, tmp.as_str()).map_err(en)?;
        let _ = rustix::fs::unlinkat(&child, DIRIV_FILE, AtFlags::empty());
        if let Err(e) = rustix::fs::unlinkat(&dir.fd, tmp.as_str(), AtFlags::REMOVEDIR) {
            // Something appeared meanwhile: put it back as it was.
            warn!("rmdir raced with a create: {e}");
            let _ = rustix::fs::renameat(&dir.fd, tmp.as_str(), &dir.fd, bn.name());
            return Err(en(e));
        }
        self.remove_long_side(&dir, &bn);
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        self.check_writable()?;
        let from_dir = self.inode(parent)?;
        let to_dir = self.inode(newparent)?;
        let from = self.backing_name(&from_dir, name)?;
        let to = self.backing_name(&to_dir, newname)?;
        let rf = RenameFlags::from_bits(flags).ok_or(libc::EINVAL)?;
        self.write_long_side(&to_dir, &to)?;
        let backing_rename =
            || rustix::fs::renameat_with(&from_dir.fd, from.name(), &to_dir.fd, to.name(), rf);
        match backing_rename() {
            // A directory that is empty to the user still holds its IV file, so the backing
            // rename refuses to replace it. Remove it (rmdir refuses a really non-empty one),
            // then retry, as gocryptfs does; the replacement is not atomic.
            Err(rustix::io::Errno::NOTEMPTY | rustix::io::Errno::EXIST) if rf.is_empty() => {
                self.rmdir(newparent, newname)?;
                self.write_long_side(&to_dir, &to)?;
                backing_rename().map_err(en)?;
            }
            r => r.map_err(en)?,
        }
        if !rf.contains(RenameFlags::EXCHANGE) {
            self.remove_long_side(&from_dir, &from);
        }
        Ok(())
    }

    fn read_long_side(&self, d: &OwnedFd, n: &str) -> Option<String> {
        let f = rustix::fs::openat(
            d,
            names::long_side_file(n).as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let mut buf = vec![0u8; 4096];
        let len = rustix::io::read(&f, &mut buf[..]).ok()?;
        buf.truncate(len);
        let full = String::from_utf8(buf).ok()?;
        if names::long_name_matches(n, &full) {
            Some(full)
        } else {
            warn!("long-name side file of {n} does not match its entry");
            None
        }
    }

    /// Walks directory `ino` from position `offset` (0 for the start, or a cookie handed out
    /// with an earlier entry), handing `f` the directory, the entry (`None` for "." and ".."),
    /// its name and the cookie of the position after it, until `f` returns true (the reply is
    /// full). Stateless: vaultfs answers OPENDIR with ENOSYS, so the kernel sends no
    /// OPENDIR/RELEASEDIR round trips and every call opens the backing directory, seeks to the
    /// cookie and reads on. The cookies are the backing file system's, as stable as ext4's.
    /// Reserved names are skipped, as are entries that fail to decrypt (with a warning).
    fn walk_dir<F: FnMut(&Inode, Option<&DirEntryOut>, &OsStr, u64) -> bool>(
        &self,
        ino: u64,
        offset: u64,
        mut f: F,
    ) -> FsResult<()> {
        let dir = self.inode(ino)?;
        if dir.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        let iv = self.diriv(&dir)?;
        // With `-o noatime` or `-o ro` a listing leaves the directory's access time alone (on a
        // read-only mount nothing may change on disk).
        let listing = if self.opts.noatime || self.opts.read_only {
            open_noatime(&dir.fd, ".", OFlags::DIRECTORY | OFlags::CLOEXEC)?
        } else {
            open_dir(&dir.fd, ".")?
        };
        let mut it = rustix::fs::Dir::new(listing).map_err(en)?;
        if offset != 0 {
            it.seek(i64::try_from(offset).map_err(|_| libc::EINVAL)?)
                .map_err(en)?;
        }
        while let Some(e) = it.read() {
            let e = e.map_err(en)?;
            let next = e.offset() as u64;
            let raw: &CStr = e.file_name();
            let Ok(n) = raw.to_str() else { continue };
            if n == "." || n == ".." {
                if f(&dir, None, OsStr::new(n), next) {
                    break;
                }
                continue;
            }
            let encoded = if names::is_long_entry(n) {
                match self.read_long_side(&dir.fd, n) {
                    Some(full) => full,
                    None => continue,
                }
            } else if n.starts_with(RESERVED_PREFIX) {
                continue;
            } else {
                n.to_string()
            };
            match self.names.decrypt(&iv, &encoded) {
                Ok(plain) => {
                    let out = DirEntryOut {
                        ino: self.node_id(e.ino()),
                        kind: kind_of_dirent(e.file_type()),
                        name: OsString::from_vec(plain),
                        backing: n.to_string(),
                    };
                    if f(&dir, Some(&out), &out.name, next) {
                        break;
                    }
                }
                Err(err) => warn!(dir = dir.ino, "skipping undecryptable entry {n:?}: {err}"),
            }
        }
        Ok(())
    }

    /// READDIR: `add(node, kind, name, next offset)` returns true when the reply is full.
    pub fn readdir<F: FnMut(u64, Kind, &OsStr, u64) -> bool>(
        &self,
        ino: u64,
        offset: u64,
        mut add: F,
    ) -> FsResult<()> {
        self.walk_dir(ino, offset, |dir, e, name, next| match e {
            Some(e) => add(e.ino, e.kind, name, next),
            None => add(dir.ino, Kind::Dir, name, next),
        })
    }

    /// READDIRPLUS: entries with their attributes, so that the kernel needs no LOOKUP for
    /// them. `add(name, next offset, attr)` returns true when the reply is full (the entry was
    /// not added). Every entry added counts as a lookup, which the kernel later forgets; "."
    /// and ".." do not, as the kernel neither links nor forgets them. An entry that vanished
    /// since the listing is left out.
    pub fn readdirplus<F: FnMut(&OsStr, u64, &Attr) -> bool>(
        &self,
        ino: u64,
        offset: u64,
        mut add: F,
    ) -> FsResult<()> {
        let mut subdirs = Vec::new();
        let mut in_walk = false;
        let walked = self.walk_dir(ino, offset, |dir, e, name, next| {
            in_walk = dir.read_ahead_queued.load(Ordering::Relaxed);
            let Some(e) = e else {
                return add(name, next, &Attr::dot(dir.ino));
            };
            // A known inode takes one stat; a new one an O_PATH open and an fstat.
            let known = self.inodes.read().contains_key(&e.ino);
            let attr = if known {
                self.lookup_backing(dir, &e.backing)
            } else {
                self.open_child(dir, &e.backing)
                    .and_then(|fd| self.remember(fd))
            };
            let Ok(attr) = attr else {
                return false;
            };
            if add(name, next, &attr) {
                self.forget(attr.ino, 1);
                return true;
            }
            if !known && attr.kind == Kind::Dir {
                if let Some(sub) = self.inodes.read().get(&attr.ino) {
                    subdirs.push(Arc::clone(sub));
                }
            }
            false
        });
        self.queue_read_ahead(in_walk, subdirs);
        walked
    }

    /// Queues read-ahead of `subdirs`, just listed (see `statahead`): a walk lists them next.
    /// `in_walk`: the listed directory was itself queued by its parent's listing, so a walk is
    /// going on and the directories found in them are read ahead too; a listing out of the
    /// blue (`ls` of one directory) reads one level only.
    fn queue_read_ahead(&self, in_walk: bool, mut subdirs: Vec<Arc<Inode>>) {
        if !self.read_ahead_on || subdirs.is_empty() {
            return;
        }
        subdirs.truncate(READ_AHEAD_LISTED);
        let queue = self.statahead.queue();
        let jobs = subdirs
            .into_iter()
            .map(|d| {
                d.read_ahead_queued.store(true, Ordering::Relaxed);
                let queue = in_walk.then(|| queue.clone());
                Box::new(move || read_ahead_listed(&d, queue.as_ref())) as Job
            })
            .collect();
        self.statahead.push(jobs);
    }

    pub fn fsyncdir(&self, ino: u64) -> FsResult<()> {
        let inode = self.inode(ino)?;
        self.fsync_dir(&inode)
    }

    pub fn statfs(&self) -> FsResult<rustix::fs::StatVfs> {
        let root = self.inode(ROOT_INO)?;
        rustix::fs::fstatvfs(open_dir(&root.fd, ".")?).map_err(en)
    }

    // ---- extended attributes: only the user namespace, names and values encrypted ----
    //
    // Any other namespace (security.*, system.posix_acl_*, trusted.*) is refused with EOPNOTSUPP
    // for get, set and remove alike, as ext4 refuses a namespace it does not support. Tools cache
    // that per device: `ls -l` asks for `security.selinux` and `system.posix_acl_access` once per
    // mount instead of once per entry, which was 90 % of the requests of a cold `ls -lR`.

    fn xattr_backing_name(&self, name: &OsStr) -> FsResult<String> {
        let n = name.as_bytes();
        let Some(rest) = n.strip_prefix(b"user.") else {
            return Err(libc::EOPNOTSUPP);
        };
        let enc = self.names.encrypt_xattr(rest).map_err(|_| libc::EINVAL)?;
        let full = format!("{XATTR_PREFIX}{enc}");
        if full.len() > 255 {
            return Err(libc::ERANGE);
        }
        Ok(full)
    }

    fn xattr_target(&self, inode: &Inode) -> FsResult<String> {
        match inode.kind {
            Kind::File | Kind::Dir => Ok(inode.proc_path()),
            _ => Err(libc::EPERM),
        }
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        self.check_writable()?;
        let inode = self.inode(ino)?;
        let bname = self.xattr_backing_name(name)?;
        let target = self.xattr_target(&inode)?;
        let sealed = aead_seal(&self.aux, bname.as_bytes(), value).map_err(|_| libc::EIO)?;
        let xf = rustix::fs::XattrFlags::from_bits(flags as u32).ok_or(libc::EINVAL)?;
        rustix::fs::setxattr(target.as_str(), bname.as_str(), &sealed, xf).map_err(en)
    }

    /// Returns the value (the adapter handles the size-probe protocol).
    pub fn getxattr(&self, ino: u64, name: &OsStr) -> FsResult<Vec<u8>> {
        let inode = self.inode(ino)?;
        let bname = self.xattr_backing_name(name)?;
        let target = match self.xattr_target(&inode) {
            Ok(t) => t,
            Err(_) => return Err(libc::ENODATA),
        };
        let mut buf = vec![0u8; 65536 + 64];
        let n = rustix::fs::getxattr(target.as_str(), bname.as_str(), &mut buf[..]).map_err(en)?;
        aead_open(&self.aux, bname.as_bytes(), &buf[..n], |p| p.to_vec()).map_err(|_| {
            error!(ino, "xattr value failed authentication");
            libc::EIO
        })
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let inode = self.inode(ino)?;
        let Ok(target) = self.xattr_target(&inode) else {
            return Ok(Vec::new());
        };
        let mut buf = vec![0u8; 65536];
        let n = rustix::fs::listxattr(target.as_str(), &mut buf[..]).map_err(en)?;
        let mut out = Vec::new();
        for raw in buf[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
            let Ok(s) = std::str::from_utf8(raw) else {
                continue;
            };
            let Some(enc) = s.strip_prefix(XATTR_PREFIX) else {
                continue;
            };
            if let Ok(plain) = self.names.decrypt_xattr(enc) {
                out.extend_from_slice(b"user.");
                out.extend_from_slice(&plain);
                out.push(0);
            }
        }
        Ok(out)
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        self.check_writable()?;
        let inode = self.inode(ino)?;
        let bname = self.xattr_backing_name(name)?;
        let target = self.xattr_target(&inode)?;
        rustix::fs::removexattr(target.as_str(), bname.as_str()).map_err(en)
    }
}

fn kind_of_dirent(t: rustix::fs::FileType) -> Kind {
    use rustix::fs::FileType as T;
    match t {
        T::Directory => Kind::Dir,
        T::Symlink => Kind::Symlink,
        T::Fifo => Kind::Fifo,
        T::Socket => Kind::Socket,
        T::CharacterDevice => Kind::CharDev,
        T::BlockDevice => Kind::BlockDev,
        _ => Kind::File,
    }
}

/// Whether a write that failed for want of space should be logged now: the first one, then at
/// most one a minute, with how many were not (`Some(dropped)`). A full disk under the writeback
/// cache fails every request of every writer, and the log must not fill what little is left.
fn no_space_log_due() -> Option<u64> {
    static LAST: AtomicU64 = AtomicU64::new(0);
    static DROPPED: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if (last == 0 || now >= last + 60)
        && LAST
            .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        return Some(DROPPED.swap(0, Ordering::Relaxed));
    }
    DROPPED.fetch_add(1, Ordering::Relaxed);
    None
}

/// Why a directory's IV file could not be read, and the errno if a system call failed.
type DirivError = (String, Option<rustix::io::Errno>);

/// Reads the IV file of the backing directory `dir` (no logging: the caller decides). Only a
/// regular file counts: a symlink is not followed, and a FIFO or device does not block.
/// The error names what is wrong, with the errno of a failed system call.
fn read_diriv(dir: BorrowedFd<'_>) -> Result<[u8; DIRIV_LEN], DirivError> {
    let unreadable = |e: rustix::io::Errno| (format!("unreadable: {e}"), Some(e));
    let f = rustix::fs::openat(
        dir,
        DIRIV_FILE,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(unreadable)?;
    let bad = |what: &str| (what.to_string(), None);
    let st = rustix::fs::fstat(&f).map_err(unreadable)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(bad("not a regular file"));
    }
    let mut iv = [0u8; DIRIV_LEN];
    let n = rustix::io::pread(&f, &mut iv[..], 0).map_err(unreadable)?;
    if n != DIRIV_LEN {
        return Err(bad("truncated"));
    }
    Ok(iv)
}

/// Reads a directory's IV file into its cache.
fn load_diriv(dir: &Inode) -> Result<[u8; DIRIV_LEN], DirivError> {
    let iv = read_diriv(dir.fd.as_fd())?;
    let _ = dir.diriv.set(iv);
    Ok(iv)
}

/// Entries of one directory whose inodes read-ahead stats at most.
const READ_AHEAD_ENTRIES: usize = 4096;

/// Subdirectories of one read-ahead directory read ahead in turn, at most.
const READ_AHEAD_SUBDIRS: usize = 64;

/// Subdirectories of one listing (one READDIRPLUS reply) read ahead, at most.
const READ_AHEAD_LISTED: usize = 256;

/// File systems whose `O_NOATIME` and caches read-ahead relies on (`statfs` magic numbers):
/// ext4 (and ext2/3), XFS, btrfs, F2FS, tmpfs. On others (NFS, FUSE, ...) it is off: a server
/// may keep atime itself, and the reads may cost more than they save.
const LOCAL_FS_MAGIC: [i64; 5] = [0xEF53, 0x5846_5342, 0x9123_683E, 0xF2F5_2010, 0x0102_1994];

/// Read-ahead job for `d`, a subdirectory found by a listing: read it ahead (its IV into its
/// cache), then, when `deeper`, queue the directories found in it. Skipped when the kernel
/// has forgotten `d` meanwhile (this job holds the last reference).
fn read_ahead_listed(d: &Arc<Inode>, deeper: Option<&Queue>) {
    if Arc::strong_count(d) == 1 {
        return;
    }
    let mut found = Vec::new();
    read_ahead(d.fd.as_fd(), Some(&d.diriv), deeper.map(|_| &mut found));
    let Some(queue) = deeper else {
        return;
    };
    queue.push(
        found
            .into_iter()
            .map(|name| {
                let d = Arc::clone(d);
                Box::new(move || {
                    if let Ok(fd) = rustix::fs::openat(
                        &d.fd,
                        name.as_c_str(),
                        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    ) {
                        read_ahead(fd.as_fd(), None, None);
                    }
                }) as Job
            })
            .collect(),
    );
}

/// Directory read-ahead job (see `statahead`) for backing directory `dir`: its IV (into
/// `iv_cache` when the directory has an inode, else just into the page cache), its blocks, and
/// its entries' inodes into the backing file system's caches; the names of its subdirectories
/// into `subdirs`. Errors end it quietly: the request that needs the same data reports them.
/// Nothing it does is visible through the mount: no atime changes (the IV file is not shown).
fn read_ahead(
    dir: BorrowedFd<'_>,
    iv_cache: Option<&OnceLock<[u8; DIRIV_LEN]>>,
    mut subdirs: Option<&mut Vec<std::ffi::CString>>,
) {
    if iv_cache.and_then(|c| c.get()).is_none() {
        match read_diriv(dir) {
            Ok(iv) => {
                if let Some(c) = iv_cache {
                    let _ = c.set(iv);
                }
            }
            Err(_) => return,
        }
    }
    // O_NOATIME: reading ahead must not change the directory's atime, which the mount shows
    // (without the right to it, only the IV is read ahead).
    let Ok(fd) = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOATIME | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    let Ok(mut it) = rustix::fs::Dir::new(fd) else {
        return;
    };
    let mut n = 0;
    while let Some(Ok(e)) = it.read() {
        let name = e.file_name();
        if name.to_bytes().first() == Some(&b'.') {
            continue; // "." and "..": no encrypted or reserved name starts with a dot
        }
        let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW);
        if let (Some(found), Ok(st)) = (subdirs.as_mut(), st) {
            // From the stat, not the entry's type, which some file systems leave unknown.
            if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
                && found.len() < READ_AHEAD_SUBDIRS
            {
                found.push(name.to_owned());
            }
        }
        n += 1;
        if n == READ_AHEAD_ENTRIES {
            break;
        }
    }
}

/// Opens `name` under `at` with `O_NOATIME`: the daemon's own reads of a backing file
/// (headers, the old contents of partly written blocks) must not change the access time the
/// user sees; reads through the mount set it themselves ([`Content::note_read`]). Without the
/// right to (not the owner, no `CAP_FOWNER`), opened without it.
fn open_noatime(at: impl AsFd, name: &str, flags: OFlags) -> FsResult<OwnedFd> {
    match rustix::fs::openat(&at, name, flags | OFlags::NOATIME, Mode::empty()) {
        Err(rustix::io::Errno::PERM) => {
            rustix::fs::openat(&at, name, flags, Mode::empty()).map_err(en)
        }
        r => r.map_err(en),
    }
}

/// Opens the directory `name` under `at` for reading (listing, fsync, statvfs).
fn open_dir(at: impl AsFd, name: &str) -> FsResult<OwnedFd> {
    rustix::fs::openat(
        at,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(en)
}

fn random_hex() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_ahead_fills_the_iv_cache_and_finds_subdirectories() {
        let d = tempfile::tempdir().unwrap();
        let iv = [7u8; DIRIV_LEN];
        std::fs::write(d.path().join(DIRIV_FILE), iv).unwrap();
        for sub in ["AAAA", "BBBB"] {
            std::fs::create_dir(d.path().join(sub)).unwrap();
        }
        std::fs::write(d.path().join("CCCC"), b"file").unwrap();
        let fd = rustix::fs::open(
            d.path(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        let cache = OnceLock::new();
        let mut subdirs = Vec::new();
        read_ahead(fd.as_fd(), Some(&cache), Some(&mut subdirs));
        assert_eq!(cache.get(), Some(&iv));
        subdirs.sort();
        assert_eq!(subdirs, [c"AAAA".to_owned(), c"BBBB".to_owned()]);

        // Reading ahead leaves the directory's atime alone (ext4's relatime would update an
        // atime not later than the mtime).
        let past = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 1_000_000,
                tv_nsec: 0,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 2_000_000,
                tv_nsec: 0,
            },
        };
        let atime_after = |read: &dyn Fn()| {
            rustix::fs::utimensat(rustix::fs::CWD, d.path(), &past, AtFlags::empty()).unwrap();
            read();
            rustix::fs::stat(d.path()).unwrap().st_atime
        };
        // Control: an ordinary listing does move it here (else this file system keeps no
        // atime, and the check below would prove nothing).
        let listed = atime_after(&|| {
            let mut it = rustix::fs::Dir::new(open_dir(&fd, ".").unwrap()).unwrap();
            while it.read().is_some() {}
        });
        assert_ne!(
            listed, 1_000_000,
            "the test directory's file system keeps no atime"
        );
        assert_eq!(
            atime_after(&|| read_ahead(fd.as_fd(), None, None)),
            1_000_000
        );

        // A directory without its IV file is left alone: nothing cached, nothing found.
        std::fs::remove_file(d.path().join(DIRIV_FILE)).unwrap();
        let cache = OnceLock::new();
        let mut subdirs = Vec::new();
        read_ahead(fd.as_fd(), Some(&cache), Some(&mut subdirs));
        assert!(cache.get().is_none());
        assert!(subdirs.is_empty());
    }
}
