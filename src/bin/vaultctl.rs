//! `vaultctl`: create vaults and manage their protectors.

use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use vaultfs_core::cli::{self, exit, CliError};
use vaultfs_core::protector::ARGON2_DEFAULT;
use vaultfs_core::protocol::Request;
use vaultfs_core::vault::{NewProtector, Vault};
use vaultfs_core::CipherSuite;

#[derive(Parser)]
#[command(
    name = "vaultctl",
    version,
    about = "Create vaultfs vaults and manage their protectors"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct SecretArgs {
    /// A 32-byte raw key file.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// A file holding the passphrase ("-" reads stdin).
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct KdfArgs {
    /// Argon2id memory in KiB for a new passphrase protector.
    #[arg(long, default_value_t = ARGON2_DEFAULT.0)]
    kdf_memory_kib: u32,
    /// Argon2id passes.
    #[arg(long, default_value_t = ARGON2_DEFAULT.1)]
    kdf_iterations: u32,
    /// Argon2id lanes.
    #[arg(long, default_value_t = ARGON2_DEFAULT.2)]
    kdf_parallelism: u32,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a vault in an empty CIPHERDIR.
    Init {
        /// Content cipher suite.
        #[arg(long, default_value = "aes-256-gcm", value_parser = ["aes-256-gcm", "aes-256-xts"])]
        cipher: String,
        /// Vault name (default: CIPHERDIR's base name).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        secret: SecretArgs,
        #[command(flatten)]
        kdf: KdfArgs,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        cipherdir: PathBuf,
    },
    /// Manage protectors (each wraps the vault master key; data is never re-encrypted).
    Protector {
        #[command(subcommand)]
        cmd: ProtectorCmd,
    },
    /// Status of the broker's vaults.
    Status {
        #[command(flatten)]
        b: BrokerArgs,
        /// Only this vault.
        vault: Option<String>,
    },
    /// Create a TPM-protected vault at the broker and mount it.
    Create {
        #[command(flatten)]
        b: BrokerArgs,
        vault: String,
    },
    /// Crypto-erase a vault (every wrapped key destroyed first), then remove its data.
    Delete {
        #[command(flatten)]
        b: BrokerArgs,
        vault: String,
    },
    /// Unmount a vault and make the broker drop its key.
    Lock {
        #[command(flatten)]
        b: BrokerArgs,
        vault: String,
    },
    /// Unseal and mount a vault.
    Unlock {
        #[command(flatten)]
        b: BrokerArgs,
        vault: String,
    },
    /// Wait until a vault is unlocked and mounted (exit 0), or time out (exit 1).
    WaitReady {
        #[command(flatten)]
        b: BrokerArgs,
        /// Seconds to wait.
        #[arg(long, default_value_t = 60)]
        timeout: u32,
        vault: String,
    },
}

#[derive(Args, Clone)]
struct BrokerArgs {
    /// The broker's socket.
    #[arg(long, default_value = "/run/vaultfs/broker.sock")]
    socket: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

fn broker(b: &BrokerArgs, timeout_s: u64) -> Result<vaultfs_core::protocol::Client, CliError> {
    vaultfs_core::protocol::Client::connect(&b.socket, std::time::Duration::from_secs(timeout_s))
        .map_err(|e| {
            CliError::new(
                exit::ERROR,
                format!("broker at {}: {e}", b.socket.display()),
            )
        })
}

fn broker_call(
    b: &BrokerArgs,
    req: vaultfs_core::protocol::Request,
    timeout_s: u64,
) -> Result<vaultfs_core::protocol::Response, CliError> {
    use vaultfs_core::protocol::Response;
    let mut c = broker(b, timeout_s)?;
    match c
        .call(&req)
        .map_err(|e| CliError::new(exit::ERROR, format!("broker: {e}")))?
    {
        Response::Error { message, .. } => Err(CliError::new(exit::ERROR, message)),
        r => Ok(r),
    }
}

fn print_status(list: &[vaultfs_core::protocol::VaultStatus], json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(list).unwrap_or_default());
        return;
    }
    println!(
        "{:<12} {:<10} {:<9} {:<18} {:<8} MOUNTPOINT / ERROR",
        "VAULT", "STATE", "STATUS", "UNLOCK METHOD", "MOUNTED"
    );
    for v in list {
        let detail = match &v.error {
            Some(e) => format!("{} ({})", v.mountpoint, e),
            None => v.mountpoint.clone(),
        };
        println!(
            "{:<12} {:<10} {:<9} {:<18} {:<8} {}",
            v.name,
            format!("{:?}", v.state).to_lowercase(),
            format!("{:?}", v.status).to_uppercase(),
            v.unlock_method,
            if v.mounted { "yes" } else { "no" },
            detail
        );
        if !v.mismatching_pcrs.is_empty() {
            println!("{:<12} mismatching PCRs: {:?}", "", v.mismatching_pcrs);
        }
    }
}

#[derive(Subcommand)]
enum ProtectorCmd {
    /// List protectors (no secret needed).
    List {
        #[arg(long)]
        json: bool,
        cipherdir: PathBuf,
    },
    /// Add a protector; the vault is unlocked with --key-file/--passphrase-file.
    Add {
        cipherdir: PathBuf,
        #[command(flatten)]
        secret: SecretArgs,
        /// The new protector's raw key file.
        #[arg(long, value_name = "FILE")]
        new_key_file: Option<PathBuf>,
        /// The new protector's passphrase file.
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
        #[arg(long)]
        label: Option<String>,
        #[command(flatten)]
        kdf: KdfArgs,
    },
    /// Remove a protector by id; the vault is unlocked first, and the last one is never removed.
    Remove {
        cipherdir: PathBuf,
        #[arg(long)]
        id: String,
        #[command(flatten)]
        secret: SecretArgs,
    },
}

fn check_cipherdir(p: &Path) -> Result<(), CliError> {
    if !p.is_dir() {
        return Err(CliError::new(
            exit::CIPHERDIR,
            format!("{}: not a directory", p.display()),
        ));
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.cmd {
        Cmd::Init {
            cipher,
            name,
            secret,
            kdf,
            json,
            cipherdir,
        } => {
            check_cipherdir(&cipherdir)?;
            let suite = CipherSuite::from_name(&cipher)
                .ok_or_else(|| CliError::new(exit::USAGE, "unknown cipher"))?;
            let s = cli::secret_from_args(
                secret.key_file.as_deref(),
                secret.passphrase_file.as_deref(),
                true,
            )?;
            let name = name.unwrap_or_else(|| {
                std::fs::canonicalize(&cipherdir)
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| "vault".into())
            });
            let v = Vault::create(
                &cipherdir,
                &name,
                suite,
                &NewProtector {
                    secret: &s,
                    label: None,
                    argon2: (kdf.kdf_memory_kib, kdf.kdf_iterations, kdf.kdf_parallelism),
                    sealed: None,
                },
            )?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"uuid": v.meta().uuid, "name": v.meta().name, "cipher": v.meta().cipher, "protector": v.meta().protectors[0].id})
                );
            } else {
                println!(
                    "Created vault {:?} ({}) in {} with cipher {}.",
                    v.meta().name,
                    v.meta().uuid,
                    cipherdir.display(),
                    v.meta().cipher
                );
                if !suite.is_authenticated() {
                    println!(
                        "Note: aes-256-xts gives confidentiality only; it cannot detect tampering."
                    );
                }
                println!("Mount it with: vaultfs {} MOUNTPOINT", cipherdir.display());
            }
            Ok(())
        }
        Cmd::Status { b, vault } => {
            use vaultfs_core::protocol::{Request, Response};
            let Response::Status(mut list) = broker_call(&b, Request::Status, 10)? else {
                return Err(CliError::new(exit::ERROR, "unexpected reply"));
            };
            if let Some(v) = vault {
                list.retain(|s| s.name == v);
                if list.is_empty() {
                    return Err(CliError::new(exit::ERROR, format!("no vault {v:?}")));
                }
            }
            print_status(&list, b.json);
            Ok(())
        }
        Cmd::Create { b, vault } => {
            simple(&b, &vault, |vault| Request::Create { vault }, "created")
        }
        Cmd::Delete { b, vault } => {
            simple(&b, &vault, |vault| Request::Delete { vault }, "deleted")
        }
        Cmd::Lock { b, vault } => simple(&b, &vault, |vault| Request::Lock { vault }, "locked"),
        Cmd::Unlock { b, vault } => {
            simple(&b, &vault, |vault| Request::Unlock { vault }, "unlocked")
        }
        Cmd::WaitReady { b, timeout, vault } => {
            let timeout_ms = timeout.saturating_mul(1000);
            simple(
                &b,
                &vault,
                |vault| Request::WaitReady { vault, timeout_ms },
                "ready",
            )
        }
        Cmd::Protector { cmd } => match cmd {
            ProtectorCmd::List { json, cipherdir } => {
                check_cipherdir(&cipherdir)?;
                let m = Vault::read_meta(&cipherdir)?;
                if json {
                    let list: Vec<_> = m
                        .protectors
                        .iter()
                        .map(|p| serde_json::json!({"id": p.id, "type": p.kind, "label": p.label}))
                        .collect();
                    println!("{}", serde_json::Value::Array(list));
                } else {
                    println!("{:<18} {:<12} LABEL", "ID", "TYPE");
                    for p in &m.protectors {
                        println!(
                            "{:<18} {:<12} {}",
                            p.id,
                            p.kind,
                            p.label.as_deref().unwrap_or("-")
                        );
                    }
                }
                Ok(())
            }
            ProtectorCmd::Add {
                cipherdir,
                secret,
                new_key_file,
                new_passphrase_file,
                label,
                kdf,
            } => {
                check_cipherdir(&cipherdir)?;
                let s = cli::secret_from_args(
                    secret.key_file.as_deref(),
                    secret.passphrase_file.as_deref(),
                    false,
                )?;
                let new = match (new_key_file, new_passphrase_file) {
                    (Some(k), None) => cli::key_file(&k)?,
                    (None, Some(p)) => cli::passphrase_file(&p)?,
                    (None, None) => cli::prompt_passphrase("New passphrase: ", true)?,
                    _ => {
                        return Err(CliError::new(
                            exit::USAGE,
                            "give --new-key-file or --new-passphrase-file, not both",
                        ))
                    }
                };
                let mut v = Vault::unlock(&cipherdir, &s)?;
                let id = v.add_protector(&NewProtector {
                    secret: &new,
                    label,
                    argon2: (kdf.kdf_memory_kib, kdf.kdf_iterations, kdf.kdf_parallelism),
                    sealed: None,
                })?;
                println!("{id}");
                Ok(())
            }
            ProtectorCmd::Remove {
                cipherdir,
                id,
                secret,
            } => {
                check_cipherdir(&cipherdir)?;
                let s = cli::secret_from_args(
                    secret.key_file.as_deref(),
                    secret.passphrase_file.as_deref(),
                    false,
                )?;
                let mut v = Vault::unlock(&cipherdir, &s)?;
                v.remove_protector(&id)?;
                println!("Removed protector {id}.");
                Ok(())
            }
        },
    }
}

/// One request about vault `name` that answers Ok (or Ready), reported as `done`.
fn simple(
    b: &BrokerArgs,
    name: &str,
    make: impl FnOnce(String) -> vaultfs_core::protocol::Request,
    done: &str,
) -> Result<(), CliError> {
    let req = make(name.to_string());
    let wait = match &req {
        vaultfs_core::protocol::Request::WaitReady { timeout_ms, .. } => {
            u64::from(*timeout_ms) / 1000 + 10
        }
        _ => 120,
    };
    broker_call(b, req, wait)?;
    if b.json {
        println!("{}", serde_json::json!({"vault": name, "result": done}));
    } else {
        println!("{name}: {done}");
    }
    Ok(())
}

fn main() {
    cli::init_logging(false);
    let parsed = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => cli::exit_on_parse_error(e),
    };
    if let Err(e) = run(parsed) {
        eprintln!("vaultctl: {}", e.message);
        std::process::exit(e.code);
    }
}
