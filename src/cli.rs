//! Pieces shared by the `vaultctl` and `vaultfs` binaries: exit codes (a documented contract, see
//! docs/CLI.md), reading protector secrets from files or a terminal, and log set-up.

use crate::key::SecretBytes;
use crate::protector::{self, Secret};
use crate::vault::VaultError;
use std::io::{IsTerminal, Read};
use std::path::Path;

/// Exit codes. Stable: scripts rely on them.
pub mod exit {
    pub const OK: i32 = 0;
    /// Any error without a more specific code.
    pub const ERROR: i32 = 1;
    /// Bad command line.
    pub const USAGE: i32 = 2;
    /// Mounting failed (FUSE unavailable, mount refused, mount point busy).
    pub const MOUNT: i32 = 3;
    /// CIPHERDIR missing, not a directory, or (for init) not empty.
    pub const CIPHERDIR: i32 = 6;
    /// MOUNTPOINT missing or not a directory.
    pub const MOUNTPOINT: i32 = 10;
    /// Wrong key or passphrase.
    pub const WRONG_KEY: i32 = 12;
    /// Key or passphrase file unreadable or malformed.
    pub const KEY_FILE: i32 = 13;
    /// Metadata file missing, malformed, of an unsupported version or with unknown flags.
    pub const METADATA: i32 = 23;
    /// Metadata file failed authentication (modified outside vaultfs).
    pub const TAMPERED: i32 = 24;
    /// Refused protector operation (e.g. removing the last protector).
    pub const PROTECTOR: i32 = 25;
}

/// An error with its exit code; its message never contains key material.
#[derive(Debug)]
pub struct CliError {
    pub code: i32,
    pub message: String,
}

impl CliError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
        }
    }
}

impl From<VaultError> for CliError {
    fn from(e: VaultError) -> Self {
        let code = match &e {
            VaultError::WrongKey(_) | VaultError::NoSuchKind(_) => exit::WRONG_KEY,
            VaultError::MetadataTampered => exit::TAMPERED,
            VaultError::Meta(_) => exit::METADATA,
            VaultError::NotEmpty(_) => exit::CIPHERDIR,
            VaultError::LastProtector | VaultError::NoSuchProtector(_) => exit::PROTECTOR,
            VaultError::Protector(protector::ProtectorError::KeyFileLength(_))
            | VaultError::Protector(protector::ProtectorError::EmptyPassphrase) => exit::KEY_FILE,
            _ => exit::ERROR,
        };
        CliError::new(code, e.to_string())
    }
}

/// Reads a whole file (or stdin for `-`) into wiped memory, at most 64 KiB.
fn read_secret_file(path: &Path) -> Result<SecretBytes, CliError> {
    let mut buf = Vec::with_capacity(256);
    let r = if path == Path::new("-") {
        std::io::stdin().lock().take(65537).read_to_end(&mut buf)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(65537).read_to_end(&mut buf))
    };
    let bytes = SecretBytes::new(buf);
    r.map_err(|e| CliError::new(exit::KEY_FILE, format!("{}: {e}", path.display())))?;
    if bytes.expose_secret().len() > 65536 {
        return Err(CliError::new(
            exit::KEY_FILE,
            format!("{}: larger than 64 KiB", path.display()),
        ));
    }
    Ok(bytes)
}

/// A raw key file: exactly 32 bytes.
pub fn key_file(path: &Path) -> Result<Secret, CliError> {
    let b = read_secret_file(path)?;
    protector::raw_key_from_bytes(&b)
        .map(Secret::RawKey)
        .map_err(|e| CliError::new(exit::KEY_FILE, format!("{}: {e}", path.display())))
}

/// A passphrase file: its contents, less one trailing newline.
pub fn passphrase_file(path: &Path) -> Result<Secret, CliError> {
    let b = read_secret_file(path)?;
    let s = b.expose_secret();
    let s = s.strip_suffix(b"\n").unwrap_or(s);
    let s = s.strip_suffix(b"\r").unwrap_or(s);
    if s.is_empty() {
        return Err(CliError::new(
            exit::KEY_FILE,
            format!("{}: passphrase is empty", path.display()),
        ));
    }
    Ok(Secret::Passphrase(SecretBytes::new(s.to_vec())))
}

/// Prompts on the terminal (never echoing). `confirm` asks twice.
pub fn prompt_passphrase(prompt: &str, confirm: bool) -> Result<Secret, CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::new(
            exit::USAGE,
            "no --key-file or --passphrase-file given and stdin is not a terminal",
        ));
    }
    let read = |p: &str| {
        rpassword::prompt_password(p)
            .map(|s| SecretBytes::new(s.into_bytes()))
            .map_err(|e| CliError::new(exit::KEY_FILE, format!("reading passphrase: {e}")))
    };
    let a = read(prompt)?;
    if a.expose_secret().is_empty() {
        return Err(CliError::new(exit::KEY_FILE, "passphrase is empty"));
    }
    if confirm {
        let b = read("Repeat: ")?;
        if a.expose_secret() != b.expose_secret() {
            return Err(CliError::new(exit::KEY_FILE, "passphrases do not match"));
        }
    }
    Ok(Secret::Passphrase(a))
}

/// The secret named by `--key-file`/`--passphrase-file`, or a prompt.
pub fn secret_from_args(
    key_file_arg: Option<&Path>,
    passphrase_arg: Option<&Path>,
    confirm: bool,
) -> Result<Secret, CliError> {
    match (key_file_arg, passphrase_arg) {
        (Some(_), Some(_)) => Err(CliError::new(
            exit::USAGE,
            "give --key-file or --passphrase-file, not both",
        )),
        (Some(k), None) => key_file(k),
        (None, Some(p)) => passphrase_file(p),
        (None, None) => prompt_passphrase("Passphrase: ", confirm),
    }
}

/// Logs to stderr with `tracing`; level from `VAULTFS_LOG` (e.g. `debug`), default `info`.
pub fn init_logging(verbose: bool) {
    // fuser's own debug lines name plaintext paths: keep them out unless asked for by name.
    let default = if verbose {
        "debug,fuser=info"
    } else {
        "info,fuser=warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VAULTFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Exits after a command-line parse failure: usage errors exit with [`exit::USAGE`], `--help`
/// and `--version` with [`exit::OK`].
pub fn exit_on_parse_error(e: clap::Error) -> ! {
    let code = if e.use_stderr() {
        exit::USAGE
    } else {
        exit::OK
    };
    let _ = e.print();
    std::process::exit(code);
}
