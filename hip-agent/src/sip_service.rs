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
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use hip_sip::sip::{ConnId, Transmit, Transport};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::mpsc,
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
        let (tx, rx) = mpsc::channel(4096);
        let next_conn = Arc::new(AtomicU64::new(1));
        let mut svc = Self {
            udp: None,
            udp_reader: None,
            inbound: tx.clone(),
            conns: HashMap::new(),
            by_peer: HashMap::new(),
            next_conn: next_conn.clone(),
            tls_connector: match &cfg.sip.tls {
                Some(t) => tls_connector(t)?,
                None => None,
            },
            local: Vec::new(),
        };
        for l in &cfg.sip.listen {
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
                        let t = cfg
                            .sip
                            .tls
                            .as_ref()
                            .ok_or_else(|| TransportError::Tls("no [sip.tls]".into()))?;
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
                    tokio::spawn(async move {
                        loop {
                            let Ok((sock, peer)) = listener.accept().await else {
                                continue;
                            };
                            let _ = sock.set_nodelay(true);
                            let conn = ConnId(ids.fetch_add(1, Ordering::Relaxed));
                            let tx = tx.clone();
                            let acceptor = acceptor.clone();
                            tokio::spawn(async move {
                                match acceptor {
                                    Some(a) => match a.accept(sock).await {
                                        Ok(s) => run_conn(s, conn, transport, peer, tx, None).await,
                                        Err(e) => tracing::info!("TLS accept from {peer}: {e}"),
                                    },
                                    None => run_conn(sock, conn, transport, peer, tx, None).await,
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
            } => {
                self.conns.insert(
                    *conn,
                    Conn {
                        transport: *transport,
                        peer: *peer,
                        writer: writer.clone(),
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

    /// Drops a connection whose framing is lost (RFC 3261 §18.3): its writer closes.
    pub fn close(&mut self, conn: ConnId) {
        self.observe(&Inbound::Closed { conn });
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
        let conn = ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        let (wtx, wrx) = mpsc::unbounded_channel();
        let _ = wtx.send(first);
        self.conns.insert(
            conn,
            Conn {
                transport,
                peer,
                writer: wtx.clone(),
            },
        );
        self.by_peer.insert((transport, peer), conn);
        let tx = self.inbound.clone();
        let tls = self.tls_connector.clone();
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
                    Ok(s) => run_conn(s, conn, transport, peer, tx, Some((wtx, wrx))).await,
                    Err(e) => {
                        tracing::info!("TLS to {peer} ({name}): {e}");
                        let _ = tx.send(Inbound::Closed { conn }).await;
                    }
                }
            } else {
                run_conn(sock, conn, transport, peer, tx, Some((wtx, wrx))).await;
            }
        });
    }
}

type Writer = (mpsc::UnboundedSender<Bytes>, mpsc::UnboundedReceiver<Bytes>);

/// Runs one connection: announces it, pumps reads into the inbound channel and the writer
/// channel into the socket, and reports the close.
async fn run_conn<S>(
    stream: S,
    conn: ConnId,
    transport: Transport,
    peer: SocketAddr,
    tx: mpsc::Sender<Inbound>,
    writer: Option<Writer>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (wtx, mut wrx) = writer.unwrap_or_else(mpsc::unbounded_channel);
    if tx
        .send(Inbound::Opened {
            conn,
            transport,
            peer,
            writer: wtx,
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
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
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
        }
    }
    write_task.abort();
    let _ = tx.send(Inbound::Closed { conn }).await;
}
