//! The control socket: one JSON object per line each way, on a Unix socket that only root
//! can use (mode 0600, in a directory created 0700).
//!
//! Requests: `{"cmd":"call","uri":"sip:bob@biloxi.com"}`, `{"cmd":"hangup","call":1}`,
//! `{"cmd":"answer","call":1}`, `{"cmd":"status"}`, `{"cmd":"hits"}`, `{"cmd":"assoc"}`,
//! `{"cmd":"flows"}`, `{"cmd":"xfrm"}`, `{"cmd":"metrics"}`.
//! Replies: `{"ok":true,…}` or `{"ok":false,"error":"…"}`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Creating, binding or securing the socket failed.
    #[error("control socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A live agent already answers on this socket.
    #[error("control socket {0} is in use by a running agent")]
    InUse(PathBuf),
    /// The client could not reach the agent.
    #[error("cannot reach the agent at {path}: {source} (is `hip-agent run` running?)")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The agent closed the connection or sent something that is not JSON.
    #[error("bad reply from the agent: {0}")]
    BadReply(String),
}

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Place a call.
    Call {
        /// `sip:` or `sips:` URI.
        uri: String,
    },
    /// End a call (CANCEL, BYE or decline, as fits its state).
    Hangup {
        /// Call handle from `call` or `status`.
        call: u64,
    },
    /// Answer a ringing incoming call (manual answer mode).
    Answer {
        /// Call handle.
        call: u64,
    },
    /// Agent, registration and call status.
    Status,
    /// The known-HITs pool.
    Hits,
    /// HIP associations (state, SPIs, locators, errors).
    Assoc,
    /// The eBPF datapath's RTP flow table.
    Flows,
    /// hip's XFRM SAs and policies, grouped by association, with the peers' SIP URIs.
    Xfrm,
    /// The metrics endpoint's body (`hip_agent::metrics`): `{"text", "content_type"}`.
    Metrics {
        /// OpenMetrics 1.0 instead of the Prometheus text format 0.0.4.
        #[serde(default)]
        openmetrics: bool,
    },
}

/// One request with the channel its reply goes back on.
pub type Incoming = (Request, oneshot::Sender<Value>);

/// Binds the socket at `path`: parent directory created 0700, stale socket replaced, a live
/// one refused, the socket itself chmod 0600 before anyone can be told about it.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let err = |source| ControlError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let l = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(l)
}

/// Accepts connections forever, forwarding each request line to `to_daemon`.
pub async fn serve(listener: UnixListener, to_daemon: mpsc::Sender<Incoming>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = to_daemon.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.trim().is_empty() {
                    continue;
                }
                let reply = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => {
                        let (otx, orx) = oneshot::channel();
                        if tx.send((req, otx)).await.is_err() {
                            break;
                        }
                        orx.await
                            .unwrap_or_else(|_| json!({"ok": false, "error": "agent stopping"}))
                    }
                    Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
                };
                let mut out = reply.to_string();
                out.push('\n');
                if w.write_all(out.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Sends one request and waits for its reply (the CLI side).
pub fn request(path: &Path, req: &Request) -> Result<Value, ControlError> {
    let mut s =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.to_owned(),
            source,
        })?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut line = serde_json::to_string(req).map_err(|e| ControlError::BadReply(e.to_string()))?;
    line.push('\n');
    s.write_all(line.as_bytes())
        .map_err(|e| ControlError::BadReply(e.to_string()))?;
    let mut reply = String::new();
    BufReader::new(&s)
        .read_line(&mut reply)
        .map_err(|e| ControlError::BadReply(e.to_string()))?;
    if reply.is_empty() {
        return Err(ControlError::BadReply("connection closed".into()));
    }
    serde_json::from_str(&reply).map_err(|e| ControlError::BadReply(format!("{e}: {reply}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_json_form() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"call","uri":"sip:bob@biloxi.com"}"#).unwrap();
        assert_eq!(
            r,
            Request::Call {
                uri: "sip:bob@biloxi.com".into()
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Hangup { call: 3 }).unwrap(),
            r#"{"cmd":"hangup","call":3}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"hangup","call":1,"x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        for (text, req) in [
            (r#"{"cmd":"flows"}"#, Request::Flows),
            (r#"{"cmd":"xfrm"}"#, Request::Xfrm),
        ] {
            assert_eq!(serde_json::from_str::<Request>(text).unwrap(), req);
            assert_eq!(serde_json::to_string(&req).unwrap(), text);
        }
    }

    #[tokio::test]
    async fn socket_is_root_only_and_answers_json_lines() {
        let dir = std::env::temp_dir().join(format!("hip-ctl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/agent.sock");
        let l = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        // A second agent on the same socket is refused while the first is alive.
        assert!(matches!(bind(&path), Err(ControlError::InUse(_))));
        let (tx, mut rx) = mpsc::channel::<Incoming>(4);
        tokio::spawn(serve(l, tx));
        tokio::spawn(async move {
            while let Some((req, reply)) = rx.recv().await {
                let _ = reply.send(json!({"ok": true, "echo": req}));
            }
        });
        let p = path.clone();
        let v = tokio::task::spawn_blocking(move || request(&p, &Request::Status))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v, json!({"ok": true, "echo": {"cmd": "status"}}));
        // Garbage gets an error line, not a dropped connection.
        let p = path.clone();
        let raw = tokio::task::spawn_blocking(move || {
            let mut s = std::os::unix::net::UnixStream::connect(&p).unwrap();
            s.write_all(b"not json\n").unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            line
        })
        .await
        .unwrap();
        assert!(
            raw.contains("\"ok\":false") && raw.contains("bad request"),
            "{raw}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
