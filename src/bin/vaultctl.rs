//! `vaultctl`: create vaults and manage their protectors.

use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use vaultfs_core::cli::{self, exit, CliError};
use vaultfs_core::protector::ARGON2_DEFAULT;
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

fn main() {
    cli::init_logging(false);
    let parsed = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    if let Err(e) = run(parsed) {
        eprintln!("vaultctl: {}", e.message);
        std::process::exit(e.code);
    }
}
