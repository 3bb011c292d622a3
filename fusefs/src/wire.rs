//! The FUSE wire format, for the requests that reach vaultfs over io_uring (see `uring`).
//!
//! fuser decodes what arrives on `/dev/fuse`, but its decoder and reply encoder are private to it,
//! so the ring path has its own: [`Dispatcher::serve`] takes a request already split the way the
//! ring delivers it (header, the operation's fixed struct, the variable part), calls [`VaultFs`],
//! and encodes the reply body (everything after `fuse_out_header`). Layouts and numbers are those
//! of `include/uapi/linux/fuse.h`; x86-64 and arm64 are little-endian, and so is every field here.
//!
//! The answers are the same as the fuser adapter's (`adapter.rs`): same TTLs, same negative
//! entries, same `ENOSYS` for the operations vaultfs leaves to the kernel.

use crate::fs::{Attr, Caller, Errno, Kind, VaultFs};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Opcodes (fuse.h `enum fuse_opcode`).
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const IOCTL: u32 = 39;
}

/// `FATTR_*` bits of `fuse_setattr_in.valid`.
mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const LOCKOWNER: u32 = 1 << 9;
    /// A truncate by a caller without `CAP_FSETID` (`FUSE_HANDLE_KILLPRIV_V2`).
    pub const KILL_SUIDGID: u32 = 1 << 11;
}

/// `FUSE_WRITE_KILL_SUIDGID` in `fuse_write_in.write_flags`, `FUSE_OPEN_KILL_SUIDGID` in
/// `fuse_open_in.open_flags`: the caller lacks `CAP_FSETID`, so the write or the `O_TRUNC`
/// clears set-user-ID and set-group-ID (`FUSE_HANDLE_KILLPRIV_V2`).
const WRITE_KILL_SUIDGID: u32 = 1 << 2;
const OPEN_KILL_SUIDGID: u32 = 1 << 0;

/// `sizeof(struct fuse_in_header)`.
pub const IN_HEADER_LEN: usize = 40;
/// `sizeof(struct fuse_entry_out)`.
const ENTRY_OUT_LEN: usize = 128;
/// `sizeof(struct fuse_dirent)` without the name.
const DIRENT_LEN: usize = 24;
/// The longest reply of an operation whose input is in the payload buffer (CREATE: entry and
/// open replies). Those replies are built aside and copied in once the input has been used.
pub const SMALL_REPLY_MAX: usize = ENTRY_OUT_LEN + 16;

/// The part of `fuse_in_header` vaultfs uses.
#[derive(Clone, Copy, Debug)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> Option<InHeader> {
        let mut r = Reader(b.get(..IN_HEADER_LEN)?);
        Some(InHeader {
            len: r.u32()?,
            opcode: r.u32()?,
            unique: r.u64()?,
            nodeid: r.u64()?,
            uid: r.u32()?,
            gid: r.u32()?,
            pid: r.u32()?,
        })
    }
}

/// Whether the reply to `opcode` may be large (it is then written straight into the payload
/// buffer, so the request's own variable part, at most a name, must be copied aside first).
pub fn large_reply(opcode: u32) -> bool {
    matches!(
        opcode,
        op::READ | op::READDIR | op::READDIRPLUS | op::READLINK | op::GETXATTR | op::LISTXATTR
    )
}

/// Little-endian field reader over a byte slice; `None` when the slice is too short.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    /// A NUL-terminated name (the NUL is consumed, not returned).
    fn name(&mut self) -> Option<&'a OsStr> {
        let end = self.0.iter().position(|&c| c == 0)?;
        let s = self.take(end)?;
        self.skip(1)?;
        Some(OsStr::from_bytes(s))
    }
}

/// Little-endian writer into a reply buffer; running past its end is an error (`ERANGE`).
struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl<'a> Writer<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, at: 0 }
    }
    fn bytes(&mut self, b: &[u8]) -> Result<(), Errno> {
        let dst = self
            .buf
            .get_mut(self.at..self.at + b.len())
            .ok_or(libc::ERANGE)?;
        dst.copy_from_slice(b);
        self.at += b.len();
        Ok(())
    }
    fn u32(&mut self, v: u32) -> Result<(), Errno> {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> Result<(), Errno> {
        self.bytes(&v.to_le_bytes())
    }
    fn zeros(&mut self, n: usize) -> Result<(), Errno> {
        let dst = self.buf.get_mut(self.at..self.at + n).ok_or(libc::ERANGE)?;
        dst.fill(0);
        self.at += n;
        Ok(())
    }
}

/// (seconds, nanoseconds) of a time, as the kernel counts them: nanoseconds always positive.
fn split_time(t: SystemTime) -> (u64, u32) {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => (d.as_secs(), d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (s, n) = (d.as_secs() as i64, d.subsec_nanos());
            if n == 0 {
                ((-s) as u64, 0)
            } else {
                ((-s - 1) as u64, 1_000_000_000 - n)
            }
        }
    }
}

/// The kernel's (seconds, nanoseconds), seconds possibly negative, as a time.
fn join_time(secs: u64, nsecs: u32) -> SystemTime {
    let s = secs as i64;
    let n = Duration::from_nanos(u64::from(nsecs.min(999_999_999)));
    if s >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s as u64) + n
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(s.unsigned_abs()) + n
    }
}

fn type_bits(k: Kind) -> u32 {
    match k {
        Kind::Dir => libc::S_IFDIR,
        Kind::File => libc::S_IFREG,
        Kind::Symlink => libc::S_IFLNK,
        Kind::Fifo => libc::S_IFIFO,
        Kind::Socket => libc::S_IFSOCK,
        Kind::CharDev => libc::S_IFCHR,
        Kind::BlockDev => libc::S_IFBLK,
    }
}

/// `struct fuse_attr` (88 bytes).
fn put_attr(w: &mut Writer, a: &Attr) -> Result<(), Errno> {
    let (at, atn) = split_time(a.atime);
    let (mt, mtn) = split_time(a.mtime);
    let (ct, ctn) = split_time(a.ctime);
    w.u64(a.ino)?;
    w.u64(a.size)?;
    w.u64(a.blocks)?;
    w.u64(at)?;
    w.u64(mt)?;
    w.u64(ct)?;
    w.u32(atn)?;
    w.u32(mtn)?;
    w.u32(ctn)?;
    w.u32(type_bits(a.kind) | u32::from(a.perm))?;
    w.u32(a.nlink)?;
    w.u32(a.uid)?;
    w.u32(a.gid)?;
    w.u32(a.rdev)?;
    w.u32(4096)?; // blksize
    w.u32(0) // flags
}

/// `struct fuse_entry_out` (128 bytes); `attr` None gives a negative entry (node id 0).
fn put_entry(w: &mut Writer, a: Option<&Attr>, ttl: Duration) -> Result<(), Errno> {
    w.u64(a.map_or(0, |a| a.ino))?;
    w.u64(0)?; // generation
    w.u64(ttl.as_secs())?; // entry_valid
    w.u64(ttl.as_secs())?; // attr_valid
    w.u32(ttl.subsec_nanos())?;
    w.u32(ttl.subsec_nanos())?;
    match a {
        Some(a) => put_attr(w, a),
        None => w.zeros(88),
    }
}

/// `struct fuse_dirent` header and name, padded to 8 bytes. False (nothing written) when it
/// does not fit.
fn put_dirent(
    w: &mut Writer,
    ino: u64,
    next: u64,
    kind: Kind,
    name: &OsStr,
) -> Result<bool, Errno> {
    let name = name.as_bytes();
    let len = (DIRENT_LEN + name.len()).next_multiple_of(8);
    if w.at + len > w.buf.len() {
        return Ok(false);
    }
    w.u64(ino)?;
    w.u64(next)?;
    w.u32(name.len() as u32)?;
    w.u32(type_bits(kind) >> 12)?;
    w.bytes(name)?;
    w.zeros(len - DIRENT_LEN - name.len())?;
    Ok(true)
}

/// What the ring path needs besides the file system: the same settings as the fuser adapter.
pub struct Dispatcher {
    pub fs: Arc<VaultFs>,
    pub xattrs: bool,
    pub ttl: Duration,
    /// Runs at the first LOOKUP, GETATTR or OPEN (shared with the adapter).
    pub first_request: Arc<dyn Fn() + Send + Sync>,
}

fn bad() -> Errno {
    libc::EINVAL
}

impl Dispatcher {
    /// Serves one request: `arg` is the operation's fixed struct (`in_args[0]`), `rest` the
    /// variable part (names, data). The reply body goes into `out`; returns its length, or the
    /// error to send (a positive errno). FORGET and INTERRUPT never come this way.
    pub fn serve(
        &self,
        h: &InHeader,
        arg: &[u8],
        rest: &[u8],
        out: &mut [u8],
    ) -> Result<usize, Errno> {
        let fs = &*self.fs;
        let ino = h.nodeid;
        let caller = Caller {
            uid: h.uid,
            gid: h.gid,
            pid: h.pid,
        };
        let mut a = Reader(arg);
        let mut r = Reader(rest);
        let mut w = Writer::new(out);
        let ttl = self.ttl;
        match h.opcode {
            op::LOOKUP => {
                (self.first_request)();
                let name = r.name().ok_or_else(bad)?;
                match fs.lookup(ino, name) {
                    Ok(at) => put_entry(&mut w, Some(&at), ttl)?,
                    // Negative entry with a timeout, as in the adapter.
                    Err(libc::ENOENT) => put_entry(&mut w, None, ttl)?,
                    Err(e) => return Err(e),
                }
            }
            op::GETATTR => {
                (self.first_request)();
                let at = fs.getattr(ino)?;
                attr_out(&mut w, &at, ttl)?;
            }
            op::SETATTR => {
                let valid = a.u32().ok_or_else(bad)?;
                a.skip(4).ok_or_else(bad)?;
                let fh = a.u64().ok_or_else(bad)?;
                let size = a.u64().ok_or_else(bad)?;
                a.skip(8).ok_or_else(bad)?; // lock_owner
                let atime = a.u64().ok_or_else(bad)?;
                let mtime = a.u64().ok_or_else(bad)?;
                a.skip(8).ok_or_else(bad)?; // ctime
                let atimensec = a.u32().ok_or_else(bad)?;
                let mtimensec = a.u32().ok_or_else(bad)?;
                a.skip(4).ok_or_else(bad)?; // ctimensec
                let mode = a.u32().ok_or_else(bad)?;
                a.skip(4).ok_or_else(bad)?;
                let uid = a.u32().ok_or_else(bad)?;
                let gid = a.u32().ok_or_else(bad)?;
                let has = |bit| valid & bit != 0;
                let time = |set, now, s, n| has(set).then(|| (!has(now)).then(|| join_time(s, n)));
                if (has(fattr::KILL_SUIDGID) && has(fattr::SIZE))
                    || valid & !(fattr::FH | fattr::LOCKOWNER) == 0
                {
                    // The second: see `VaultFs::kill_suid_sgid` (a SETATTR without a field).
                    fs.kill_suid_sgid(ino, caller)?;
                }
                let at = fs.setattr(
                    ino,
                    has(fattr::MODE).then_some(mode),
                    has(fattr::UID).then_some(uid),
                    has(fattr::GID).then_some(gid),
                    has(fattr::SIZE).then_some(size),
                    time(fattr::ATIME, fattr::ATIME_NOW, atime, atimensec),
                    time(fattr::MTIME, fattr::MTIME_NOW, mtime, mtimensec),
                    has(fattr::FH).then_some(fh),
                )?;
                attr_out(&mut w, &at, ttl)?;
            }
            op::READLINK => {
                let t = fs.readlink(ino)?;
                w.bytes(&t)?;
            }
            op::SYMLINK => {
                let name = r.name().ok_or_else(bad)?;
                let target = r.name().ok_or_else(bad)?;
                let at = fs.symlink(ino, name, target, caller)?;
                put_entry(&mut w, Some(&at), ttl)?;
            }
            op::MKNOD => {
                let mode = a.u32().ok_or_else(bad)?;
                let rdev = a.u32().ok_or_else(bad)?;
                let umask = a.u32().ok_or_else(bad)?;
                let name = r.name().ok_or_else(bad)?;
                let at = fs.mknod(ino, name, mode, umask, rdev, caller)?;
                put_entry(&mut w, Some(&at), ttl)?;
            }
            op::MKDIR => {
                let mode = a.u32().ok_or_else(bad)?;
                let umask = a.u32().ok_or_else(bad)?;
                let name = r.name().ok_or_else(bad)?;
                let at = fs.mkdir(ino, name, mode, umask, caller)?;
                put_entry(&mut w, Some(&at), ttl)?;
            }
            op::UNLINK => fs.unlink(ino, r.name().ok_or_else(bad)?)?,
            op::RMDIR => fs.rmdir(ino, r.name().ok_or_else(bad)?)?,
            op::RENAME | op::RENAME2 => {
                let newdir = a.u64().ok_or_else(bad)?;
                let flags = if h.opcode == op::RENAME2 {
                    a.u32().ok_or_else(bad)?
                } else {
                    0
                };
                let name = r.name().ok_or_else(bad)?;
                let newname = r.name().ok_or_else(bad)?;
                fs.rename(ino, name, newdir, newname, flags)?;
            }
            op::LINK => {
                let old = a.u64().ok_or_else(bad)?;
                let name = r.name().ok_or_else(bad)?;
                let at = fs.link(old, ino, name)?;
                put_entry(&mut w, Some(&at), ttl)?;
            }
            op::OPEN => {
                (self.first_request)();
                let flags = a.u32().ok_or_else(bad)?;
                let open_flags = a.u32().ok_or_else(bad)?;
                let fh = fs.open(ino, flags as i32)?;
                if open_flags & OPEN_KILL_SUIDGID != 0 && flags as i32 & libc::O_TRUNC != 0 {
                    if let Err(e) = fs.kill_suid_sgid(ino, caller) {
                        fs.release(fh);
                        return Err(e);
                    }
                }
                open_out(&mut w, fh)?;
            }
            op::READ => {
                let (fh, off, size) = read_in(&mut a)?;
                // Decrypted straight into the reply.
                let out = w.buf.get_mut(..size as usize).ok_or_else(bad)?;
                return fs.read_into(fh, off, out);
            }
            op::WRITE => {
                let (fh, off, size) = read_in(&mut a)?;
                let write_flags = a.u32().ok_or_else(bad)?;
                let data = r.take(size as usize).ok_or_else(bad)?;
                if write_flags & WRITE_KILL_SUIDGID != 0 {
                    fs.kill_suid_sgid_fh(fh, caller)?;
                }
                let n = fs.write(fh, off, data)?;
                w.u32(n)?;
                w.u32(0)?;
            }
            op::STATFS => {
                let s = fs.statfs()?;
                for v in [s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree] {
                    w.u64(v)?;
                }
                w.u32(s.f_bsize as u32)?;
                w.u32(vaultfs_core::names::MAX_NAME as u32)?;
                w.u32(s.f_frsize as u32)?;
                w.zeros(4 + 6 * 4)?;
            }
            op::RELEASE => fs.release(a.u64().ok_or_else(bad)?),
            op::FSYNC => {
                let fh = a.u64().ok_or_else(bad)?;
                let flags = a.u32().ok_or_else(bad)?;
                fs.fsync(fh, flags & 1 != 0)?;
            }
            op::FSYNCDIR => fs.fsyncdir(ino)?,
            op::SETXATTR => {
                if !self.xattrs {
                    return Err(libc::ENOSYS);
                }
                let size = a.u32().ok_or_else(bad)?;
                let flags = a.u32().ok_or_else(bad)?;
                let name = r.name().ok_or_else(bad)?;
                let value = r.take(size as usize).ok_or_else(bad)?;
                fs.setxattr(ino, name, value, flags as i32)?;
            }
            op::GETXATTR | op::LISTXATTR => {
                if !self.xattrs {
                    return Err(libc::ENOSYS);
                }
                let size = a.u32().ok_or_else(bad)?;
                let v = if h.opcode == op::GETXATTR {
                    fs.getxattr(ino, r.name().ok_or_else(bad)?)?
                } else {
                    fs.listxattr(ino)?
                };
                match xattr_answer(&v, size)? {
                    XattrAnswer::Size(n) => {
                        w.u32(n)?; // fuse_getxattr_out
                        w.u32(0)?;
                    }
                    XattrAnswer::Value(v) => w.bytes(v)?,
                }
            }
            op::REMOVEXATTR => {
                if !self.xattrs {
                    return Err(libc::ENOSYS);
                }
                fs.removexattr(ino, r.name().ok_or_else(bad)?)?;
            }
            op::READDIR => {
                let (_, off, size) = read_in(&mut a)?;
                let mut w = Writer::new(w.buf.get_mut(..size as usize).ok_or_else(bad)?);
                let mut failed = Ok(());
                fs.readdir(ino, off, |ino, kind, name, next| {
                    match put_dirent(&mut w, ino, next, kind, name) {
                        Ok(added) => !added,
                        Err(e) => {
                            failed = Err(e);
                            true
                        }
                    }
                })?;
                failed?;
                return Ok(w.at);
            }
            op::READDIRPLUS => {
                let (_, off, size) = read_in(&mut a)?;
                let mut w = Writer::new(w.buf.get_mut(..size as usize).ok_or_else(bad)?);
                fs.readdirplus(ino, off, |name, next, at| {
                    let len = ENTRY_OUT_LEN + (DIRENT_LEN + name.len()).next_multiple_of(8);
                    if w.at + len > w.buf.len() {
                        return true;
                    }
                    // Room was checked, so neither write can fail.
                    put_entry(&mut w, Some(at), ttl).is_err()
                        || put_dirent(&mut w, at.ino, next, at.kind, name) != Ok(true)
                })?;
                return Ok(w.at);
            }
            op::CREATE => {
                let flags = a.u32().ok_or_else(bad)?;
                let mode = a.u32().ok_or_else(bad)?;
                let umask = a.u32().ok_or_else(bad)?;
                let name = r.name().ok_or_else(bad)?;
                // FUSE_OPEN_KILL_SUIDGID in its open_flags is not applied: CREATE is sent for a
                // file the kernel takes to be new, and a new file keeps the set-user-ID bit its
                // creator asked for (on ext4 too, O_TRUNC does not truncate a file the same open
                // created).
                let (at, fh) = fs.create(ino, name, mode, umask, flags as i32, caller)?;
                put_entry(&mut w, Some(&at), ttl)?;
                open_out(&mut w, fh)?;
            }
            op::FALLOCATE => {
                let fh = a.u64().ok_or_else(bad)?;
                let off = a.u64().ok_or_else(bad)?;
                let len = a.u64().ok_or_else(bad)?;
                let mode = a.u32().ok_or_else(bad)?;
                fs.fallocate(fh, off, len, mode as i32)?;
            }
            // Sent once at unmount; the process ends when /dev/fuse reports the unmount.
            op::DESTROY | op::RELEASEDIR => {}
            // What ext4 answers for an ioctl it does not know (see adapter.rs).
            op::IOCTL => return Err(libc::ENOTTY),
            // FLUSH, OPENDIR, ACCESS: ENOSYS stops the kernel from sending them (see the
            // adapter). Everything else (locks, poll, lseek, copy_file_range, tmpfile...) is
            // left to the kernel or unsupported, as the adapter answers over /dev/fuse.
            _ => return Err(libc::ENOSYS),
        }
        Ok(w.at)
    }
}

/// The answer to GETXATTR or LISTXATTR with a buffer of `size` bytes: the value's size when
/// asked with 0, `ERANGE` when the buffer is too small, else the value.
pub enum XattrAnswer<'a> {
    Size(u32),
    Value(&'a [u8]),
}

pub fn xattr_answer(v: &[u8], size: u32) -> Result<XattrAnswer<'_>, Errno> {
    if size == 0 {
        Ok(XattrAnswer::Size(v.len() as u32))
    } else if (size as usize) < v.len() {
        Err(libc::ERANGE)
    } else {
        Ok(XattrAnswer::Value(v))
    }
}

fn read_in(a: &mut Reader) -> Result<(u64, u64, u32), Errno> {
    let fh = a.u64().ok_or_else(bad)?;
    let off = a.u64().ok_or_else(bad)?;
    let size = a.u32().ok_or_else(bad)?;
    Ok((fh, off, size))
}

/// `struct fuse_attr_out`.
fn attr_out(w: &mut Writer, a: &Attr, ttl: Duration) -> Result<(), Errno> {
    w.u64(ttl.as_secs())?;
    w.u32(ttl.subsec_nanos())?;
    w.u32(0)?;
    put_attr(w, a)
}

/// `struct fuse_open_out`: no FOPEN flags, as in the adapter.
fn open_out(w: &mut Writer, fh: u64) -> Result<(), Errno> {
    w.u64(fh)?;
    w.u32(0)?;
    w.u32(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_across_the_epoch() {
        for (s, n) in [
            (0u64, 0u32),
            (5, 7),
            ((-1i64) as u64, 999_999_999),
            ((-3i64) as u64, 0),
        ] {
            assert_eq!(split_time(join_time(s, n)), (s, n));
        }
        let before = SystemTime::UNIX_EPOCH - Duration::from_nanos(1);
        assert_eq!(split_time(before), ((-1i64) as u64, 999_999_999));
    }

    #[test]
    fn dirents_are_padded_and_refused_when_full() {
        let mut buf = [0xffu8; 40];
        let mut w = Writer::new(&mut buf);
        assert_eq!(
            put_dirent(&mut w, 7, 1, Kind::File, OsStr::new("abc")),
            Ok(true)
        );
        assert_eq!(w.at, 32);
        assert_eq!(&buf[16..20], &3u32.to_le_bytes());
        assert_eq!(&buf[20..24], &(libc::S_IFREG >> 12).to_le_bytes());
        assert_eq!(&buf[24..32], b"abc\0\0\0\0\0");
        let mut w = Writer::new(&mut buf[..31]);
        assert_eq!(
            put_dirent(&mut w, 7, 1, Kind::File, OsStr::new("abc")),
            Ok(false)
        );
        assert_eq!(w.at, 0);
    }

    /// A dispatcher over a fresh vault in a temporary directory.
    fn dispatcher() -> (tempfile::TempDir, Dispatcher) {
        use vaultfs_core::protector::Secret;
        use vaultfs_core::vault::{NewProtector, Vault};
        let d = tempfile::tempdir().unwrap();
        let secret = Secret::RawKey(vaultfs_core::SecretKey::from_slice(&[7; 32]).unwrap());
        let np = NewProtector {
            secret: &secret,
            label: None,
            argon2: (8, 1, 1),
            sealed: None,
        };
        let v = Vault::create(d.path(), "t", vaultfs_core::CipherSuite::Aes256Gcm, &np).unwrap();
        let fs = VaultFs::new(
            d.path(),
            v.keys().unwrap(),
            crate::fs::Options {
                read_only: false,
                noatime: false,
            },
        )
        .unwrap();
        let disp = Dispatcher {
            fs: Arc::new(fs),
            xattrs: true,
            ttl: Duration::from_secs(10),
            first_request: Arc::new(|| {}),
        };
        (d, disp)
    }

    fn header(opcode: u32, nodeid: u64) -> InHeader {
        InHeader {
            len: 0,
            opcode,
            unique: 2,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 0,
        }
    }

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn le64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// Requests built by hand, as the kernel lays them out: create, write, read back, look up,
    /// list, and the answers to missing names and malformed frames.
    #[test]
    fn requests_round_trip_through_the_dispatcher() {
        let (_d, disp) = dispatcher();
        let root = crate::fs::ROOT_INO;
        let mut out = vec![0u8; 1 << 20];
        // CREATE "f" (fuse_create_in: flags, mode, umask, open_flags).
        let mut arg = Vec::new();
        for v in [libc::O_RDWR as u32, libc::S_IFREG | 0o640, 0o022, 0] {
            arg.extend_from_slice(&v.to_le_bytes());
        }
        let n = disp
            .serve(&header(op::CREATE, root), &arg, b"f\0", &mut out)
            .unwrap();
        assert_eq!(n, ENTRY_OUT_LEN + 16);
        let ino = le64(&out, 0);
        assert_ne!(ino, 0);
        assert_eq!(le64(&out, 16), 10, "entry_valid");
        assert_eq!(
            le32(&out, 40 + 60),
            libc::S_IFREG | 0o640,
            "mode after umask"
        );
        let fh = le64(&out, ENTRY_OUT_LEN);
        // WRITE 10000 bytes at 0 (fuse_write_in: fh, offset, size, write_flags, lock_owner,
        // flags, padding).
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut arg = Vec::new();
        arg.extend_from_slice(&fh.to_le_bytes());
        arg.extend_from_slice(&0u64.to_le_bytes());
        arg.extend_from_slice(&(data.len() as u32).to_le_bytes());
        arg.extend_from_slice(&[0u8; 20]);
        let n = disp
            .serve(&header(op::WRITE, ino), &arg, &data, &mut out)
            .unwrap();
        assert_eq!((n, le32(&out, 0)), (8, 10_000));
        // READ 4096 at 8192: the last 1808 bytes.
        let mut arg = Vec::new();
        arg.extend_from_slice(&fh.to_le_bytes());
        arg.extend_from_slice(&8192u64.to_le_bytes());
        arg.extend_from_slice(&4096u32.to_le_bytes());
        arg.extend_from_slice(&[0u8; 20]);
        let n = disp
            .serve(&header(op::READ, ino), &arg, &[], &mut out)
            .unwrap();
        assert_eq!(&out[..n], &data[8192..]);
        // LOOKUP "f" finds it with its size; "g" is a negative entry (node id 0).
        let n = disp
            .serve(&header(op::LOOKUP, root), &[], b"f\0", &mut out)
            .unwrap();
        assert_eq!(
            (n, le64(&out, 0), le64(&out, 40 + 8)),
            (ENTRY_OUT_LEN, ino, 10_000)
        );
        disp.serve(&header(op::LOOKUP, root), &[], b"g\0", &mut out)
            .unwrap();
        assert_eq!(le64(&out, 0), 0);
        // READDIR from 0 lists ".", ".." and "f", padded to 8 bytes each.
        let mut arg = vec![0u8; 16];
        arg.extend_from_slice(&4096u32.to_le_bytes());
        arg.extend_from_slice(&[0u8; 20]);
        let n = disp
            .serve(&header(op::READDIR, root), &arg, &[], &mut out)
            .unwrap();
        let mut names = Vec::new();
        let mut at = 0;
        while at < n {
            let len = le32(&out, at + 16) as usize;
            names.push(out[at + 24..at + 24 + len].to_vec());
            at += (24 + len).next_multiple_of(8);
        }
        assert_eq!(at, n);
        names.sort();
        assert_eq!(names, [b".".to_vec(), b"..".to_vec(), b"f".to_vec()]);
        // GETXATTR with size 0 asks for the size; a too-small buffer is ERANGE.
        let mut arg = Vec::new();
        arg.extend_from_slice(&3u32.to_le_bytes());
        arg.extend_from_slice(&0u32.to_le_bytes());
        disp.serve(&header(op::SETXATTR, ino), &arg, b"user.k\0abc", &mut out)
            .unwrap();
        let size_in = |size: u32| [size.to_le_bytes(), [0; 4]].concat();
        let n = disp.serve(
            &header(op::GETXATTR, ino),
            &size_in(0),
            b"user.k\0",
            &mut out,
        );
        assert_eq!((n, le32(&out, 0)), (Ok(8), 3));
        let n = disp.serve(
            &header(op::GETXATTR, ino),
            &size_in(2),
            b"user.k\0",
            &mut out,
        );
        assert_eq!(n, Err(libc::ERANGE));
        let n = disp.serve(
            &header(op::GETXATTR, ino),
            &size_in(64),
            b"user.k\0",
            &mut out,
        );
        assert_eq!(&out[..n.unwrap()], b"abc");
        // Malformed frames: a name without its NUL, a short op struct, an unknown opcode.
        assert_eq!(
            disp.serve(&header(op::LOOKUP, root), &[], b"f", &mut out),
            Err(libc::EINVAL)
        );
        assert_eq!(
            disp.serve(&header(op::READ, ino), &[0; 12], &[], &mut out),
            Err(libc::EINVAL)
        );
        assert_eq!(
            disp.serve(&header(9999, root), &[], &[], &mut out),
            Err(libc::ENOSYS)
        );
        // A reply that does not fit its buffer is an error, not a short reply.
        let mut tiny = [0u8; 16];
        let n = disp.serve(&header(op::GETATTR, ino), &[0; 16], &[], &mut tiny);
        assert_eq!(n, Err(libc::ERANGE));
    }

    #[test]
    fn truncated_requests_are_rejected() {
        let mut r = Reader(b"ab");
        assert!(r.name().is_none());
        let mut r = Reader(&[1, 2, 3]);
        assert!(r.u32().is_none());
        assert!(InHeader::parse(&[0u8; 39]).is_none());
    }
}
