//! Setting up each system fresh, and undoing every mount and loop device again: on success,
//! on error (the `Undo` stack runs in `Drop`) and after Ctrl-C; plus the cleanup of whatever a
//! killed earlier run left under the work directory.

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use zeroize::Zeroize;

use crate::config::System;
use crate::sys;
use crate::util::{self, run};

/// Where the vaultfs binaries are and how big a loop image is.
pub struct Env {
    pub bin_dir: PathBuf,
    pub image_bytes: u64,
}

/// Whether bindfs is linked with libfuse 2, which sends 4 KiB writes unless mounted with
/// `-o big_writes` (libfuse 3 always allows large writes and has no such option).
pub fn bindfs_needs_big_writes() -> bool {
    let Some(bindfs) = util::which("bindfs") else {
        return false;
    };
    util::output(Command::new("ldd").arg(bindfs))
        .map(|out| out.contains("libfuse.so.2"))
        .unwrap_or(false)
}

impl Env {
    fn vaultfs(&self) -> PathBuf {
        self.bin_dir.join("vaultfs")
    }

    fn vaultctl(&self) -> PathBuf {
        self.bin_dir.join("vaultctl")
    }
}

/// Why `system` cannot run on this machine, or `Ok` if it can.
pub fn check_available(system: System, env: &Env) -> std::result::Result<(), String> {
    let need_tool = |name: &str| -> std::result::Result<(), String> {
        util::which(name)
            .map(|_| ())
            .ok_or_else(|| format!("`{name}` not found (see scripts/deps.sh)"))
    };
    let need_fuse = || -> std::result::Result<(), String> {
        if !Path::new("/dev/fuse").exists() {
            return Err("/dev/fuse missing".into());
        }
        need_tool("fusermount3")
    };
    let need_loop = || -> std::result::Result<(), String> {
        if !util::is_root() {
            return Err("loop devices and mounts need root".into());
        }
        if !Path::new("/dev/loop-control").exists() {
            return Err("/dev/loop-control missing".into());
        }
        for t in ["mkfs.ext4", "losetup", "mount", "umount"] {
            need_tool(t)?;
        }
        Ok(())
    };
    let need_vaultfs = || -> std::result::Result<(), String> {
        need_fuse()?;
        for b in [env.vaultfs(), env.vaultctl()] {
            if !util::is_executable(&b) {
                return Err(format!(
                    "{} not found (build it, or pass --vaultfs-bin-dir)",
                    b.display()
                ));
            }
        }
        Ok(())
    };
    match system {
        System::Plain | System::PlainDirect => Ok(()),
        System::Bindfs => {
            need_fuse()?;
            need_tool("bindfs")
        }
        System::Gocryptfs => {
            need_fuse()?;
            need_tool("gocryptfs")
        }
        System::Ext4Loop => need_loop(),
        System::Fscrypt => {
            need_loop()?;
            if !Path::new("/sys/fs/ext4/features/encryption").exists() {
                return Err("the kernel's ext4 has no encryption support".into());
            }
            Ok(())
        }
        System::VaultfsGcm | System::VaultfsXts => need_vaultfs(),
        System::VaultfsXtsLoop => {
            need_loop()?;
            need_vaultfs()
        }
    }
}

/// One thing to undo.
enum Step {
    FuseUnmount { mnt: PathBuf, daemon: Option<u32> },
    Umount(PathBuf),
    LoopDetach(String),
    RemoveDir(PathBuf),
}

/// A stack of undo steps, run in reverse order by `run_all` or, at the latest, on drop.
#[derive(Default)]
pub struct Undo(Vec<Step>);

impl Undo {
    fn push(&mut self, s: Step) {
        self.0.push(s);
    }

    /// Runs every step (last pushed first); returns the first error after trying them all.
    pub fn run_all(&mut self) -> Result<()> {
        let mut first = None;
        while let Some(step) = self.0.pop() {
            if let Err(e) = undo_step(&step) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if let Err(e) = self.run_all() {
            eprintln!("vaultfs-bench: cleanup: {e:#}");
        }
    }
}

fn undo_step(step: &Step) -> Result<()> {
    match step {
        Step::FuseUnmount { mnt, daemon } => {
            fuse_unmount(mnt)?;
            if let Some(pid) = daemon {
                if !util::wait_pid_exit(*pid, Duration::from_secs(20)) {
                    bail!("FUSE daemon {pid} of {} did not exit", mnt.display());
                }
            }
            Ok(())
        }
        Step::Umount(mnt) => kernel_unmount(mnt),
        Step::LoopDetach(dev) => run(Command::new("losetup").arg("-d").arg(dev)),
        Step::RemoveDir(dir) => {
            if let Some(m) = util::mounts()?
                .into_iter()
                .find(|m| m.mount_point.starts_with(dir))
            {
                bail!(
                    "not removing {}: {} is still mounted",
                    dir.display(),
                    m.mount_point.display()
                );
            }
            if dir.exists() {
                fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
            }
            Ok(())
        }
    }
}

/// `fusermount3 -u`, retried while busy, then lazily (`-uz`).
fn fuse_unmount(mnt: &Path) -> Result<()> {
    for _ in 0..40 {
        if !util::is_listed_mount(mnt) {
            return Ok(());
        }
        if run(Command::new("fusermount3").arg("-u").arg(mnt)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    run(Command::new("fusermount3").arg("-uz").arg(mnt))
}

/// `umount`, retried while busy, then lazily (`-l`).
fn kernel_unmount(mnt: &Path) -> Result<()> {
    for _ in 0..40 {
        if !util::is_listed_mount(mnt) {
            return Ok(());
        }
        if run(Command::new("umount").arg(mnt)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    run(Command::new("umount").arg("-l").arg(mnt))
}

/// Unmounts whatever is mounted under `work` and detaches loop devices whose image lies under
/// it: the leftovers of a run that was killed. Returns what was cleaned.
pub fn clean_stale(work: &Path) -> Result<Vec<String>> {
    let mut cleaned = Vec::new();
    // Newest first: mountinfo lists mounts in the order they were made, so a FUSE mount whose
    // backing directory sits on a loop mount goes before that loop mount.
    let stale: Vec<_> = util::mounts()?
        .into_iter()
        .filter(|m| m.mount_point.starts_with(work) && m.mount_point != work)
        .collect();
    for m in stale.into_iter().rev() {
        let r = if m.fstype.starts_with("fuse") && util::which("fusermount3").is_some() {
            run(Command::new("fusermount3").arg("-uz").arg(&m.mount_point))
        } else {
            run(Command::new("umount").arg("-l").arg(&m.mount_point))
        };
        r.with_context(|| format!("unmounting stale {}", m.mount_point.display()))?;
        cleaned.push(format!("unmounted {}", m.mount_point.display()));
    }
    if util::is_root() && util::which("losetup").is_some() {
        let list = util::output(Command::new("losetup").args([
            "--list",
            "--noheadings",
            "--raw",
            "--output",
            "NAME,BACK-FILE",
        ]))?;
        for line in list.lines() {
            let Some((dev, back)) = line.split_once(' ') else {
                continue;
            };
            if Path::new(back.trim()).starts_with(work) {
                run(Command::new("losetup").arg("-d").arg(dev))?;
                cleaned.push(format!("detached {dev} ({})", back.trim()));
            }
        }
    }
    Ok(cleaned)
}

/// A system set up and ready for the workloads; undone by `teardown` or on drop.
pub struct Instance {
    /// The directory the workloads run in.
    pub data: PathBuf,
    /// How long the mount command took until the mount answered (FUSE systems).
    pub mount_time: Option<Duration>,
    /// PID of the FUSE daemon, for memory sampling.
    pub daemon: Option<u32>,
    /// Sequential I/O with `O_DIRECT`; the other workloads do not apply.
    pub direct: bool,
    undo: Undo,
}

impl Instance {
    pub fn teardown(mut self) -> Result<()> {
        self.undo.run_all()
    }
}

/// Sets `system` up fresh in the new directory `root` (which is removed again on teardown).
pub fn setup(system: System, root: &Path, env: &Env) -> Result<Instance> {
    let mut undo = Undo::default();
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    undo.push(Step::RemoveDir(root.to_path_buf()));
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let mut inst = Instance {
        data: root.join("data"),
        mount_time: None,
        daemon: None,
        direct: false,
        undo,
    };
    match system {
        System::Plain => mkdir(&inst.data)?,
        System::PlainDirect => {
            mkdir(&inst.data)?;
            inst.direct = true;
        }
        System::Bindfs => {
            let backing = root.join("backing");
            let mnt = root.join("mnt");
            mkdir(&backing)?;
            mkdir(&mnt)?;
            let mut cmd = Command::new("bindfs");
            if bindfs_needs_big_writes() {
                cmd.args(["-o", "big_writes"]);
            }
            cmd.arg(&backing).arg(&mnt);
            fuse_mount(&mut inst, "bindfs", cmd, &mnt)?;
        }
        System::Gocryptfs => {
            let cipher = root.join("cipher");
            let mnt = root.join("mnt");
            let pass = root.join("passfile");
            mkdir(&cipher)?;
            mkdir(&mnt)?;
            write_private(&pass, b"vaultfs-bench passphrase\n")?;
            run(Command::new("gocryptfs")
                .args(["-init", "-q", "-scryptn", "10", "-passfile"])
                .arg(&pass)
                .arg(&cipher))?;
            let mut cmd = Command::new("gocryptfs");
            cmd.args(["-q", "-passfile"])
                .arg(&pass)
                .arg(&cipher)
                .arg(&mnt);
            fuse_mount(&mut inst, "gocryptfs", cmd, &mnt)?;
        }
        System::Ext4Loop => {
            let lmnt = make_loop(&mut inst.undo, root, env)?;
            inst.data = lmnt.join("data");
            mkdir(&inst.data)?;
        }
        System::Fscrypt => {
            let lmnt = make_loop(&mut inst.undo, root, env)?;
            inst.data = lmnt.join("enc");
            mkdir(&inst.data)?;
            let mut key = [0u8; sys::FSCRYPT_KEY_LEN];
            util::random_bytes(&mut key)?;
            let id = sys::add_encryption_key(&lmnt, &key);
            key.zeroize();
            let id = id.context("FS_IOC_ADD_ENCRYPTION_KEY")?;
            sys::set_encryption_policy(&inst.data, &id).context("FS_IOC_SET_ENCRYPTION_POLICY")?;
        }
        System::VaultfsGcm | System::VaultfsXts => {
            let suite = if system == System::VaultfsGcm {
                "aes-256-gcm"
            } else {
                "aes-256-xts"
            };
            let cipher = root.join("cipher");
            mkdir(&cipher)?;
            vaultfs_mount(&mut inst, root, &cipher, suite, env)?;
        }
        System::VaultfsXtsLoop => {
            let lmnt = make_loop(&mut inst.undo, root, env)?;
            let cipher = lmnt.join("cipher");
            mkdir(&cipher)?;
            vaultfs_mount(&mut inst, root, &cipher, "aes-256-xts", env)?;
        }
    }
    Ok(inst)
}

fn mkdir(p: &Path) -> Result<()> {
    fs::create_dir(p).with_context(|| format!("creating {}", p.display()))
}

fn write_private(p: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
        .and_then(|mut f| f.write_all(bytes))
        .with_context(|| format!("writing {}", p.display()))
}

/// Runs a mount command that returns once mounted (in its own process group, so a Ctrl-C on
/// the terminal reaches only us and we unmount in order), times it until the mount point
/// answers, and registers the unmount.
fn fuse_mount(inst: &mut Instance, program: &str, mut cmd: Command, mnt: &Path) -> Result<()> {
    inst.undo.push(Step::FuseUnmount {
        mnt: mnt.to_path_buf(),
        daemon: None,
    });
    cmd.process_group(0);
    // Load the programs into the page cache first (the workloads drop caches), so that
    // mount-time measures mounting and not reading a binary from disk.
    let version = if program == "gocryptfs" {
        "-version"
    } else {
        "--version"
    };
    run(Command::new(cmd.get_program()).arg(version))?;
    run(Command::new("fusermount3").arg("-V"))?;
    let t0 = Instant::now();
    run(&mut cmd)?;
    util::wait_mounted(mnt, Duration::from_secs(30))?;
    inst.mount_time = Some(t0.elapsed());
    inst.daemon = util::find_daemon(program, mnt);
    if let Some(Step::FuseUnmount { daemon, .. }) = inst.undo.0.last_mut() {
        *daemon = inst.daemon;
    }
    inst.data = mnt.to_path_buf();
    Ok(())
}

fn vaultfs_mount(
    inst: &mut Instance,
    root: &Path,
    cipher: &Path,
    suite: &str,
    env: &Env,
) -> Result<()> {
    let key = root.join("vault.key");
    let mut k = [0u8; 32];
    util::random_bytes(&mut k)?;
    let written = write_private(&key, &k);
    k.zeroize();
    written?;
    let mnt = root.join("mnt");
    mkdir(&mnt)?;
    run(Command::new(env.vaultctl())
        .args(["init", "--cipher", suite, "--key-file"])
        .arg(&key)
        .arg(cipher))?;
    let mut cmd = Command::new(env.vaultfs());
    cmd.arg("--key-file")
        .arg(&key)
        .arg("--log-file")
        .arg(root.join("vaultfs.log"))
        .arg(cipher)
        .arg(&mnt);
    fuse_mount(inst, "vaultfs", cmd, &mnt)
}

/// A fresh sparse image, `mkfs.ext4 -O encrypt` (inode tables and journal written now, so no
/// lazy-init thread runs during the workloads), attached to a loop device and mounted.
fn make_loop(undo: &mut Undo, root: &Path, env: &Env) -> Result<PathBuf> {
    let img = root.join("ext4.img");
    fs::File::create(&img)
        .and_then(|f| f.set_len(env.image_bytes))
        .with_context(|| format!("creating {}", img.display()))?;
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-O",
            "encrypt",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
        ])
        .arg(&img))?;
    let dev = util::output(Command::new("losetup").args(["--find", "--show"]).arg(&img))?
        .trim()
        .to_string();
    if dev.is_empty() {
        bail!("losetup printed no device");
    }
    undo.push(Step::LoopDetach(dev.clone()));
    let lmnt = root.join("ext4");
    mkdir(&lmnt)?;
    undo.push(Step::Umount(lmnt.clone()));
    run(Command::new("mount")
        .args(["-t", "ext4"])
        .arg(&dev)
        .arg(&lmnt))?;
    Ok(lmnt)
}
