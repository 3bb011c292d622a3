//! The thin fuser adapter: turns kernel requests into [`VaultFs`] calls and results into replies.

use crate::fs::{Attr, Caller, Kind, VaultFs};
use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, PollEvents, PollFlags,
    PollNotifier, RenameFlags, ReplyAttr, ReplyBmap, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyPoll,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How long the kernel may cache attributes and entries. vaultfs is the only writer of its
/// backing tree while mounted, and every change goes through the kernel, which updates or
/// invalidates what it caches; so the kernel's cache stays right for as long as it keeps it, and
/// the TTL only bounds how long a change made behind vaultfs's back (unsupported) stays unseen.
/// 10 s instead of the usual 1 s spares a LOOKUP before most operations on a name used within
/// the last few seconds (an unlink after a create, a stat in a build).
pub const TTL: Duration = Duration::from_secs(10);
/// Largest request we accept (FUSE max_write).
pub const MAX_WRITE: u32 = 1 << 20;

pub struct Adapter {
    pub fs: Arc<VaultFs>,
    pub writeback: bool,
    /// False with `-o noxattr`: every xattr request is answered `ENOSYS`, which the kernel
    /// remembers for the mount (then `EOPNOTSUPP` to callers, without asking), including the
    /// `security.capability` GETXATTR the kernel still sends once per inode and at each chown.
    pub xattrs: bool,
    /// Runs when the session ends, before fuser drops its mount handle. The binary exits the
    /// process here: fuser 0.18 would otherwise unmount the mount point again by path (taking a
    /// disconnected device for a mounted one), which removes a newer mount at the same place.
    pub on_destroy: Option<Box<dyn FnOnce() + Send + Sync>>,
    /// Called at every LOOKUP, GETATTR and OPEN; does its work once, at the first: after the
    /// kernel has taken our INIT reply, which resets the mount's read-ahead, so that settings
    /// made there last. Shared with the io_uring path.
    pub first_request: Arc<dyn Fn() + Send + Sync>,
    /// Set when io_uring rings are ready to be registered: INIT then asks the kernel for FUSE
    /// over io_uring if it offers it, and records in `uring` whether it did.
    pub uring_ready: bool,
    pub uring: Arc<std::sync::atomic::AtomicBool>,
}

impl Adapter {
    fn first_request(&self) {
        (self.first_request)();
    }

    /// A truncate or an `O_TRUNC` open clears set-user-ID and set-group-ID when the caller
    /// lacks CAP_FSETID. The kernel says so with `FATTR_KILL_SUIDGID` and
    /// `FUSE_OPEN_KILL_SUIDGID`, which fuser does not pass on; here it is taken as: not root.
    fn kill_if_unprivileged(&self, req: &Request, ino: u64) -> Result<(), i32> {
        if req.uid() != 0 {
            self.fs.kill_suid_sgid(ino, caller(req))
        } else {
            Ok(())
        }
    }
}

fn err(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn ftype(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn fattr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: ftype(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// The reply to a LOOKUP of a missing name: node id 0 ("no such entry, for this long").
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn time_arg(t: Option<TimeOrNow>) -> Option<Option<SystemTime>> {
    t.map(|t| match t {
        TimeOrNow::SpecificTime(t) => Some(pre_epoch_fix(t)),
        TimeOrNow::Now => None,
    })
}

/// fuser 0.18 turns a kernel time before 1970, (secs < 0, nsecs), into `EPOCH - (|secs| +
/// nsecs)` instead of `EPOCH - |secs| + nsecs` (its `system_time_from_time`); undo that, so
/// (-1 s, 999999999 ns) stays 1 ns before the epoch.
fn pre_epoch_fix(t: SystemTime) -> SystemTime {
    match SystemTime::UNIX_EPOCH.duration_since(t) {
        Ok(d) if d.subsec_nanos() != 0 => {
            SystemTime::UNIX_EPOCH - Duration::from_secs(d.as_secs())
                + Duration::from_nanos(u64::from(d.subsec_nanos()))
        }
        _ => t,
    }
}

impl fuser::Filesystem for Adapter {
    // What vaultfs leaves to the kernel, answered without fuser's "[Not Implemented]" warning,
    // which a program's every `isatty()` (TCGETS) would otherwise put in the log. ENOSYS makes
    // the kernel stop sending LSEEK, COPY_FILE_RANGE and POLL and do them itself; an ioctl
    // gets what ext4 answers for one it does not know. The io_uring path (wire.rs) answers
    // the same.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: ReplyLseek,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn bmap(&self, _req: &Request, _ino: INodeNo, _blocksize: u32, _idx: u64, reply: ReplyBmap) {
        reply.error(Errno::ENOSYS);
    }

    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        let _ = config.set_max_background(64);
        let mut wanted = InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_DONT_MASK
            // Listing a directory returns every entry's attributes too, so `ls -l`, `find`
            // and `rm -rf` need no LOOKUP per entry (AUTO: when the kernel sees them used).
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            // Symlink targets never change in place: the kernel may cache them.
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_NO_OPENDIR_SUPPORT
            // We clear set-user-ID and set-group-ID on writes and truncates ourselves (the
            // requests say when), so the kernel need not ask for `security.capability` before
            // every write() (it marks an inode S_NOSEC after one check) nor refresh the mode
            // before every chown; see DESIGN-DECISIONS.md.
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        // Not FUSE_POSIX_ACL: it would let the kernel cache "no ACL" answers, but it also turns
        // on default_permissions, and then every create or unlink costs a GETATTR of the
        // directory (its attributes are invalidated by the change and needed for the next
        // permission check), which costs more than the ACL reads it saves.
        if self.writeback {
            wanted |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        // Only with rings in hand: after this answer the kernel holds every request until the
        // rings are registered (see `uring`).
        if self.uring_ready
            && config
                .capabilities()
                .contains(InitFlags::FUSE_OVER_IO_URING)
        {
            wanted |= InitFlags::FUSE_OVER_IO_URING;
            self.uring.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let _ = config.add_capabilities(wanted & config.capabilities());
        Ok(())
    }

    fn destroy(&mut self) {
        if let Some(f) = self.on_destroy.take() {
            f();
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.first_request();
        match self.fs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&TTL, &fattr(&a), Generation(0)),
            // A negative entry (node id 0) with a timeout: the kernel keeps the negative dentry
            // instead of asking again on every stat or open of the missing name (PATH searches,
            // module probing). Creating the name through the mount replaces it at once; vaultfs
            // is the only writer of its backing tree.
            Err(libc::ENOENT) => reply.entry(&TTL, &negative_entry(), Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.first_request();
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &fattr(&a)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if size.is_some() {
            if let Err(e) = self.kill_if_unprivileged(req, ino.0) {
                return reply.error(err(e));
            }
        }
        let no_field = [mode, uid, gid].iter().all(Option::is_none)
            && size.is_none()
            && atime.is_none()
            && mtime.is_none()
            && [_ctime, _crtime, _chgtime, _bkuptime]
                .iter()
                .all(Option::is_none)
            && _flags.is_none();
        if no_field {
            // See `VaultFs::kill_suid_sgid` (a SETATTR without a field).
            if let Err(e) = self.fs.kill_suid_sgid(ino.0, caller(req)) {
                return reply.error(err(e));
            }
        }
        match self.fs.setattr(
            ino.0,
            mode,
            uid,
            gid,
            size,
            time_arg(atime),
            time_arg(mtime),
            fh.map(|f| f.0),
        ) {
            Ok(a) => reply.attr(&TTL, &fattr(&a)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        match self
            .fs
            .mknod(parent.0, name, mode, umask, rdev, caller(req))
        {
            Ok(a) => reply.entry(&TTL, &fattr(&a), Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self.fs.mkdir(parent.0, name, mode, umask, caller(req)) {
            Ok(a) => reply.entry(&TTL, &fattr(&a), Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match self
            .fs
            .symlink(parent.0, link_name, target.as_os_str(), caller(req))
        {
            Ok(a) => reply.entry(&TTL, &fattr(&a), Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self
            .fs
            .rename(parent.0, name, newparent.0, newname, flags.bits())
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.fs.link(ino.0, newparent.0, newname) {
            Ok(a) => reply.entry(&TTL, &fattr(&a), Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.first_request();
        match self.fs.open(ino.0, flags.0) {
            Ok(fh) => {
                let killed = if flags.0 & libc::O_TRUNC != 0 {
                    self.kill_if_unprivileged(req, ino.0)
                } else {
                    Ok(())
                };
                match killed {
                    Ok(()) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                    Err(e) => {
                        self.fs.release(fh);
                        reply.error(err(e))
                    }
                }
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // The reply is sent from inside the read, straight from the reused plaintext buffer.
        let mut reply = Some(reply);
        let sent = self.fs.read(fh.0, offset, size, |d| {
            if let Some(r) = reply.take() {
                r.data(d);
            }
        });
        if let (Err(e), Some(r)) = (sent, reply.take()) {
            r.error(err(e));
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            if let Err(e) = self.fs.kill_suid_sgid_fh(fh.0, caller(req)) {
                return reply.error(err(e));
            }
        }
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do on close: writes reach the backing file when they arrive, and the
        // kernel still reports write-back errors from close() itself. ENOSYS tells the kernel
        // to stop sending FLUSH, saving a round trip per close.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs.fsync(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Listing is stateless (by inode and backing cookie): ENOSYS makes the kernel stop
        // sending OPENDIR and RELEASEDIR, two round trips per directory listed.
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.fs.readdir(ino.0, offset, |ino, kind, name, next| {
            reply.add(INodeNo(ino), next, ftype(kind), name)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let r = self.fs.readdirplus(ino.0, offset, |name, next, a| {
            reply.add(INodeNo(a.ino), next, name, &TTL, &fattr(a), Generation(0))
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs.fsyncdir(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                vaultfs_core::names::MAX_NAME as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if !self.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        match self.fs.setxattr(ino.0, name, value, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !self.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        match self.fs.getxattr(ino.0, name) {
            Ok(v) => xattr_reply(reply, &v, size),
            Err(e) => reply.error(err(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        match self.fs.listxattr(ino.0) {
            Ok(v) => xattr_reply(reply, &v, size),
            Err(e) => reply.error(err(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if !self.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        match self.fs.removexattr(ino.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission checks are the kernel's (default_permissions); ENOSYS means "always
        // allowed" and stops further ACCESS requests.
        reply.error(Errno::ENOSYS);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self
            .fs
            .create(parent.0, name, mode, umask, flags, caller(req))
        {
            Ok((a, fh)) => reply.created(
                &TTL,
                &fattr(&a),
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.fs.fallocate(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }
}

fn xattr_reply(reply: ReplyXattr, v: &[u8], size: u32) {
    match crate::wire::xattr_answer(v, size) {
        Ok(crate::wire::XattrAnswer::Size(n)) => reply.size(n),
        Ok(crate::wire::XattrAnswer::Value(v)) => reply.data(v),
        Err(e) => reply.error(err(e)),
    }
}
