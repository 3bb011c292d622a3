//! `vaultfs [--key-file F | --passphrase-file F] [-f] [-o OPTS] CIPHERDIR MOUNTPOINT`
//!
//! Unlocks the vault, mounts it and (without `-f`) returns once the mount is ready, leaving a
//! daemon serving it. SIGTERM, SIGINT or SIGHUP unmount cleanly.

use clap::Parser;
use rustix::fd::AsFd;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::{error, info, warn};
use vaultfs::adapter::Adapter;
use vaultfs::fs::{Options, VaultFs};
use vaultfs::sys::{self, Forked};
use vaultfs::uring;
use vaultfs_core::cli::{self, exit, CliError};
use vaultfs_core::vault::Vault;

#[derive(Parser)]
#[command(
    name = "vaultfs",
    version,
    about = "Mount a vaultfs encrypted directory"
)]
struct Args {
    /// A 32-byte raw key file.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// A file holding the passphrase ("-" reads stdin).
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// Stay in the foreground.
    #[arg(short = 'f', long)]
    foreground: bool,
    /// Mount options, comma separated (allow_other, allow_root, default_permissions, ro, rw,
    /// nosuid, nodev, noexec, suid, dev, exec, atime, noatime, sync, async, dirsync, fsname=,
    /// nowriteback, noxattr, nouring).
    #[arg(short = 'o', value_name = "OPTS")]
    options: Vec<String>,
    /// Append log lines to this file (the daemon has no terminal).
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Worker threads serving requests (default: twice the CPUs, at least 4; over io_uring
    /// 4 per CPU queue, or N spread over the queues, at least one each).
    #[arg(long)]
    threads: Option<usize>,
    /// With -f: write one byte to this inherited descriptor once the mount is ready.
    #[arg(long, value_name = "FD")]
    ready_fd: Option<i32>,
    /// Fetch the key from the vault broker at this socket instead of a key file.
    #[arg(long, value_name = "SOCKET")]
    broker: Option<PathBuf>,
    /// The vault's name at the broker (with --broker).
    #[arg(long, value_name = "NAME")]
    vault: Option<String>,
    /// Debug logging.
    #[arg(short = 'd', long)]
    debug: bool,
    cipherdir: PathBuf,
    mountpoint: PathBuf,
}

struct MountOpts {
    config: fuser::Config,
    read_only: bool,
    noatime: bool,
    writeback: bool,
    xattrs: bool,
    uring: bool,
}

fn parse_options(list: &[String], cipherdir: &Path) -> Result<MountOpts, CliError> {
    use fuser::MountOption as M;
    let mut config = fuser::Config::default();
    let mut read_only = false;
    let mut noatime = false;
    let mut writeback = true;
    let mut xattrs = true;
    let mut uring = true;
    let mut default_permissions = false;
    let mut fsname = None;
    for opt in list
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        match opt {
            "allow_other" => {
                config.acl = fuser::SessionACL::All;
                // Like gocryptfs: other users get the kernel's permission checks.
                default_permissions = true;
            }
            "allow_root" => config.acl = fuser::SessionACL::RootAndOwner,
            "default_permissions" => default_permissions = true,
            "ro" => read_only = true,
            "rw" => read_only = false,
            "nosuid" => config.mount_options.push(M::NoSuid),
            "suid" => config.mount_options.push(M::Suid),
            "nodev" => config.mount_options.push(M::NoDev),
            "dev" => config.mount_options.push(M::Dev),
            "noexec" => config.mount_options.push(M::NoExec),
            "exec" => config.mount_options.push(M::Exec),
            "atime" => {
                noatime = false;
                config.mount_options.push(M::Atime)
            }
            "noatime" => {
                noatime = true;
                config.mount_options.push(M::NoAtime)
            }
            "sync" => config.mount_options.push(M::Sync),
            "async" => config.mount_options.push(M::Async),
            "dirsync" => config.mount_options.push(M::DirSync),
            "nowriteback" => writeback = false,
            "noxattr" => xattrs = false,
            "nouring" => uring = false,
            o if o.starts_with("fsname=") => fsname = Some(o["fsname=".len()..].to_string()),
            o => {
                return Err(CliError::new(
                    exit::USAGE,
                    format!("unknown mount option {o:?}"),
                ))
            }
        }
    }
    if default_permissions {
        config.mount_options.push(M::DefaultPermissions);
    }
    config
        .mount_options
        .push(if read_only { M::RO } else { M::RW });
    config.mount_options.push(M::FSName(
        fsname.unwrap_or_else(|| cipherdir.display().to_string()),
    ));
    config.mount_options.push(M::Subtype("vaultfs".into()));
    Ok(MountOpts {
        config,
        read_only,
        noatime,
        writeback: writeback && !read_only,
        xattrs,
        uring,
    })
}

/// Everything up to a mounted session; errors carry their exit code.
fn prepare(args: &Args) -> Result<(VaultFs, MountOpts), CliError> {
    if !args.cipherdir.is_dir() {
        return Err(CliError::new(
            exit::CIPHERDIR,
            format!("{}: not a directory", args.cipherdir.display()),
        ));
    }
    if !args.mountpoint.is_dir() {
        return Err(CliError::new(
            exit::MOUNTPOINT,
            format!("{}: not a directory", args.mountpoint.display()),
        ));
    }
    let opts = parse_options(&args.options, &args.cipherdir)?;
    let vault = match (&args.broker, &args.vault) {
        (Some(sock), Some(name)) => {
            if args.key_file.is_some() || args.passphrase_file.is_some() {
                return Err(CliError::new(
                    exit::USAGE,
                    "--broker excludes --key-file and --passphrase-file",
                ));
            }
            key_from_broker(sock, name, &args.cipherdir)?
        }
        (None, None) => {
            let secret = cli::secret_from_args(
                args.key_file.as_deref(),
                args.passphrase_file.as_deref(),
                false,
            )?;
            Vault::unlock(&args.cipherdir, &secret)?
        }
        _ => {
            return Err(CliError::new(
                exit::USAGE,
                "--broker and --vault go together",
            ))
        }
    };
    if !vault.suite().is_authenticated() {
        warn!("vault uses aes-256-xts: contents are confidential but tampering is not detected");
    }
    let keys = vault.keys()?;
    drop(vault); // the master key is not needed while mounted
    let fs = VaultFs::new(
        &args.cipherdir,
        keys,
        Options {
            read_only: opts.read_only,
            noatime: opts.noatime,
        },
    )
    .map_err(|e| {
        CliError::new(
            exit::CIPHERDIR,
            format!("{}: {e}", args.cipherdir.display()),
        )
    })?;
    Ok((fs, opts))
}

/// Fetches the vault's master key from the broker (which hands it only to the process it launched
/// for that vault, or to an allowed peer) and checks it against the metadata file.
fn key_from_broker(sock: &Path, name: &str, cipherdir: &Path) -> Result<Vault, CliError> {
    use vaultfs_core::protocol::{Client, Request, Response};
    let err = |m: String| CliError::new(exit::WRONG_KEY, format!("broker {}: {m}", sock.display()));
    let mut c = Client::connect(sock, std::time::Duration::from_secs(30))
        .map_err(|e| err(e.to_string()))?;
    let resp = c
        .call(&Request::GetVaultKey {
            vault: name.to_string(),
        })
        .map_err(|e| err(e.to_string()))?;
    let vmk = match &resp {
        Response::VaultKey(k) => vaultfs_core::SecretKey::<32>::from_slice(&k.0)
            .ok_or_else(|| err("bad key length".into()))?,
        Response::Error { message, .. } => return Err(err(message.clone())),
        _ => return Err(err("unexpected reply".into())),
    };
    drop(resp);
    let meta = Vault::read_meta(cipherdir)?;
    Ok(Vault::from_master_key(cipherdir, meta, vmk)?)
}

fn harden_process() {
    // No core dumps (they would hold keys), and room for one descriptor per cached inode.
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        warn!("cannot disable core dumps: {e}");
    }
    // Every inode the kernel caches holds one of our descriptors, and without one lookups and
    // creates fail with EMFILE. With CAP_SYS_RESOURCE (root) the hard limit may go up to
    // fs.nr_open; otherwise the soft limit goes up to the hard one.
    let nofile = rustix::process::Resource::Nofile;
    let wanted = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20)
        .min(1 << 20);
    let lim = rustix::process::getrlimit(nofile);
    if let Some(max) = lim.maximum {
        let raised = max < wanted
            && rustix::process::setrlimit(
                nofile,
                rustix::process::Rlimit {
                    current: Some(wanted),
                    maximum: Some(wanted),
                },
            )
            .is_ok();
        if !raised {
            let _ = rustix::process::setrlimit(
                nofile,
                rustix::process::Rlimit {
                    current: Some(max),
                    maximum: Some(max),
                },
            );
        }
    }
    // Created objects get exactly the mode the caller asked for (the caller's umask is applied
    // by the kernel or by us).
    rustix::process::umask(rustix::fs::Mode::empty());
}

fn serve(
    fs: VaultFs,
    opts: MountOpts,
    mountpoint: &Path,
    threads: Option<usize>,
) -> Result<(), CliError> {
    // Key pages never reach swap: lock every page as it is faulted in (ONFAULT keeps the large,
    // mostly untouched request buffers from becoming resident). Done here, in the process that
    // serves, because locks are not inherited across fork.
    let flags = rustix::mm::MlockAllFlags::CURRENT
        | rustix::mm::MlockAllFlags::FUTURE
        | rustix::mm::MlockAllFlags::ONFAULT;
    if let Err(e) = rustix::mm::mlockall(flags) {
        warn!("cannot lock memory (keys could reach swap): {e}");
    }
    let mut config = opts.config;
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rings = if opts.uring && uring::enabled_in_kernel() {
        make_rings(threads)
    } else {
        None
    };
    let threads = threads.unwrap_or((2 * cpus).max(4)).clamp(1, 64);
    // With io_uring, /dev/fuse carries only FORGET and INTERRUPT: one thread is enough.
    config.n_threads = Some(if rings.is_some() { 1 } else { threads });
    config.clone_fd = true;
    let mp_done = mountpoint.to_path_buf();
    let first_request: Arc<dyn Fn() + Send + Sync> = {
        // Resolved now: once mounted, resolving it could mean asking ourselves.
        let mp = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.into());
        let once = std::sync::Once::new();
        Arc::new(move || once.call_once(|| raise_readahead(&mp)))
    };
    let fs = Arc::new(fs);
    let negotiated = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let adapter = Adapter {
        fs: fs.clone(),
        writeback: opts.writeback,
        xattrs: opts.xattrs,
        on_destroy: Some(Box::new(move || {
            info!("{} unmounted; exiting", mp_done.display());
            std::process::exit(exit::OK);
        })),
        first_request: first_request.clone(),
        uring_ready: rings.is_some(),
        uring: negotiated.clone(),
    };
    // Caught from before the mount appears: a SIGTERM sent as soon as it is visible (as
    // service managers and tests do) must unmount, not kill the process with the default
    // action. One that arrives earlier waits in the set and unmounts right after mounting.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| CliError::new(exit::ERROR, format!("signal set-up: {e}")))?;
    let mut session = fuser::Session::new(adapter, mountpoint, &config).map_err(|e| {
        CliError::new(
            exit::MOUNT,
            format!("mounting {}: {e}", mountpoint.display()),
        )
    })?;
    match session.as_fd().try_clone_to_owned() {
        Ok(fd) => fs.set_notify_fd(fd),
        Err(e) => warn!("no descriptor for notifications ({e}): attribute changes the kernel cannot see wait for the attribute timeout"),
    }
    if let Some(rings) = rings.filter(|_| negotiated.load(std::sync::atomic::Ordering::SeqCst)) {
        let dispatcher = Arc::new(vaultfs::wire::Dispatcher {
            fs,
            xattrs: opts.xattrs,
            ttl: vaultfs::adapter::TTL,
            first_request,
        });
        // The kernel now holds every request until the rings are registered: failing here
        // must end the mount, not leave it hanging.
        let started = session
            .as_fd()
            .try_clone_to_owned()
            .and_then(|fd| rings.start(fd, dispatcher));
        if let Err(e) = started {
            return Err(CliError::new(
                exit::MOUNT,
                format!("starting the io_uring queues: {e}"),
            ));
        }
        info!("serving over io_uring");
    }
    let mut unmounter = session.unmount_callable();
    let mp = mountpoint.to_path_buf();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            info!("signal {sig}: unmounting {}", mp.display());
            if let Err(e) = unmounter.unmount() {
                error!("unmount failed: {e}");
            }
        }
    });
    session_ready(session);
    Ok(())
}

/// The io_uring rings: `threads` spread over the kernel's per-CPU queues (at least one each),
/// or by default a read-ahead window's worth per queue; None (and /dev/fuse alone) when they
/// cannot be made.
fn make_rings(threads: Option<usize>) -> Option<uring::Rings> {
    let made = uring::possible_cpus().and_then(|queues| {
        let per_queue = threads.map_or(RING_DEPTH, |n| n.clamp(1, 64).div_ceil(queues).max(1));
        uring::Rings::create(queues, per_queue, vaultfs::adapter::MAX_WRITE as usize)
    });
    match made {
        Ok(r) => Some(r),
        Err(e) => {
            warn!("io_uring unavailable, serving over /dev/fuse: {e}");
            None
        }
    }
}

/// Threads (kernel entries) per io_uring queue by default: a sequential read's read-ahead
/// window arrives at once, all on the reader's CPU's queue, as READAHEAD_KIB / max_write
/// requests; with fewer entries part of it waits. Measured on a cold 1 GiB read, alternating
/// four times: 1236-1575 MB/s with 4 per queue against 743-1095 with 2; random reads, untar
/// and create-delete unchanged within the noise. An entry's 1 MiB buffer is resident only once
/// used.
const RING_DEPTH: usize = (READAHEAD_KIB as usize * 1024) / vaultfs::adapter::MAX_WRITE as usize;

/// Kernel read-ahead for the mount, in KiB. A FUSE mount starts with 128 KiB, which caps read
/// requests at 128 KiB and keeps one or two in flight; 4 MiB lets the kernel send 1 MiB
/// requests (our max_write) several at a time, so sequential reads keep the disk and both
/// crypto threads busy.
const READAHEAD_KIB: u64 = 4096;

/// Raises the read-ahead of the new mount at `mountpoint` (an absolute path without symlinks)
/// (root only; otherwise it stays at the default).
fn raise_readahead(mountpoint: &Path) {
    let Some(dev) = mount_device(mountpoint) else {
        tracing::debug!("mount device of {} not found", mountpoint.display());
        return;
    };
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    let current = std::fs::read_to_string(&path)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    if current.is_some_and(|v| v < READAHEAD_KIB) {
        if let Err(e) = std::fs::write(&path, READAHEAD_KIB.to_string()) {
            tracing::debug!("cannot raise read-ahead ({path}): {e}");
        }
    }
}

/// The "major:minor" of the mount at `mountpoint`, from /proc/self/mountinfo (the last, so
/// the topmost, mount there). Read from the table, not by stat, which this process would have
/// to answer itself.
fn mount_device(mountpoint: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    table.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let dev = f.nth(2)?;
        let mp = f.nth(1)?;
        (unescape_mountinfo(mp) == mountpoint.as_os_str().as_bytes()).then(|| dev.to_string())
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space and so on).
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = |c: &u8| (b'0'..=b'7').contains(c);
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(octal) {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Tells a waiting parent that the mount is up, then serves until unmounted.
fn session_ready<FS: fuser::Filesystem>(session: fuser::Session<FS>) {
    if let Some(mut pipe) = READY.lock().ok().and_then(|mut g| g.take()) {
        let _ = pipe.write_all(&[0]);
    }
    if let Err(e) = session.run() {
        error!("session ended with an error: {e}");
    }
}

static READY: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);

fn report_failure(pipe: Option<std::fs::File>, e: &CliError) {
    match pipe {
        Some(mut p) => {
            let mut msg = vec![e.code as u8];
            msg.extend_from_slice(e.message.as_bytes());
            let _ = p.write_all(&msg);
        }
        None => eprintln!("vaultfs: {}", e.message),
    }
}

fn redirect_stdio(log_file: Option<&Path>) -> std::io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    rustix::stdio::dup2_stdin(null.as_fd())?;
    rustix::stdio::dup2_stdout(null.as_fd())?;
    match log_file {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?;
            rustix::stdio::dup2_stderr(f.as_fd())?;
        }
        None => rustix::stdio::dup2_stderr(null.as_fd())?,
    }
    Ok(())
}

fn main() {
    vaultfs::sys::install_nonce_fork_hook();
    let args = match Args::try_parse() {
        Ok(mut a) => {
            // Absolute paths: the daemon changes its directory to /.
            if let Ok(p) = std::fs::canonicalize(&a.cipherdir) {
                a.cipherdir = p;
            }
            if let Ok(p) = std::fs::canonicalize(&a.mountpoint) {
                a.mountpoint = p;
            }
            if let Some(l) = &a.log_file {
                if let Ok(cwd) = std::env::current_dir() {
                    a.log_file = Some(cwd.join(l));
                }
            }
            a
        }
        Err(e) => cli::exit_on_parse_error(e),
    };
    if args.foreground {
        if let Some(p) = &args.log_file {
            if let Err(e) = redirect_stdio(Some(p)) {
                eprintln!("vaultfs: {}: {e}", p.display());
                std::process::exit(exit::ERROR);
            }
        }
    }
    cli::init_logging(args.debug);
    harden_process();
    // Unlock in the calling process: a wrong key is reported before anything forks or mounts.
    let (fs, opts) = match prepare(&args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("vaultfs: {}", e.message);
            std::process::exit(e.code);
        }
    };
    if args.foreground {
        if let Some(fd) = args.ready_fd {
            match sys::inherited_fd(fd) {
                Some(f) => {
                    if let Ok(mut g) = READY.lock() {
                        *g = Some(f);
                    }
                }
                None => {
                    eprintln!("vaultfs: --ready-fd {fd} is not an open descriptor");
                    std::process::exit(exit::USAGE);
                }
            }
        }
        if let Err(e) = serve(fs, opts, &args.mountpoint, args.threads) {
            eprintln!("vaultfs: {}", e.message);
            std::process::exit(e.code);
        }
        return;
    }
    let (mut rd, wr) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vaultfs: pipe: {e}");
            std::process::exit(exit::ERROR);
        }
    };
    match sys::fork() {
        Err(e) => {
            eprintln!("vaultfs: fork: {e}");
            std::process::exit(exit::ERROR);
        }
        Ok(Forked::Parent) => {
            drop(wr);
            let mut buf = Vec::new();
            let _ = rd.read_to_end(&mut buf);
            match buf.split_first() {
                Some((0, _)) => std::process::exit(exit::OK),
                Some((code, msg)) => {
                    eprintln!("vaultfs: {}", String::from_utf8_lossy(msg));
                    std::process::exit(i32::from(*code));
                }
                None => {
                    eprintln!("vaultfs: the mount process died before the mount was ready");
                    std::process::exit(exit::MOUNT);
                }
            }
        }
        Ok(Forked::Child) => {
            drop(rd);
            let _ = rustix::process::setsid();
            let _ = std::env::set_current_dir("/");
            let wr: std::fs::File = std::os::fd::OwnedFd::from(wr).into();
            if let Err(e) = redirect_stdio(args.log_file.as_deref()) {
                report_failure(
                    Some(wr),
                    &CliError::new(exit::ERROR, format!("log file: {e}")),
                );
                std::process::exit(exit::ERROR);
            }
            if let Ok(mut g) = READY.lock() {
                *g = Some(wr);
            }
            if let Err(e) = serve(fs, opts, &args.mountpoint, args.threads) {
                let pipe = READY.lock().ok().and_then(|mut g| g.take());
                report_failure(pipe, &e);
                std::process::exit(e.code);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::unescape_mountinfo;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), b"/a b");
        assert_eq!(unescape_mountinfo("/x\\134y\\011"), b"/x\\y\t");
        assert_eq!(unescape_mountinfo("/plain"), b"/plain");
        // Not an escape: too short, or not octal.
        assert_eq!(unescape_mountinfo("/t\\04"), b"/t\\04");
        assert_eq!(unescape_mountinfo("/t\\089"), b"/t\\089");
        assert_eq!(unescape_mountinfo("/t\\377"), [b'/', b't', 0xff]);
    }
}
