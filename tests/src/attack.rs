//! What an attacker sends, for the reliability tests, the I1 flood bench and the soak:
//! never-ACKed INVITEs, HIP packets on a raw socket (spoofed I1s, bad checksums,
//! unverifiable NOTIFYs, noise with a valid checksum), malformed SIP; and what the victim's
//! process holds (RSS, descriptors), read from `/proc`.
//!
//! Everything here only builds and sends packets; the callers choose namespaces, rates and
//! targets (always addresses inside namespaces they made).

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use hip_proto::{
    Hit,
    wire::{self, PacketBuilder, PacketType, Param},
};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng as _, SeedableRng};

/// An INVITE with a fresh HIT in its SDP (derived from `n`), from `src` to `bob@dst`,
/// never to be ACKed.
pub fn flood_invite(src: SocketAddr, dst: &str, n: u32) -> String {
    let hit = format!(
        "2001002{:025X}",
        u128::from(n) * 0x9E37_79B9_7F4A_7C15 % (1u128 << 100)
    );
    let body = format!(
        "v=0\r\no=- {n} {n} IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n\
         m=audio 4000 RTP/AVP 0\r\na=key-mgmt:host-identity-tag {hit}\r\n",
        ip = src.ip()
    );
    format!(
        "INVITE sip:bob@{dst} SIP/2.0\r\nVia: SIP/2.0/UDP {src};branch=z9hG4bKfl{n}\r\n\
         Max-Forwards: 70\r\nTo: <sip:bob@biloxi.com>\r\nFrom: <sip:x{n}@evil.test>;tag=f{n}\r\n\
         Call-ID: flood-{n}@evil.test\r\nCSeq: 1 INVITE\r\nContact: <sip:x@{src}>\r\n\
         Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A malformed SIP datagram, one of several kinds chosen by `n`: truncated heads, a
/// Content-Length past the end, garbage, a request line only, binary noise.
pub fn malformed_sip(src: SocketAddr, dst: &str, n: u32) -> Vec<u8> {
    let whole = flood_invite(src, dst, n);
    match n % 5 {
        0 => whole.as_bytes()[..whole.len() / 3].to_vec(),
        1 => whole
            .replacen("Content-Length: ", "Content-Length: 9", 1)
            .into_bytes(),
        2 => format!("INVITE sip:bob@{dst} SIP/2.0\r\n\r\n").into_bytes(),
        3 => b"SIP/2.0 200 OK\r\nVia: nonsense\r\nCSeq: x\r\n\r\n".to_vec(),
        _ => (0..200u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) ^ n) as u8)
            .collect(),
    }
}

/// A raw IPv4 socket for IP protocol 139 (HIP) aimed at one address; the kernel writes the
/// IP header, so the source is the sending namespace's address towards `dst`.
pub struct RawHip {
    fd: i32,
    to: libc::sockaddr_in,
}

impl RawHip {
    /// Opens the socket (in the calling thread's namespace).
    pub fn new(dst: Ipv4Addr) -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, 139) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        Ok(Self { fd, to })
    }

    /// Sends one packet; a full socket buffer (ENOBUFS) is not an error for a flood.
    pub fn send(&self, p: &[u8]) {
        // SAFETY: valid buffer and address for the call.
        unsafe {
            libc::sendto(
                self.fd,
                p.as_ptr().cast(),
                p.len(),
                0,
                (&self.to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
    }
}

impl RawHip {
    /// Sends `p` to `dst` (not the socket's default address).
    pub fn send_to(&self, p: &[u8], dst: Ipv4Addr) {
        let to = libc::sockaddr_in {
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            ..self.to
        };
        // SAFETY: valid buffer and address for the call.
        unsafe {
            libc::sendto(
                self.fd,
                p.as_ptr().cast(),
                p.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
    }

    /// Opens a socket that writes its own IPv4 header (`IP_HDRINCL`), so that each
    /// packet may come from a different local address ([`RawHip::send_from`]).
    pub fn with_header(dst: Ipv4Addr) -> io::Result<Self> {
        let s = Self::new(dst)?;
        let one: libc::c_int = 1;
        // SAFETY: valid option value for the call.
        let r = unsafe {
            libc::setsockopt(
                s.fd,
                libc::IPPROTO_IP,
                libc::IP_HDRINCL,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(s)
    }

    /// Sends `p` from `src` to `dst` on a socket made by [`RawHip::with_header`]; the
    /// kernel fills in the header's length, identification and checksum.
    pub fn send_from(&self, p: &[u8], src: Ipv4Addr, dst: Ipv4Addr) {
        let mut pkt = Vec::with_capacity(20 + p.len());
        pkt.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 139, 0, 0]);
        pkt.extend_from_slice(&src.octets());
        pkt.extend_from_slice(&dst.octets());
        pkt.extend_from_slice(p);
        self.send_to(&pkt, dst);
    }

    /// One HIP packet received within `timeout`: its IPv4 source and destination and the
    /// HIP packet (the IP header the raw socket delivers stripped); `None` if none came.
    pub fn recv(&self, timeout: Duration) -> io::Result<Option<(Ipv4Addr, Ipv4Addr, Vec<u8>)>> {
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; 65536];
        // SAFETY: valid buffer for the call.
        let r = unsafe { libc::recv(self.fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(r as usize);
        let ihl = usize::from(buf.first().copied().unwrap_or(0) & 0x0f) * 4;
        if ihl < 20 || buf.len() < ihl {
            return Ok(None);
        }
        let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
        let dst = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
        Ok(Some((src, dst, buf.split_off(ihl))))
    }
}

impl Drop for RawHip {
    fn drop(&mut self) {
        // SAFETY: our descriptor.
        unsafe { libc::close(self.fd) };
    }
}

/// A random ORCHIDv2-prefixed HIT (RFC 7343: 2001:20::/28).
pub fn random_hit(rng: &mut ChaCha20Rng) -> Hit {
    let mut h = [0u8; 16];
    rng.fill_bytes(&mut h);
    h[..4].copy_from_slice(&[0x20, 0x01, 0x00, 0x20]);
    Hit(h)
}

/// An I1 from `sender` to `receiver` (the null HIT for opportunistic mode) with the
/// checksum right for `src → dst`.
pub fn i1(sender: Hit, receiver: Hit, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut pb = PacketBuilder::new(PacketType::I1, 0, sender, receiver);
    pb.push(&Param::DhGroupList(vec![7])).expect("one group");
    let mut p = pb.finish();
    wire::set_checksum(&mut p, src.into(), dst.into());
    p
}

/// An I1 whose checksum is wrong.
pub fn bad_checksum_i1(receiver: Hit, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = i1(
        Hit([0x20, 0x01, 0, 0x2f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
        receiver,
        src,
        dst,
    );
    p[4] ^= 0xff;
    p
}

/// A NOTIFY from a HIT nobody is associated with (it cannot be verified).
pub fn unverified_notify(receiver: Hit, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut n = PacketBuilder::new(
        PacketType::Notify,
        0,
        Hit([0x20, 0x01, 0, 0x2f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]),
        receiver,
    );
    n.push(&Param::Notification {
        msg_type: 14,
        data: vec![],
    })
    .expect("small");
    let mut p = n.finish();
    wire::set_checksum(&mut p, src.into(), dst.into());
    p
}

/// Noise that passes the checksum: a HIP header of a random type with random parameter
/// bytes (mostly refused by the parser, some by the state machine).
pub fn malformed_hip(
    rng: &mut ChaCha20Rng,
    receiver: Hit,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> Vec<u8> {
    let ty = [1u8, 2, 3, 4, 16, 17, 18, 19, 20][(rng.next_u32() % 9) as usize];
    let body_len = 8 * (rng.next_u32() % 12) as usize;
    let mut p = vec![0u8; 40 + body_len];
    rng.fill_bytes(&mut p[40..]);
    p[0] = 59;
    p[1] = ((p.len() / 8) - 1) as u8;
    p[2] = ty;
    p[3] = 0x21;
    p[8..24].copy_from_slice(&random_hit(rng).0);
    p[24..40].copy_from_slice(&receiver.0);
    wire::set_checksum(&mut p, src.into(), dst.into());
    p
}

/// Sends `make(i)` for `i` in `0..` at `per_sec` packets a second until `stop` says so,
/// in bursts every millisecond (so the rate holds without a sleep per packet). Returns
/// how many were sent.
pub fn paced(per_sec: u32, mut stop: impl FnMut() -> bool, mut send_one: impl FnMut(u64)) -> u64 {
    let t0 = Instant::now();
    let mut sent = 0u64;
    while !stop() {
        let due = (t0.elapsed().as_secs_f64() * f64::from(per_sec)) as u64;
        while sent < due {
            send_one(sent);
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    sent
}

/// A process's resident set in kB (`VmRSS`), 0 if it is gone.
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A process's open file descriptors.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// A seeded generator for the attacks (runs are reproducible).
pub fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}
