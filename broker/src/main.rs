//! `vault-broker`: holds vault keys in memory only, unseals them from the TPM, mounts every vault
//! at `<mount_root>/<name>` through vaultfs, and answers on a Unix socket (docs/BROKER.md).

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use tracing::{error, info, warn};
use vault_broker::config::{Config, DEFAULT_CONFIG};
use vault_broker::manager::Manager;
use vault_broker::{server, tpm_actor::TpmHandle};

#[derive(Parser)]
#[command(name = "vault-broker", version, about = "vaultfs key broker")]
struct Args {
    /// TOML configuration file (default /etc/vaultfs/broker.toml if it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    socket: Option<PathBuf>,
    #[arg(long)]
    mount_root: Option<PathBuf>,
    #[arg(long)]
    data_root: Option<PathBuf>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// TCTI string, e.g. `swtpm:host=127.0.0.1,port=2321` or `device:/dev/tpmrm0`.
    #[arg(long)]
    tcti: Option<String>,
    /// The vaultfs binary.
    #[arg(long)]
    vaultfs: Option<PathBuf>,
    /// Written (empty) once every configured vault has been handled and the socket serves.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Leave vaults mounted when the broker stops (default: lock them).
    #[arg(long)]
    keep_mounted_on_exit: bool,
}

fn load_config(a: &Args) -> Result<Config> {
    let mut cfg = match &a.config {
        Some(p) => {
            Config::parse(&std::fs::read_to_string(p).with_context(|| p.display().to_string())?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        }
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
            Config::parse(&std::fs::read_to_string(DEFAULT_CONFIG)?)
                .map_err(|e| anyhow::anyhow!("{DEFAULT_CONFIG}: {e}"))?
        }
        None => Config::default(),
    };
    if let Some(v) = &a.socket {
        cfg.socket = v.clone();
    }
    if let Some(v) = &a.mount_root {
        cfg.mount_root = v.clone();
    }
    if let Some(v) = &a.data_root {
        cfg.data_root = v.clone();
    }
    if let Some(v) = &a.state_dir {
        cfg.state_dir = v.clone();
    }
    if let Some(v) = &a.tcti {
        cfg.tcti = v.clone();
    }
    if let Some(v) = &a.vaultfs {
        cfg.vaultfs = Some(v.clone());
    }
    cfg.validate().map_err(anyhow::Error::msg)?;
    Ok(cfg)
}

fn harden() {
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        warn!("cannot disable core dumps: {e}");
    }
    let flags = rustix::mm::MlockAllFlags::CURRENT
        | rustix::mm::MlockAllFlags::FUTURE
        | rustix::mm::MlockAllFlags::ONFAULT;
    if let Err(e) = rustix::mm::mlockall(flags) {
        warn!("cannot lock memory (keys could reach swap): {e}");
    }
}

fn bind_socket(path: &std::path::Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            // A directory of our own: closed to everyone else.
            std::fs::create_dir_all(dir)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("{}: {e}", path.display()),
    }
    // Created 0600 from the start: the umask closes the window before chmod.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let l = tokio::net::UnixListener::bind(path);
    rustix::process::umask(old);
    let l = l.with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

#[tokio::main]
async fn main() {
    vaultfs_core::cli::init_logging(false);
    let args = Args::parse();
    if let Err(e) = run(args).await {
        error!("{e:#}");
        eprintln!("vault-broker: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    harden();
    // Caught from the start: a SIGTERM while vaults are being set up, or right after "ready"
    // (a supervisor stopping what it just saw start), stops the broker cleanly once it is up,
    // instead of killing it with vaults mounted and nobody to lock them.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let cfg = load_config(&args)?;
    std::fs::create_dir_all(&cfg.state_dir)?;
    std::fs::create_dir_all(&cfg.data_root)?;
    std::fs::create_dir_all(&cfg.mount_root)?;
    let vaultfs = match &cfg.vaultfs {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("vaultfs"),
    };
    let (tpm, opened) = TpmHandle::start(cfg.tcti.clone());
    match opened {
        Ok(true) => warn!(
            "THE TPM AT {} IS A SOFTWARE TPM: sealed keys are only as safe as its state files; \
             use a hardware TPM in production",
            cfg.tcti
        ),
        Ok(false) => info!("TPM at {}", cfg.tcti),
        Err(e) => error!("TPM at {} unavailable: {e}; vaults stay locked", cfg.tcti),
    }
    let listener = bind_socket(&cfg.socket)?;
    let mgr = Manager::new(cfg.clone(), tpm, vaultfs);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let srv = tokio::spawn(server::run(listener, Arc::clone(&mgr), stop_rx));
    mgr.start().await;
    if let Some(p) = &args.ready_file {
        std::fs::write(p, b"")?;
    }
    info!("ready: socket {}", cfg.socket.display());
    // Readiness for scripts and supervisors: one line on stdout.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "ready");
        let _ = out.flush();
    }
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
    }
    let _ = stop_tx.send(true);
    let _ = srv.await;
    if !args.keep_mounted_on_exit {
        mgr.lock_all().await;
    }
    let _ = std::fs::remove_file(&cfg.socket);
    info!("stopped");
    Ok(())
}
