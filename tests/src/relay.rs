//! A SIP relay that rewrites what it carries: the man in the middle of the reliability
//! tests (an attacker, or a broken proxy, on the signalling path).
//!
//! It relays UDP between one caller side and one callee: a request from the caller gets
//! the relay's Via on top and goes to the callee; a response from the callee loses that
//! Via and goes back. It adds no Record-Route, so in-dialog requests (ACK, BYE, UPDATE)
//! go straight between the two agents, as through a proxy that does not stay in the
//! path. On the way, [`Rules`] change SDP bodies (Content-Length follows) and can strip
//! the Identity header. Everything runs on a thread inside the relay's namespace until
//! the [`Relay`] is dropped.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::NetNs;

/// What the relay changes.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// In request bodies (caller → callee): replace the first string by the second.
    pub request_body: Vec<(String, String)>,
    /// In response bodies (callee → caller).
    pub response_body: Vec<(String, String)>,
    /// Remove Identity headers from requests (RFC 8224): a forger who cannot re-sign.
    pub strip_identity: bool,
    /// In response bodies: put this line before the first Host Identity line (an extra,
    /// fake HIT ahead of the real one).
    pub response_prepend: Option<String>,
}

/// The running relay.
pub struct Relay {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Messages relayed, by their first line, in order.
    pub seen: Arc<Mutex<Vec<String>>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn split(msg: &str) -> (&str, &str) {
    match msg.find("\r\n\r\n") {
        Some(i) => (&msg[..i + 2], &msg[i + 4..]),
        None => (msg, ""),
    }
}

/// One message as the relay forwards it (`me`: the relay's address, for its Via).
pub fn rewrite(msg: &str, is_request: bool, me: SocketAddr, rules: &Rules) -> String {
    let (head, body) = split(msg);
    let mut body = body.to_owned();
    for (from, to) in if is_request {
        &rules.request_body
    } else {
        &rules.response_body
    } {
        body = body.replace(from.as_str(), to);
    }
    if !is_request
        && let Some(line) = &rules.response_prepend
        && let Some(i) = body
            .find("a=key-mgmt:host-identity")
            .or_else(|| body.find("k=host-identity"))
    {
        body.insert_str(i, &format!("{line}\r\n"));
    }
    let mut out = String::new();
    let mut via_done = false;
    for (n, line) in head.split("\r\n").enumerate() {
        if line.is_empty() {
            continue;
        }
        let name = line
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if n > 0 && (name == "content-length" || name == "l") {
            continue;
        }
        if is_request && rules.strip_identity && name == "identity" {
            continue;
        }
        if name == "via" || name == "v" {
            if is_request && !via_done {
                out.push_str(&format!(
                    "Via: SIP/2.0/UDP {me};branch=z9hG4bKrelay{:x}\r\n",
                    msg.len() ^ (n << 8)
                ));
                via_done = true;
            } else if !is_request && !via_done && line.contains(&me.to_string()) {
                via_done = true;
                continue;
            }
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    out
}

impl Relay {
    /// Relays between whoever sends requests to `listen` (the caller side) and `callee`,
    /// inside `ns`.
    pub fn start(ns: &NetNs, listen: SocketAddr, callee: SocketAddr, rules: Rules) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let name = ns.name().to_owned();
        let (st, sn) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let sock = crate::enter_netns(&name).and_then(|()| {
                let s = UdpSocket::bind(listen).context("relay bind")?;
                s.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok(s)
            });
            let sock = match sock {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut caller: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 65_535];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let is_request = !msg.starts_with("SIP/2.0");
                let to = if from == callee { caller } else { Some(callee) };
                if from != callee {
                    caller = Some(from);
                }
                sn.lock()
                    .unwrap()
                    .push(msg.lines().next().unwrap_or("").to_owned());
                if let Some(to) = to {
                    let out = rewrite(&msg, is_request, listen, &rules);
                    let _ = sock.send_to(out.as_bytes(), to);
                }
            }
        });
        ready_rx
            .recv()
            .context("relay thread")?
            .context("starting the relay")?;
        Ok(Self {
            stop,
            thread: Some(thread),
            seen,
        })
    }
}
