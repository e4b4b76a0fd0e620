//! The HIP driver: one tokio task owns raw IPv4 and IPv6 sockets for IP protocol 139
//! (HIP, RFC 7401 §5) and runs a sans-IO [`hip_proto::endpoint::Endpoint`] over them.
//!
//! The task follows the endpoint's documented call order: every received datagram goes
//! to `handle_packet` with its IP source and destination (the HIP checksum covers a
//! pseudo-header), commands go to `initiate`/`close`, the timer armed from
//! `poll_timeout` calls `handle_timeout`, and after each step all `poll_transmit`
//! datagrams are sent and all `poll_event` events forwarded on a channel.
//!
//! With [`Sockets::add_udp`], a UDP socket on port 10500 (RFC 9028 §4.1) carries HIP over
//! UDP behind the 32-bit zero non-ESP marker, and — marked `UDP_ENCAP_ESPINUDP` — lets the
//! kernel take UDP-encapsulated ESP off the same port (RFC 3948): the agent still never
//! sees a media packet, only the HIP ones the kernel hands up with the marker.
//!
//! Raw sockets need `CAP_NET_RAW`. On receive, IPv4 raw sockets hand over the IP header
//! (which carries the destination address); IPv6 raw sockets do not, so the destination
//! comes from an `IPV6_PKTINFO` control message (RFC 3542 §6). On send, the source
//! address the checksum was computed for is pinned with `IP_PKTINFO` / `IPV6_PKTINFO`.

use std::{
    collections::BTreeMap,
    io::{self, IoSlice, IoSliceMut},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use hip_proto::{
    Hit,
    endpoint::{self, BoxRng, Endpoint, Event, PeerLocator, ProtocolError, Transmit},
    wire::IPPROTO_HIP,
};
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn, SockaddrIn6, SockaddrStorage,
    recvmsg, sendmsg, setsockopt, sockopt,
};
use rand_core::SeedableRng;
use serde::Serialize;
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

/// Errors of the HIP driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// Opening or using a raw socket failed.
    #[error("raw HIP socket: {0}")]
    Io(#[from] io::Error),
    /// The protocol core refused a command.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The driver task has stopped.
    #[error("the HIP driver task has stopped")]
    Stopped,
    /// No raw socket could be opened for either address family.
    #[error("no raw HIP socket could be opened (IPv4: {v4}; IPv6: {v6})")]
    NoSocket {
        /// Why IPv4 failed.
        v4: String,
        /// Why IPv6 failed.
        v6: String,
    },
}

/// A cryptographically secure RNG for an endpoint, seeded from the OS.
pub fn os_rng() -> Result<BoxRng, DriverError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(Box::new(rand_chacha::ChaCha20Rng::from_seed(seed)))
}

/// The local address the kernel would use to reach `peer` (a connected UDP socket's
/// local address: no packet is sent).
pub fn source_for(peer: IpAddr) -> io::Result<IpAddr> {
    let bind: SocketAddr = match peer {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(bind)?;
    s.connect((peer, 9))?;
    Ok(s.local_addr()?.ip())
}

struct RawSocket {
    fd: AsyncFd<OwnedFd>,
    v6: bool,
}

impl RawSocket {
    fn open(v6: bool) -> io::Result<Self> {
        let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: plain socket(2) call; the returned descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                family,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                IPPROTO_HIP as i32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if v6 {
            setsockopt(&fd, sockopt::Ipv6RecvPacketInfo, &true).map_err(io::Error::from)?;
        }
        // SAFETY: `fd` is an OwnedFd that the AsyncFd owns from here on; nothing else
        // closes or replaces it.
        let fd = unsafe { AsyncFd::register(fd)? };
        Ok(Self { fd, v6 })
    }

    /// One datagram: (payload range in `buf`, source, destination).
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<(usize, usize, IpAddr, IpAddr)> {
        let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo);
        let (n, src, dst6) = {
            let mut iov = [IoSliceMut::new(buf)];
            let msg = recvmsg::<SockaddrStorage>(
                self.fd.get_ref().as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            )
            .map_err(io::Error::from)?;
            let mut dst6 = None;
            if let Ok(cms) = msg.cmsgs() {
                for c in cms {
                    if let ControlMessageOwned::Ipv6PacketInfo(pi) = c {
                        dst6 = Some(Ipv6Addr::from(pi.ipi6_addr.s6_addr));
                    }
                }
            }
            let src = msg.address.and_then(|a| {
                a.as_sockaddr_in6()
                    .map(|s| IpAddr::V6(s.ip()))
                    .or_else(|| a.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())))
            });
            (msg.bytes, src, dst6)
        };
        if self.v6 {
            let (Some(src), Some(dst)) = (src, dst6) else {
                return Err(io::Error::other(
                    "IPv6 datagram without address information",
                ));
            };
            return Ok((0, n, src, dst.into()));
        }
        // IPv4 raw sockets deliver the IP header too.
        let b = &buf[..n];
        if n < 20 || b[0] >> 4 != 4 {
            return Err(io::Error::other("short IPv4 datagram"));
        }
        let ihl = (b[0] & 0x0f) as usize * 4;
        if ihl < 20 || ihl > n {
            return Err(io::Error::other("bad IPv4 header length"));
        }
        let s = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
        let d = Ipv4Addr::new(b[16], b[17], b[18], b[19]);
        Ok((ihl, n, s.into(), d.into()))
    }

    fn send(&self, t: &Transmit) -> io::Result<()> {
        let iov = [IoSlice::new(&t.payload)];
        let fd = self.fd.get_ref().as_raw_fd();
        match (t.src, t.dst) {
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let pi = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: s.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                let to = SockaddrIn6::from(std::net::SocketAddrV6::new(d, 0, 0, 0));
                sendmsg(
                    fd,
                    &iov,
                    &[ControlMessage::Ipv6PacketInfo(&pi)],
                    MsgFlags::empty(),
                    Some(&to),
                )
            }
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let pi = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(s).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                let to = SockaddrIn::from(std::net::SocketAddrV4::new(d, 0));
                sendmsg(
                    fd,
                    &iov,
                    &[ControlMessage::Ipv4PacketInfo(&pi)],
                    MsgFlags::empty(),
                    Some(&to),
                )
            }
            _ => return Err(io::Error::other("mixed address families")),
        }
        .map(|_| ())
        .map_err(io::Error::from)
    }
}

/// `UDP_ENCAP` (linux/udp.h): the socket option that makes a UDP socket an ESP-in-UDP
/// encapsulation socket, and its value for RFC 3948 framing (non-ESP marker).
const UDP_ENCAP: libc::c_int = 100;
const UDP_ENCAP_ESPINUDP: libc::c_int = 2;

/// The 32-bit zero non-ESP marker in front of a HIP packet over UDP (RFC 9028 §4.1).
const NON_ESP_MARKER: [u8; 4] = [0; 4];

/// The UDP socket for HIP over UDP and UDP-encapsulated ESP: one dual-stack socket
/// (IPv4 peers appear as `::ffff:…`) bound to the HIP UDP port and marked
/// `UDP_ENCAP_ESPINUDP`, so the kernel decapsulates ESP for our SAs and hands up only
/// the datagrams behind the non-ESP marker (HIP). NAT keepalives of the 1-byte 0xFF form
/// (RFC 3948 §2.3) are swallowed by the kernel.
struct UdpSocket6 {
    fd: AsyncFd<OwnedFd>,
    port: u16,
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt(2) with a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn canonical(s: SocketAddr) -> SocketAddr {
    SocketAddr::new(s.ip().to_canonical(), s.port())
}

fn mapped(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

impl UdpSocket6 {
    fn open(port: u16) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the returned descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET6,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::IPPROTO_UDP,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
        setsockopt(&fd, sockopt::Ipv6RecvPacketInfo, &true).map_err(io::Error::from)?;
        let addr = SockaddrIn6::from(std::net::SocketAddrV6::new(
            Ipv6Addr::UNSPECIFIED,
            port,
            0,
            0,
        ));
        nix::sys::socket::bind(fd.as_raw_fd(), &addr).map_err(io::Error::from)?;
        setsockopt_int(&fd, libc::IPPROTO_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)?;
        // SAFETY: `fd` is an OwnedFd that the AsyncFd owns from here on.
        let fd = unsafe { AsyncFd::register(fd)? };
        Ok(Self { fd, port })
    }

    /// One datagram: (length, source, destination), addresses canonical (IPv4 as such).
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, SocketAddr)> {
        let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo);
        let mut iov = [IoSliceMut::new(buf)];
        let msg = recvmsg::<SockaddrIn6>(
            self.fd.get_ref().as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .map_err(io::Error::from)?;
        let mut dst = None;
        if let Ok(cms) = msg.cmsgs() {
            for c in cms {
                if let ControlMessageOwned::Ipv6PacketInfo(pi) = c {
                    dst = Some(Ipv6Addr::from(pi.ipi6_addr.s6_addr));
                }
            }
        }
        let (Some(src), Some(dst)) = (msg.address, dst) else {
            return Err(io::Error::other("UDP datagram without address information"));
        };
        let src = canonical(SocketAddr::V6(std::net::SocketAddrV6::new(
            src.ip(),
            src.port(),
            0,
            0,
        )));
        let dst = canonical(SocketAddr::new(IpAddr::V6(dst), self.port));
        Ok((msg.bytes, src, dst))
    }

    fn send(&self, t: &Transmit, peer_port: u16) -> io::Result<()> {
        let iov = [IoSlice::new(&NON_ESP_MARKER), IoSlice::new(&t.payload)];
        let pi = libc::in6_pktinfo {
            ipi6_addr: libc::in6_addr {
                s6_addr: mapped(t.src).octets(),
            },
            ipi6_ifindex: 0,
        };
        let to = SockaddrIn6::from(std::net::SocketAddrV6::new(mapped(t.dst), peer_port, 0, 0));
        sendmsg(
            self.fd.get_ref().as_raw_fd(),
            &iov,
            &[ControlMessage::Ipv6PacketInfo(&pi)],
            MsgFlags::empty(),
            Some(&to),
        )
        .map(|_| ())
        .map_err(io::Error::from)
    }
}

/// The raw sockets of a driver (at least one family), and the UDP socket if any.
pub struct Sockets {
    v4: Option<RawSocket>,
    v6: Option<RawSocket>,
    udp: Option<UdpSocket6>,
}

impl Sockets {
    /// Opens raw IPv4 and IPv6 sockets for protocol 139 in the current network namespace
    /// (call from inside a tokio runtime). Fails only if neither family can be opened.
    pub fn open() -> Result<Self, DriverError> {
        let v4 = RawSocket::open(false);
        let v6 = RawSocket::open(true);
        match (v4, v6) {
            (Err(a), Err(b)) => Err(DriverError::NoSocket {
                v4: a.to_string(),
                v6: b.to_string(),
            }),
            (a, b) => Ok(Self {
                v4: a.ok(),
                v6: b.ok(),
                udp: None,
            }),
        }
    }

    /// Adds the UDP socket for HIP over UDP and UDP-encapsulated ESP on `port` (RFC 9028
    /// §4.1: 10500), for both address families.
    pub fn add_udp(&mut self, port: u16) -> io::Result<()> {
        self.udp = Some(UdpSocket6::open(port)?);
        Ok(())
    }

    /// The UDP port HIP over UDP is bound to, if any.
    pub fn udp_port(&self) -> Option<u16> {
        self.udp.as_ref().map(|u| u.port)
    }

    fn for_dst(&self, dst: IpAddr) -> Option<&RawSocket> {
        match dst {
            IpAddr::V4(_) => self.v4.as_ref(),
            IpAddr::V6(_) => self.v6.as_ref(),
        }
    }
}

/// What the driver counted: the endpoint's refusals and every dropped packet by reason.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DriverStats {
    /// Datagrams received on the raw sockets.
    pub received: u64,
    /// Datagrams the endpoint dropped, by reason ([`ProtocolError::kind`]).
    pub dropped: BTreeMap<&'static str, u64>,
    /// Times a receive burst hit the batch limit and yielded to timers and commands.
    pub batches_cut: u64,
    /// HIP packets received over UDP (behind the non-ESP marker).
    pub udp_received: u64,
    /// UDP datagrams on the HIP port that were neither HIP nor taken by the kernel as
    /// ESP (no marker, too short): dropped.
    pub udp_not_hip: u64,
    /// NAT keepalives sent and verified ones received (RFC 9028 §5.3).
    pub keepalives_sent: u64,
    /// See [`DriverStats::keepalives_sent`].
    pub keepalives_received: u64,
    /// Per peer HIT over UDP: milliseconds since its last verified NAT keepalive
    /// (absent until the first).
    pub keepalive_age_ms: BTreeMap<String, u64>,
    /// R1 lanes, capacity and NOTIFY counters from the endpoint.
    pub r1_sent_expected: u64,
    /// See [`endpoint::Stats`].
    pub r1_sent_unexpected: u64,
    /// See [`endpoint::Stats`].
    pub r1_rate_limited_address: u64,
    /// See [`endpoint::Stats`].
    pub r1_rate_limited_unexpected: u64,
    /// See [`endpoint::Stats`].
    pub r1_rate_limited_expected: u64,
    /// See [`endpoint::Stats`].
    pub refused_at_capacity: u64,
    /// See [`endpoint::Stats`].
    pub unverified_notify: u64,
    /// Associations the endpoint holds (every state).
    pub associations: usize,
}

impl DriverStats {
    fn absorb(&mut self, e: endpoint::Stats, associations: usize) {
        self.r1_sent_expected = e.r1_sent_expected;
        self.r1_sent_unexpected = e.r1_sent_unexpected;
        self.r1_rate_limited_address = e.r1_rate_limited_address;
        self.r1_rate_limited_unexpected = e.r1_rate_limited_unexpected;
        self.r1_rate_limited_expected = e.r1_rate_limited_expected;
        self.refused_at_capacity = e.refused_at_capacity;
        self.unverified_notify = e.unverified_notify;
        self.keepalives_sent = e.keepalives_sent;
        self.keepalives_received = e.keepalives_received;
        self.associations = associations;
    }
}

/// Datagrams handled per socket wake-up before timers, commands and the other socket get
/// their turn (a flood must not delay retransmissions).
const RECEIVE_BATCH: usize = 64;

/// Dropped packets are logged as one summary per interval, not one line each (a flood
/// at debug level would write hundreds of thousands of lines).
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Default)]
struct DropLog {
    stats: DriverStats,
    since: BTreeMap<&'static str, u64>,
    last: Option<Instant>,
}

impl DropLog {
    fn dropped(&mut self, now: Instant, src: IpAddr, e: &ProtocolError) {
        let k = e.kind();
        *self.stats.dropped.entry(k).or_insert(0) += 1;
        *self.since.entry(k).or_insert(0) += 1;
        match self.last {
            // The first drop after a quiet interval is logged with its detail.
            None => {
                tracing::debug!(%src, "HIP packet dropped: {e}");
                self.last = Some(now);
                self.since.clear();
            }
            Some(t) if now.saturating_duration_since(t) >= DROP_LOG_INTERVAL => {
                let summary: Vec<String> =
                    self.since.iter().map(|(k, n)| format!("{k} {n}")).collect();
                tracing::debug!(
                    "HIP packets dropped in the last {:?}: {}",
                    now.saturating_duration_since(t),
                    summary.join(", ")
                );
                self.last = Some(now);
                self.since.clear();
            }
            Some(_) => {}
        }
    }
}

enum Command {
    Initiate {
        local: Option<IpAddr>,
        peer: PeerLocator,
        expected: Vec<Hit>,
        /// I1 to the null HIT, `expected` checked on R1
        /// ([`Endpoint::initiate_expecting_any`]).
        via_null: bool,
        reply: oneshot::Sender<Result<(), DriverError>>,
    },
    Abandon {
        peer: Option<Hit>,
        locator: Option<IpAddr>,
        reply: oneshot::Sender<bool>,
    },
    Abort {
        peer: Hit,
        reply: oneshot::Sender<Result<(), DriverError>>,
    },
    Probe {
        peer: Hit,
        reply: oneshot::Sender<Result<(), DriverError>>,
    },
    Stats {
        reply: oneshot::Sender<DriverStats>,
    },
    Close {
        peer: Hit,
        reply: oneshot::Sender<Result<(), DriverError>>,
    },
    Rekey {
        peer: Hit,
        reply: oneshot::Sender<Result<(), DriverError>>,
    },
    UpdateLocators {
        peer: Hit,
        new_local: IpAddr,
        reply: oneshot::Sender<Result<(), DriverError>>,
    },
    PathObserved {
        peer: Hit,
        from: SocketAddr,
        reply: oneshot::Sender<Result<(), DriverError>>,
    },
}

/// Handle to a running driver task.
pub struct HipDriver {
    commands: mpsc::Sender<Command>,
    events: mpsc::UnboundedReceiver<Event>,
    task: JoinHandle<Result<(), DriverError>>,
    hit: Hit,
}

impl HipDriver {
    /// Spawns the driver task on the current tokio runtime.
    pub fn spawn(endpoint: Endpoint, sockets: Sockets) -> Self {
        let (ctx, crx) = mpsc::channel(64);
        let (etx, erx) = mpsc::unbounded_channel();
        let hit = endpoint.hit();
        let task = tokio::spawn(run(endpoint, sockets, crx, etx));
        Self {
            commands: ctx,
            events: erx,
            task,
            hit,
        }
    }

    /// Our HIT.
    pub fn hit(&self) -> Hit {
        self.hit
    }

    /// Starts a base exchange with `peer` (see [`Endpoint::initiate`]). Without `local`,
    /// the source address is the one the kernel routes from.
    pub async fn initiate(
        &self,
        local: Option<IpAddr>,
        peer: impl Into<PeerLocator>,
        expected: Option<Hit>,
    ) -> Result<(), DriverError> {
        self.send_initiate(local, peer, expected.into_iter().collect(), false)
            .await
    }

    /// Starts a base exchange whose I1 goes to the null HIT, failing on R1 with
    /// `HitMismatch` unless the responder is `expected` (see
    /// [`Endpoint::initiate_expecting`]).
    pub async fn initiate_expecting(
        &self,
        local: Option<IpAddr>,
        peer: impl Into<PeerLocator>,
        expected: Hit,
    ) -> Result<(), DriverError> {
        self.send_initiate(local, peer, vec![expected], true).await
    }

    /// Like [`HipDriver::initiate_expecting`], accepting a responder that proves any of
    /// `expected` (see [`Endpoint::initiate_expecting_any`]).
    pub async fn initiate_expecting_any(
        &self,
        local: Option<IpAddr>,
        peer: impl Into<PeerLocator>,
        expected: Vec<Hit>,
    ) -> Result<(), DriverError> {
        self.send_initiate(local, peer, expected, true).await
    }

    /// Abandons an exchange we initiated that has not completed (see
    /// [`Endpoint::abandon_initiation`]); `true` when there was one.
    pub async fn abandon(&self, peer: Option<Hit>, locator: Option<IpAddr>) -> bool {
        let (reply, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::Abandon {
                peer,
                locator,
                reply,
            })
            .await
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Forgets the association with `peer` at once, sending nothing (see
    /// [`Endpoint::abort`]).
    pub async fn abort(&self, peer: Hit) -> Result<(), DriverError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Abort { peer, reply })
            .await
            .map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)?
    }

    /// Checks that `peer` still holds the association (see [`Endpoint::probe`]).
    pub async fn probe(&self, peer: Hit) -> Result<(), DriverError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Probe { peer, reply })
            .await
            .map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)?
    }

    /// What the driver and the endpoint counted.
    pub async fn stats(&self) -> Result<DriverStats, DriverError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Stats { reply })
            .await
            .map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)
    }

    async fn send_initiate(
        &self,
        local: Option<IpAddr>,
        peer: impl Into<PeerLocator>,
        expected: Vec<Hit>,
        via_null: bool,
    ) -> Result<(), DriverError> {
        let peer = peer.into();
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Initiate {
                local,
                peer,
                expected,
                via_null,
                reply,
            })
            .await
            .map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)?
    }

    /// Closes the association with `peer`.
    pub async fn close(&self, peer: Hit) -> Result<(), DriverError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Close { peer, reply })
            .await
            .map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)?
    }

    /// Rekeys the ESP SAs with `peer` (UPDATE, RFC 7402 §6.1).
    pub async fn rekey(&self, peer: Hit) -> Result<(), DriverError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Rekey { peer, reply })
            .await
            .map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)?
    }

    /// Tells `peer` that we now use `new_local` (UPDATE with LOCATOR_SET, RFC 8046).
    pub async fn update_locators(&self, peer: Hit, new_local: IpAddr) -> Result<(), DriverError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::UpdateLocators {
                peer,
                new_local,
                reply,
            })
            .await
            .map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)?
    }

    /// The kernel saw `peer`'s ESP arrive from another UDP path (`XFRM_MSG_MAPPING`):
    /// the endpoint verifies that path (see [`Endpoint::path_observed`]).
    pub async fn path_observed(&self, peer: Hit, from: SocketAddr) -> Result<(), DriverError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::PathObserved { peer, from, reply })
            .await
            .map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)?
    }

    /// The next event from the endpoint; `None` once the task has stopped.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Stops the task.
    pub async fn shutdown(self) -> Result<(), DriverError> {
        drop(self.commands);
        self.task.await.map_err(|_| DriverError::Stopped)?
    }
}

async fn readable(
    s: &Option<RawSocket>,
) -> io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>> {
    match s {
        Some(s) => s.fd.readable().await,
        None => std::future::pending().await,
    }
}

async fn readable_udp(
    s: &Option<UdpSocket6>,
) -> io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>> {
    match s {
        Some(s) => s.fd.readable().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

fn flush(ep: &mut Endpoint, socks: &Sockets, events: &mpsc::UnboundedSender<Event>) {
    while let Some(t) = ep.poll_transmit() {
        if let Some(u) = t.udp {
            match &socks.udp {
                Some(s) => {
                    if let Err(e) = s.send(&t, u.peer) {
                        tracing::warn!(dst = %t.dst, port = u.peer, "sending HIP over UDP: {e}");
                    }
                }
                None => tracing::warn!(dst = %t.dst, "no UDP socket for HIP over UDP"),
            }
            continue;
        }
        match socks.for_dst(t.dst) {
            // A lost send is like a lost packet: the endpoint retransmits.
            Some(s) => {
                if let Err(e) = s.send(&t) {
                    tracing::warn!(dst = %t.dst, "sending HIP packet: {e}");
                }
            }
            None => tracing::warn!(dst = %t.dst, "no raw socket for this address family"),
        }
    }
    while let Some(e) = ep.poll_event() {
        let _ = events.send(e);
    }
}

/// [`receive`] for the UDP socket: HIP packets behind the non-ESP marker.
fn receive_udp(
    ep: &mut Endpoint,
    s: &UdpSocket6,
    buf: &mut [u8],
    log: &mut DropLog,
) -> io::Result<bool> {
    for _ in 0..RECEIVE_BATCH {
        match s.try_recv(buf) {
            Ok((n, src, dst)) => {
                let now = Instant::now();
                if n < NON_ESP_MARKER.len() + 1 || buf[..4] != NON_ESP_MARKER {
                    log.stats.udp_not_hip += 1;
                    continue;
                }
                log.stats.received += 1;
                log.stats.udp_received += 1;
                if let Err(e) = ep.handle_udp_packet(now, src, dst, &buf[4..n]) {
                    log.dropped(now, src.ip(), &e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Other => {
                tracing::trace!("unusable datagram: {e}");
            }
            Err(e) => {
                tracing::debug!("UDP socket receive: {e}");
                return Ok(false);
            }
        }
    }
    log.stats.batches_cut += 1;
    Ok(true)
}

/// Handles up to [`RECEIVE_BATCH`] datagrams; `Ok(true)` when the socket may hold more
/// (its readiness is then kept, so the loop comes back to it after the other inputs).
fn receive(
    ep: &mut Endpoint,
    s: &RawSocket,
    buf: &mut [u8],
    log: &mut DropLog,
) -> io::Result<bool> {
    for _ in 0..RECEIVE_BATCH {
        match s.try_recv(buf) {
            Ok((start, end, src, dst)) => {
                log.stats.received += 1;
                let now = Instant::now();
                if let Err(e) = ep.handle_packet(now, src, dst, &buf[start..end]) {
                    log.dropped(now, src, &e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Other => {
                tracing::trace!("unusable datagram: {e}");
            }
            // Errors queued on the socket (ICMP reports and the like) concern one
            // datagram, not the socket: log, and wait for readiness again.
            Err(e) => {
                tracing::debug!("raw socket receive: {e}");
                return Ok(false);
            }
        }
    }
    log.stats.batches_cut += 1;
    Ok(true)
}

async fn run(
    mut ep: Endpoint,
    socks: Sockets,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::UnboundedSender<Event>,
) -> Result<(), DriverError> {
    let mut buf = vec![0u8; 65536];
    let mut log = DropLog::default();
    loop {
        flush(&mut ep, &socks, &events);
        let deadline = ep.poll_timeout();
        // Timers first when due: a receive burst must not hold back retransmissions.
        if deadline.is_some_and(|d| d <= Instant::now()) {
            ep.handle_timeout(Instant::now());
            continue;
        }
        tokio::select! {
            g = readable(&socks.v4) => {
                let mut g = g?;
                let s = socks.v4.as_ref().expect("readable only when present");
                if !receive(&mut ep, s, &mut buf, &mut log)? {
                    g.clear_ready();
                }
            }
            g = readable(&socks.v6) => {
                let mut g = g?;
                let s = socks.v6.as_ref().expect("readable only when present");
                if !receive(&mut ep, s, &mut buf, &mut log)? {
                    g.clear_ready();
                }
            }
            g = readable_udp(&socks.udp) => {
                let mut g = g?;
                let s = socks.udp.as_ref().expect("readable only when present");
                if !receive_udp(&mut ep, s, &mut buf, &mut log)? {
                    g.clear_ready();
                }
            }
            c = commands.recv() => match c {
                None => return Ok(()),
                Some(Command::Initiate { local, peer, expected, via_null, reply }) => {
                    let r = match local.map(Ok).unwrap_or_else(|| source_for(peer.addr)) {
                        Ok(local) => match (via_null, expected.as_slice()) {
                            (true, [_, ..]) => ep.initiate_expecting_any(Instant::now(), local, peer, &expected),
                            _ => ep.initiate(Instant::now(), local, peer, expected.first().copied()),
                        }
                        .map_err(DriverError::from),
                        Err(e) => Err(e.into()),
                    };
                    let _ = reply.send(r);
                }
                Some(Command::Abandon { peer, locator, reply }) => {
                    let _ = reply.send(ep.abandon_initiation(peer, locator));
                }
                Some(Command::Abort { peer, reply }) => {
                    let _ = reply.send(ep.abort(peer).map_err(Into::into));
                }
                Some(Command::Probe { peer, reply }) => {
                    let _ = reply.send(ep.probe(Instant::now(), peer).map_err(Into::into));
                }
                Some(Command::Stats { reply }) => {
                    log.stats.absorb(ep.stats(), ep.association_count());
                    log.stats.keepalive_age_ms = ep
                        .udp_paths(Instant::now())
                        .into_iter()
                        .filter_map(|(h, _, age)| Some((h.to_string(), age?.as_millis() as u64)))
                        .collect();
                    let _ = reply.send(log.stats.clone());
                }
                Some(Command::Close { peer, reply }) => {
                    let _ = reply.send(ep.close(Instant::now(), peer).map_err(Into::into));
                }
                Some(Command::Rekey { peer, reply }) => {
                    let _ = reply.send(ep.rekey(Instant::now(), peer).map_err(Into::into));
                }
                Some(Command::UpdateLocators { peer, new_local, reply }) => {
                    let r = ep.update_locators(Instant::now(), peer, new_local);
                    let _ = reply.send(r.map_err(Into::into));
                }
                Some(Command::PathObserved { peer, from, reply }) => {
                    let r = ep.path_observed(Instant::now(), peer, from);
                    let _ = reply.send(r.map_err(Into::into));
                }
            },
            _ = sleep_until(deadline) => ep.handle_timeout(Instant::now()),
        }
    }
}
