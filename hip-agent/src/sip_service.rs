//! SIP transports at the edge (RFC 3261 §18): UDP sockets, TCP connections and TLS over
//! them (rustls via tokio-rustls). Everything received becomes an [`Inbound`] on one
//! channel, read by the daemon's loop, which owns the sans-IO [`hip_sip::sip::UserAgent`]
//! and hands its [`Transmit`]s back to [`SipService::send`].
//!
//! Stream connections are reused per (transport, peer) for requests we send; responses go
//! back on the connection the request came in on (§18.2.2).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use hip_sip::sip::{ConnId, Transmit, Transport};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{Notify, mpsc},
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, rustls};

use crate::config::{Config, TlsSection};

/// Errors setting up transports.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Binding a listener failed.
    #[error("cannot listen on {transport} {addr}: {source}")]
    Bind {
        /// Transport.
        transport: Transport,
        /// Address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TLS certificate, key or CA could not be loaded.
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// Something that arrived, or happened to a connection.
#[derive(Debug)]
pub enum Inbound {
    /// One UDP datagram.
    Datagram {
        /// Sender.
        peer: SocketAddr,
        /// Payload.
        data: Vec<u8>,
    },
    /// A stream connection is up (accepted or connected); register its writer.
    Opened {
        /// Its id.
        conn: ConnId,
        /// TCP or TLS.
        transport: Transport,
        /// Remote address.
        peer: SocketAddr,
        /// Where bytes for it go.
        writer: mpsc::UnboundedSender<Bytes>,
        /// Notified to drop the connection at once.
        kill: Arc<Notify>,
    },
    /// Bytes from a stream connection.
    Stream {
        /// Connection.
        conn: ConnId,
        /// TCP or TLS.
        transport: Transport,
        /// Remote address.
        peer: SocketAddr,
        /// The bytes read.
        data: Vec<u8>,
    },
    /// The connection is gone.
    Closed {
        /// Connection.
        conn: ConnId,
    },
}

struct Conn {
    transport: Transport,
    peer: SocketAddr,
    writer: mpsc::UnboundedSender<Bytes>,
    kill: Arc<Notify>,
}

/// Counters of the connection limits (`status` → `limits`).
#[derive(Debug, Default, serde::Serialize)]
pub struct ConnStats {
    /// Connections open now.
    pub open: u64,
    /// Accepted connections closed at once: the total or the per-source cap was reached.
    pub refused: u64,
    /// Connections closed after `[limits] connection_idle_secs` without a byte.
    pub idle_closed: u64,
}

/// The caps on stream connections, shared by the listeners and the connections: a
/// connection holds a [`Permit`] for its whole life.
#[derive(Clone)]
struct Gate {
    inner: Arc<Mutex<GateState>>,
    max_total: usize,
    max_per_source: usize,
    idle: Duration,
}

#[derive(Default)]
struct GateState {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
    refused: u64,
    idle_closed: u64,
}

struct Permit {
    gate: Gate,
    source: Option<IpAddr>,
}

impl Gate {
    /// A place for a connection; `source` is counted against the per-source cap (accepted
    /// connections; ours to the next hop are not).
    fn enter(&self, source: Option<IpAddr>) -> Option<Permit> {
        let mut g = self.inner.lock().expect("gate");
        let from_source = source.map_or(0, |s| g.per_source.get(&s).copied().unwrap_or(0));
        if g.total >= self.max_total || (source.is_some() && from_source >= self.max_per_source) {
            g.refused += 1;
            return None;
        }
        g.total += 1;
        if let Some(s) = source {
            *g.per_source.entry(s).or_insert(0) += 1;
        }
        Some(Permit {
            gate: self.clone(),
            source,
        })
    }

    fn stats(&self) -> ConnStats {
        let g = self.inner.lock().expect("gate");
        ConnStats {
            open: g.total as u64,
            refused: g.refused,
            idle_closed: g.idle_closed,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut g = self.gate.inner.lock().expect("gate");
        g.total -= 1;
        if let Some(s) = self.source
            && let Some(n) = g.per_source.get_mut(&s)
        {
            *n -= 1;
            if *n == 0 {
                g.per_source.remove(&s);
            }
        }
    }
}

/// The transports of one agent.
pub struct SipService {
    udp: Option<Arc<UdpSocket>>,
    /// The UDP socket's reader task.
    udp_reader: Option<JoinHandle<()>>,
    inbound: mpsc::Sender<Inbound>,
    conns: HashMap<ConnId, Conn>,
    by_peer: HashMap<(Transport, SocketAddr), ConnId>,
    next_conn: Arc<AtomicU64>,
    tls_connector: Option<(TlsConnector, Option<String>)>,
    gate: Gate,
    /// Local addresses actually bound (port 0 resolved).
    pub local: Vec<(Transport, SocketAddr)>,
}

fn load_certs(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TransportError> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TransportError::Tls(format!("{}: {e}", path.display())))
}

fn tls_acceptor(t: &TlsSection) -> Result<TlsAcceptor, TransportError> {
    use rustls::pki_types::pem::PemObject as _;
    let (Some(cert), Some(key)) = (&t.cert, &t.key) else {
        return Err(TransportError::Tls("cert and key are required".into()));
    };
    let certs = load_certs(cert)?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TransportError::Tls(format!("{}: {e}", key.display())))?;
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

fn tls_connector(t: &TlsSection) -> Result<Option<(TlsConnector, Option<String>)>, TransportError> {
    let Some(ca) = &t.ca else {
        return Ok(None);
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .map_err(|e| TransportError::Tls(format!("{}: {e}", ca.display())))?;
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some((
        TlsConnector::from(Arc::new(cfg)),
        t.server_name.clone(),
    )))
}

/// Reads datagrams from `s` into `tx` until the receiver is gone (or the task is aborted).
fn udp_reader(s: Arc<UdpSocket>, tx: mpsc::Sender<Inbound>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        loop {
            match s.recv_from(&mut buf).await {
                Ok((n, peer)) => {
                    let data = buf[..n].to_vec();
                    if tx.send(Inbound::Datagram { peer, data }).await.is_err() {
                        break;
                    }
                }
                // ICMP errors surface here on Linux; they are not fatal.
                Err(e) => tracing::debug!("udp recv: {e}"),
            }
        }
    })
}

impl SipService {
    /// Binds every configured listener and starts their reader tasks.
    pub async fn bind(cfg: &Config) -> Result<(Self, mpsc::Receiver<Inbound>), TransportError> {
        Self::bind_listeners(&cfg.sip.listen, cfg.sip.tls.as_ref(), &cfg.limits).await
    }

    /// Binds `listen` (at most one UDP socket; the edge makes one service per listener).
    pub async fn bind_listeners(
        listen: &[crate::config::TransportAddr],
        tls: Option<&TlsSection>,
        limits: &crate::config::LimitsSection,
    ) -> Result<(Self, mpsc::Receiver<Inbound>), TransportError> {
        let (tx, rx) = mpsc::channel(4096);
        let next_conn = Arc::new(AtomicU64::new(1));
        let gate = Gate {
            inner: Arc::default(),
            max_total: limits.max_connections,
            max_per_source: limits.max_connections_per_source,
            idle: Duration::from_secs(limits.connection_idle_secs),
        };
        let mut svc = Self {
            udp: None,
            udp_reader: None,
            inbound: tx.clone(),
            conns: HashMap::new(),
            by_peer: HashMap::new(),
            next_conn: next_conn.clone(),
            tls_connector: match tls {
                Some(t) => tls_connector(t)?,
                None => None,
            },
            gate: gate.clone(),
            local: Vec::new(),
        };
        for l in listen {
            let bind_err = |source| TransportError::Bind {
                transport: l.transport,
                addr: l.addr,
                source,
            };
            match l.transport {
                Transport::Udp => {
                    let s = Arc::new(UdpSocket::bind(l.addr).await.map_err(bind_err)?);
                    svc.local
                        .push((Transport::Udp, s.local_addr().map_err(bind_err)?));
                    svc.udp_reader = Some(udp_reader(s.clone(), tx.clone()));
                    svc.udp = Some(s);
                }
                Transport::Tcp | Transport::Tls => {
                    let acceptor = if l.transport == Transport::Tls {
                        let t = tls.ok_or_else(|| TransportError::Tls("no [sip.tls]".into()))?;
                        Some(tls_acceptor(t)?)
                    } else {
                        None
                    };
                    let listener = TcpListener::bind(l.addr).await.map_err(bind_err)?;
                    svc.local
                        .push((l.transport, listener.local_addr().map_err(bind_err)?));
                    let tx = tx.clone();
                    let ids = next_conn.clone();
                    let transport = l.transport;
                    let gate = gate.clone();
                    tokio::spawn(async move {
                        loop {
                            let Ok((sock, peer)) = listener.accept().await else {
                                continue;
                            };
                            // Over a cap the socket is dropped (closed) at once.
                            let Some(permit) = gate.enter(Some(peer.ip())) else {
                                tracing::debug!(%peer, "connection refused: [limits] connection cap");
                                continue;
                            };
                            let _ = sock.set_nodelay(true);
                            let conn = ConnId(ids.fetch_add(1, Ordering::Relaxed));
                            let tx = tx.clone();
                            let acceptor = acceptor.clone();
                            tokio::spawn(async move {
                                let c = ConnCtx {
                                    conn,
                                    transport,
                                    peer,
                                    tx,
                                    permit,
                                };
                                match acceptor {
                                    Some(a) => {
                                        // The handshake too must finish in time.
                                        let idle = c.permit.gate.idle;
                                        match tokio::time::timeout(idle, a.accept(sock)).await {
                                            Ok(Ok(s)) => run_conn(s, c, None).await,
                                            Ok(Err(e)) => {
                                                tracing::info!("TLS accept from {peer}: {e}")
                                            }
                                            Err(_) => {
                                                tracing::info!("TLS accept from {peer}: timed out")
                                            }
                                        }
                                    }
                                    None => run_conn(sock, c, None).await,
                                }
                            });
                        }
                    });
                }
            }
        }
        Ok((svc, rx))
    }

    /// The host's address `from` went away and `to` is where we now reach our peers
    /// from (mobility): a UDP listener bound to `from` is bound again at `to`, same port.
    /// A wildcard listener stays as it is; TCP and TLS listeners are not moved (their
    /// connections break with the address anyway). Returns the new UDP address, if the
    /// socket moved.
    pub async fn move_udp(
        &mut self,
        from: IpAddr,
        to: IpAddr,
    ) -> Result<Option<SocketAddr>, TransportError> {
        let Some(i) = self
            .local
            .iter()
            .position(|(t, a)| *t == Transport::Udp && a.ip() == from)
        else {
            return Ok(None);
        };
        let addr = SocketAddr::new(to, self.local[i].1.port());
        let bind_err = |source| TransportError::Bind {
            transport: Transport::Udp,
            addr,
            source,
        };
        let s = Arc::new(UdpSocket::bind(addr).await.map_err(bind_err)?);
        if let Some(old) = self
            .udp_reader
            .replace(udp_reader(s.clone(), self.inbound.clone()))
        {
            old.abort();
        }
        self.udp = Some(s);
        self.local[i].1 = addr;
        Ok(Some(addr))
    }

    /// Bookkeeping for connection events; call for every [`Inbound`] before handing it on.
    pub fn observe(&mut self, ev: &Inbound) {
        match ev {
            Inbound::Opened {
                conn,
                transport,
                peer,
                writer,
                kill,
            } => {
                self.conns.insert(
                    *conn,
                    Conn {
                        transport: *transport,
                        peer: *peer,
                        writer: writer.clone(),
                        kill: kill.clone(),
                    },
                );
                self.by_peer.entry((*transport, *peer)).or_insert(*conn);
            }
            Inbound::Closed { conn } => {
                if let Some(c) = self.conns.remove(conn)
                    && self.by_peer.get(&(c.transport, c.peer)) == Some(conn)
                {
                    self.by_peer.remove(&(c.transport, c.peer));
                }
            }
            _ => {}
        }
    }

    /// Drops a connection (framing lost, RFC 3261 §18.3, or a message not completed in
    /// time): its reader and writer stop and the socket closes.
    pub fn close(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get(&conn) {
            c.kill.notify_one();
        }
        self.observe(&Inbound::Closed { conn });
    }

    /// The connection counters.
    pub fn conn_stats(&self) -> ConnStats {
        self.gate.stats()
    }

    /// Puts one message on the wire.
    pub async fn send(&mut self, t: Transmit) {
        match t.dest.transport {
            Transport::Udp => {
                if let Some(s) = &self.udp
                    && let Err(e) = s.send_to(&t.data, t.dest.addr).await
                {
                    tracing::debug!("udp send to {}: {e}", t.dest.addr);
                }
            }
            Transport::Tcp | Transport::Tls => {
                let key = (t.dest.transport, t.dest.addr);
                let conn = t
                    .dest
                    .conn
                    .filter(|c| self.conns.contains_key(c))
                    .or_else(|| self.by_peer.get(&key).copied());
                if let Some(c) = conn.and_then(|c| self.conns.get(&c))
                    && c.writer.send(t.data.clone()).is_ok()
                {
                    return;
                }
                self.connect(t.dest.transport, t.dest.addr, t.data);
            }
        }
    }

    /// Opens a connection to `peer` with `first` queued on it.
    fn connect(&mut self, transport: Transport, peer: SocketAddr, first: Bytes) {
        let Some(permit) = self.gate.enter(None) else {
            tracing::warn!(%peer, "not connecting: [limits] max_connections reached");
            return;
        };
        let conn = ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        let (wtx, wrx) = mpsc::unbounded_channel();
        let _ = wtx.send(first);
        let kill = Arc::new(Notify::new());
        self.conns.insert(
            conn,
            Conn {
                transport,
                peer,
                writer: wtx.clone(),
                kill: kill.clone(),
            },
        );
        self.by_peer.insert((transport, peer), conn);
        let tx = self.inbound.clone();
        let tls = self.tls_connector.clone();
        let c = ConnCtx {
            conn,
            transport,
            peer,
            tx: tx.clone(),
            permit,
        };
        tokio::spawn(async move {
            let sock = match TcpStream::connect(peer).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!("connect {transport} {peer}: {e}");
                    let _ = tx.send(Inbound::Closed { conn }).await;
                    return;
                }
            };
            let _ = sock.set_nodelay(true);
            if transport == Transport::Tls {
                let Some((connector, name)) = tls else {
                    tracing::warn!("no [sip.tls] ca configured: cannot open TLS to {peer}");
                    let _ = tx.send(Inbound::Closed { conn }).await;
                    return;
                };
                let name = name.unwrap_or_else(|| peer.ip().to_string());
                let Ok(server_name) = rustls::pki_types::ServerName::try_from(name.clone()) else {
                    let _ = tx.send(Inbound::Closed { conn }).await;
                    return;
                };
                match connector.connect(server_name, sock).await {
                    Ok(s) => run_conn(s, c, Some((wtx, wrx, kill))).await,
                    Err(e) => {
                        tracing::info!("TLS to {peer} ({name}): {e}");
                        let _ = tx.send(Inbound::Closed { conn }).await;
                    }
                }
            } else {
                run_conn(sock, c, Some((wtx, wrx, kill))).await;
            }
        });
    }
}

type Writer = (
    mpsc::UnboundedSender<Bytes>,
    mpsc::UnboundedReceiver<Bytes>,
    Arc<Notify>,
);

/// What a connection task owns besides its stream.
struct ConnCtx {
    conn: ConnId,
    transport: Transport,
    peer: SocketAddr,
    tx: mpsc::Sender<Inbound>,
    /// Its place under the connection caps, given back when the task ends.
    permit: Permit,
}

/// Runs one connection: announces it, pumps reads into the inbound channel and the writer
/// channel into the socket, and reports the close. It ends when the peer closes, when
/// nothing arrives for `[limits] connection_idle_secs`, or when the daemon drops it.
async fn run_conn<S>(stream: S, c: ConnCtx, writer: Option<Writer>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let ConnCtx {
        conn,
        transport,
        peer,
        tx,
        permit,
    } = c;
    let (wtx, mut wrx, kill) = writer.unwrap_or_else(|| {
        let (a, b) = mpsc::unbounded_channel();
        (a, b, Arc::new(Notify::new()))
    });
    if tx
        .send(Inbound::Opened {
            conn,
            transport,
            peer,
            writer: wtx,
            kill: kill.clone(),
        })
        .await
        .is_err()
    {
        return;
    }
    let (mut r, mut w) = tokio::io::split(stream);
    let write_task = tokio::spawn(async move {
        while let Some(b) = wrx.recv().await {
            if w.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    });
    let idle = permit.gate.idle;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = tokio::time::timeout(idle, r.read(&mut buf)) => match read {
                Err(_) => {
                    permit.gate.inner.lock().expect("gate").idle_closed += 1;
                    tracing::debug!(%peer, "closing an idle connection");
                    break;
                }
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(n)) => {
                    let ev = Inbound::Stream {
                        conn,
                        transport,
                        peer,
                        data: buf[..n].to_vec(),
                    };
                    if tx.send(ev).await.is_err() {
                        break;
                    }
                }
            },
            () = kill.notified() => break,
        }
    }
    write_task.abort();
    drop(permit);
    let _ = tx.send(Inbound::Closed { conn }).await;
}
