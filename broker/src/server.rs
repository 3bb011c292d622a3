//! The Unix socket server. Peer credentials are checked before a byte is read; frames are length
//! checked before allocation; every read has a timeout; a bad frame gets an error reply and the
//! connection is closed, and the broker keeps serving everyone else.

use crate::manager::{Manager, ManagerError};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};
use vaultfs_core::protocol::{
    self, ErrorCode, Frame, FrameError, Request, Response, WireKey, PROTOCOL_VERSION,
};
use zeroize::Zeroize;

/// Time allowed for each frame to arrive (idle connections are closed after it).
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

pub async fn run(
    listener: UnixListener,
    mgr: Arc<Manager>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let sem = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut shutdown = shutdown;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.accept() => {
                let Ok((stream, _)) = r else { continue };
                let Ok(permit) = Arc::clone(&sem).try_acquire_owned() else {
                    warn!("too many connections; refusing one");
                    continue;
                };
                let mgr = Arc::clone(&mgr);
                tokio::spawn(async move {
                    serve(stream, mgr).await;
                    drop(permit);
                });
            }
        }
    }
}

async fn read_frame(s: &mut UnixStream) -> Result<Frame, FrameError> {
    let mut prefix = [0u8; 4];
    match tokio::time::timeout(READ_TIMEOUT, s.read_exact(&mut prefix)).await {
        Err(_) => return Err(FrameError::Io(std::io::ErrorKind::TimedOut.into())),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(FrameError::Closed)
        }
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(_)) => {}
    }
    let len = protocol::check_len(prefix)?;
    let mut body = Frame(vec![0u8; len]);
    match tokio::time::timeout(READ_TIMEOUT, s.read_exact(&mut body.0)).await {
        Err(_) => Err(FrameError::Io(std::io::ErrorKind::TimedOut.into())),
        Ok(Err(_)) => Err(FrameError::Truncated),
        Ok(Ok(_)) => Ok(body),
    }
}

async fn send(s: &mut UnixStream, r: &Response) -> bool {
    match protocol::encode(r) {
        Ok(f) => s.write_all(&f.0).await.is_ok(),
        Err(_) => false,
    }
}

fn err(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

fn from_mgr(e: ManagerError) -> Response {
    let code = match &e {
        ManagerError::NoSuchVault(_) => ErrorCode::NoSuchVault,
        ManagerError::Locked(_) => ErrorCode::Locked,
        ManagerError::NotAllowed => ErrorCode::NotAllowed,
        ManagerError::Failed(m) if m == "timed out" => ErrorCode::Timeout,
        ManagerError::Failed(_) => ErrorCode::Internal,
    };
    err(code, e.to_string())
}

async fn serve(mut s: UnixStream, mgr: Arc<Manager>) {
    // Credentials first: nothing is read from a peer that is not allowed.
    let Ok(cred) = s.peer_cred() else { return };
    let uid = cred.uid();
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok());
    if uid != 0 && !mgr.config().allowed_uids.contains(&uid) {
        warn!(uid, "refused a peer not on the allow-list");
        let _ = send(&mut s, &err(ErrorCode::NotAllowed, "not allowed")).await;
        return;
    }
    let mut hello = false;
    loop {
        let frame = match read_frame(&mut s).await {
            Ok(f) => f,
            Err(FrameError::Closed) => return,
            Err(e) => {
                debug!("bad frame: {e}");
                let _ = send(&mut s, &err(ErrorCode::BadRequest, e.to_string())).await;
                return;
            }
        };
        let req: Request = match protocol::decode(&frame.0) {
            Ok(r) => r,
            Err(e) => {
                let _ = send(&mut s, &err(ErrorCode::BadRequest, e.to_string())).await;
                return;
            }
        };
        drop(frame);
        if !hello {
            match req {
                Request::Hello { version } if version == PROTOCOL_VERSION => {
                    hello = true;
                    if !send(
                        &mut s,
                        &Response::Hello {
                            version: PROTOCOL_VERSION,
                        },
                    )
                    .await
                    {
                        return;
                    }
                    continue;
                }
                Request::Hello { .. } => {
                    let _ = send(
                        &mut s,
                        &err(ErrorCode::VersionMismatch, "protocol version mismatch"),
                    )
                    .await;
                    return;
                }
                _ => {
                    let _ = send(&mut s, &err(ErrorCode::BadRequest, "Hello first")).await;
                    return;
                }
            }
        }
        let resp = match req {
            Request::Hello { .. } => err(ErrorCode::BadRequest, "Hello twice"),
            Request::Status => Response::Status(mgr.status().await),
            Request::GetVaultKey { vault } => match mgr.vault_key(&vault, pid, uid).await {
                Ok(k) => Response::VaultKey(WireKey(k.expose_secret().to_vec())),
                Err(e) => {
                    warn!(vault, ?pid, uid, "vault key refused: {e}");
                    from_mgr(e)
                }
            },
            Request::WaitReady { vault, timeout_ms } => {
                match mgr
                    .wait_ready(&vault, Duration::from_millis(u64::from(timeout_ms)))
                    .await
                {
                    Ok(()) => Response::Ready,
                    Err(e) => from_mgr(e),
                }
            }
            Request::Lock { vault } => mgr
                .lock(&vault)
                .await
                .map_or_else(from_mgr, |()| Response::Ok),
            Request::Unlock { vault } => mgr
                .unlock(&vault)
                .await
                .map_or_else(from_mgr, |()| Response::Ok),
            Request::Create { vault } => mgr
                .create(&vault)
                .await
                .map_or_else(from_mgr, |()| Response::Ok),
            Request::Delete { vault } => mgr
                .delete(&vault)
                .await
                .map_or_else(from_mgr, |()| Response::Ok),
            Request::Watch => {
                let mut rx = mgr.subscribe();
                for st in mgr.status().await {
                    if !send(&mut s, &Response::Event(st)).await {
                        return;
                    }
                }
                while let Ok(st) = rx.recv().await {
                    if !send(&mut s, &Response::Event(st)).await {
                        return;
                    }
                }
                return;
            }
        };
        let ok = send(&mut s, &resp).await;
        if let Response::VaultKey(mut k) = resp {
            k.0.zeroize();
        }
        if !ok {
            return;
        }
    }
}
