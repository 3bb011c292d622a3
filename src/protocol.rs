//! The broker socket protocol (docs/BROKER.md). A frame is a big-endian `u32` body length followed
//! by a postcard-encoded body; the length is checked against [`MAX_FRAME`] before anything is
//! allocated. The first request on a connection is `Hello`. Enums are append-only: the variant
//! index is the wire tag. Buffers that held a key are wiped ([`Frame`] zeroizes itself).

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use zeroize::Zeroize;

pub const PROTOCOL_VERSION: u16 = 1;
/// Largest frame body accepted.
pub const MAX_FRAME: usize = 64 * 1024;
/// Initial capacity of an encoded frame (key-carrying messages are far smaller).
const ENCODE_CAPACITY: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Hello {
        version: u16,
    },
    Status,
    /// The vault's master key; only for the vaultfs process the broker launched for that vault
    /// (or an allowed peer when the vault is mounted by hand).
    GetVaultKey {
        vault: String,
    },
    /// Waits until the vault is unlocked and mounted, or `timeout_ms` passes.
    WaitReady {
        vault: String,
        timeout_ms: u32,
    },
    Lock {
        vault: String,
    },
    Unlock {
        vault: String,
    },
    /// Subscribes to status events: the broker sends `Event`s until the connection closes.
    Watch,
    Create {
        vault: String,
    },
    Delete {
        vault: String,
    },
}

/// Vault lifecycle state in the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VaultState {
    Absent,
    Locked,
    Unlocking,
    Unlocked,
    Error,
}

/// EVE's `DataSecAtRestStatus` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataSecStatus {
    Unknown = 0,
    Disabled = 1,
    Enabled = 2,
    Error = 4,
}

/// EVE's `PCRStatus` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PcrStatus {
    Unknown = 0,
    Enabled = 1,
    Disabled = 2,
}

/// Status of one vault, shaped like EVE's `VaultStatus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaultStatus {
    pub name: String,
    pub state: VaultState,
    pub status: DataSecStatus,
    pub pcr_status: PcrStatus,
    pub mismatching_pcrs: Vec<u8>,
    /// `none`, `tpm-local-sealed`, `controller-key`, `no-tpm`, `recreated`.
    pub unlock_method: String,
    pub mountpoint: String,
    pub mounted: bool,
    pub cipher: String,
    /// False for aes-256-xts: confidentiality only.
    pub authenticated: bool,
    pub conversion_complete: bool,
    pub error: Option<String>,
    /// Seconds since the Unix epoch of `error`.
    pub error_time: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    BadRequest,
    VersionMismatch,
    NotAllowed,
    NoSuchVault,
    Locked,
    Timeout,
    Internal,
    Busy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Hello {
        version: u16,
    },
    Status(Vec<VaultStatus>),
    /// 32 key bytes. Both sides wipe every buffer that held them.
    VaultKey(WireKey),
    Ready,
    Ok,
    Event(VaultStatus),
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// Key bytes on the wire: wiped on drop, Debug redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireKey(pub Vec<u8>);

impl Drop for WireKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for WireKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WireKey(REDACTED)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("truncated frame")]
    Truncated,
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A frame body, wiped on drop.
pub struct Frame(pub Vec<u8>);

impl Drop for Frame {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Encodes a message as a complete frame (length prefix included); the returned buffer wipes
/// itself.
pub fn encode<T: Serialize>(msg: &T) -> Result<Frame, FrameError> {
    // Room for any key-carrying message up front: a growing Vec would leave copies of the bytes
    // written so far in freed, unwiped memory.
    let mut out = Vec::with_capacity(ENCODE_CAPACITY);
    out.extend_from_slice(&[0u8; 4]);
    let body = postcard::to_extend(msg, out).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let mut body = Frame(body);
    let len = body.0.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    body.0[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(body)
}

/// Checks a received length prefix before anything is allocated.
pub fn check_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if len == 0 {
        return Err(FrameError::Malformed("empty frame".into()));
    }
    Ok(len)
}

/// Decodes a frame body; trailing bytes are an error.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    let (v, rest) =
        postcard::take_from_bytes(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(v)
}

/// Blocking read of one frame body.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, FrameError> {
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = check_len(prefix)?;
    let mut body = Frame(vec![0u8; len]);
    r.read_exact(&mut body.0).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            e.into()
        }
    })?;
    Ok(body)
}

pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    let f = encode(msg)?;
    w.write_all(&f.0)?;
    w.flush()?;
    Ok(())
}

/// A blocking client: connects, says hello, and makes one request at a time.
pub struct Client {
    stream: std::os::unix::net::UnixStream,
}

impl Client {
    pub fn connect(
        path: &std::path::Path,
        timeout: std::time::Duration,
    ) -> Result<Client, FrameError> {
        let stream = std::os::unix::net::UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut c = Client { stream };
        match c.call(&Request::Hello {
            version: PROTOCOL_VERSION,
        })? {
            Response::Hello { version } if version == PROTOCOL_VERSION => Ok(c),
            Response::Hello { version } => Err(FrameError::Malformed(format!(
                "broker speaks protocol {version}"
            ))),
            Response::Error { message, .. } => Err(FrameError::Malformed(message)),
            _ => Err(FrameError::Malformed("unexpected reply to hello".into())),
        }
    }

    pub fn call(&mut self, req: &Request) -> Result<Response, FrameError> {
        write_frame(&mut self.stream, req)?;
        self.next_message()
    }

    /// The next message (for `Watch`).
    pub fn next_message(&mut self) -> Result<Response, FrameError> {
        let f = read_frame(&mut self.stream)?;
        decode(&f.0)
    }

    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        self.stream.set_read_timeout(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let reqs = [
            Request::Hello { version: 1 },
            Request::Status,
            Request::GetVaultKey {
                vault: "apps".into(),
            },
            Request::WaitReady {
                vault: "x".into(),
                timeout_ms: 5,
            },
            Request::Watch,
        ];
        for r in reqs {
            let f = encode(&r).unwrap();
            let len = check_len(f.0[..4].try_into().unwrap()).unwrap();
            assert_eq!(len, f.0.len() - 4);
            assert_eq!(decode::<Request>(&f.0[4..]).unwrap(), r);
        }
        let resp = Response::VaultKey(WireKey(vec![7; 32]));
        let f = encode(&resp).unwrap();
        assert_eq!(decode::<Response>(&f.0[4..]).unwrap(), resp);
    }

    #[test]
    fn limits() {
        assert!(matches!(
            check_len((MAX_FRAME as u32 + 1).to_be_bytes()),
            Err(FrameError::TooLarge(_))
        ));
        assert!(check_len([0; 4]).is_err());
        let mut trailing = encode(&Request::Status).unwrap().0[4..].to_vec();
        trailing.push(0);
        assert!(decode::<Request>(&trailing).is_err());
        let mut short: &[u8] = &[0, 0, 0, 9, 1, 2];
        assert!(matches!(read_frame(&mut short), Err(FrameError::Truncated)));
        let mut none: &[u8] = &[];
        assert!(matches!(read_frame(&mut none), Err(FrameError::Closed)));
        let mut huge: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut huge),
            Err(FrameError::TooLarge(_))
        ));
    }

    proptest! {
        /// The decoder never panics and never accepts trailing garbage, whatever the bytes.
        #[test]
        fn decoder_fuzz(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Request>(&body);
            let _ = decode::<Response>(&body);
            let mut framed = (body.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(&body);
            let mut r: &[u8] = &framed;
            let _ = read_frame(&mut r).map(|f| decode::<Request>(&f.0).is_ok());
        }

        #[test]
        fn valid_requests_survive_any_truncation(name in "[a-z]{0,40}", cut in 0usize..64) {
            let f = encode(&Request::Lock { vault: name.clone() }).unwrap();
            let body = &f.0[4..];
            let cut = cut.min(body.len());
            let r = decode::<Request>(&body[..cut]);
            if cut < body.len() {
                prop_assert!(r.is_err());
            } else {
                prop_assert_eq!(r.unwrap(), Request::Lock { vault: name });
            }
        }
    }
}
