//! Moving an unmodified phone's media onto HITs: the connection (`c=`) and origin (`o=`)
//! addresses of an SDP body are replaced by a HIT, every other line (ports, codecs,
//! direction attributes, anything unknown) is kept byte for byte.
//!
//! A body is rewritten only when the result means the same thing with another address:
//! one host carries all of its media (RFC 8866 §5.7: `c=` at session level or per media),
//! each active stream has a connection address, the addresses are `IN IP4`/`IN IP6`
//! unicast, and no ICE (RFC 8839) candidates name other addresses. Anything else is
//! refused with a [`RewriteError`] that says why, so that no media leaves in the clear by
//! accident.

use std::net::{IpAddr, Ipv6Addr};

use super::{Scope, Sdp};

/// Why an SDP body cannot be moved onto HITs faithfully.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// An active stream has no connection address (neither its own `c=` nor a session one).
    #[error("media {0} has no connection address (c=)")]
    NoConnection(usize),
    /// A `c=` or `o=` line is not `IN IP4`/`IN IP6` (RFC 8866 §5.7).
    #[error("line {line}: unknown network or address type {value:?} (only IN IP4 / IN IP6)")]
    UnknownAddrType {
        /// 1-based line number.
        line: usize,
        /// The line's value.
        value: String,
    },
    /// A connection address is not a unicast IP literal (multicast `/ttl`, a name).
    #[error("line {line}: connection address {value:?} is not a unicast IP address")]
    NotUnicast {
        /// 1-based line number.
        line: usize,
        /// The address as written.
        value: String,
    },
    /// ICE candidates (RFC 8839) carry addresses of their own that a rewrite would leave.
    #[error("line {0}: ICE candidates (a=candidate) cannot be moved onto HITs")]
    Ice(usize),
    /// The media is spread over several hosts; one HIT cannot stand for all of them.
    #[error("media on several hosts ({0}): one HIT cannot stand for them")]
    SeveralHosts(String),
    /// The body has no active stream with an address to rewrite.
    #[error("no active media stream")]
    NoMedia,
}

/// What a body's connection addresses were before the rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// The one host that carried the media (`None` when every stream is on hold with the
    /// unspecified address, RFC 3264 §8.4).
    pub host: Option<IpAddr>,
}

/// A parsed `c=` line: `IN IP4 192.0.2.1` → the address (unspecified allowed).
fn connection(line: usize, value: &str) -> Result<IpAddr, RewriteError> {
    let f: Vec<&str> = value.split_whitespace().collect();
    let (Some(net), Some(typ), Some(addr)) = (f.first(), f.get(1), f.get(2)) else {
        return Err(RewriteError::UnknownAddrType {
            line,
            value: value.to_owned(),
        });
    };
    if !net.eq_ignore_ascii_case("IN")
        || !(typ.eq_ignore_ascii_case("IP4") || typ.eq_ignore_ascii_case("IP6"))
        || f.len() != 3
    {
        return Err(RewriteError::UnknownAddrType {
            line,
            value: value.to_owned(),
        });
    }
    let not_unicast = || RewriteError::NotUnicast {
        line,
        value: (*addr).to_owned(),
    };
    let ip: IpAddr = addr.parse().map_err(|_| not_unicast())?;
    if ip.is_multicast() || ip.is_ipv4() != typ.eq_ignore_ascii_case("IP4") {
        return Err(not_unicast());
    }
    Ok(ip)
}

/// `rtcp:<port> <nettype> <addrtype> <address>` (RFC 3605 §2.1) → the port and the
/// `c=`-like rest; `None` for `a=rtcp:<port>` alone and every other attribute.
fn rtcp_address(value: &str) -> Option<(&str, &str)> {
    let rest = value.strip_prefix("rtcp:")?;
    let (port, addr) = rest.trim().split_once([' ', '\t'])?;
    Some((port, addr.trim()))
}

/// Checks that `sdp` can be moved onto one HIT and returns its media host.
pub fn media_host(sdp: &Sdp) -> Result<Rewritten, RewriteError> {
    let mut session_c: Option<IpAddr> = None;
    let mut rtcp_hosts: Vec<IpAddr> = Vec::new();
    // Per media: (active, own c=).
    let mut media: Vec<(bool, Option<IpAddr>)> = Vec::new();
    for (line, scope, kind, value) in sdp.typed_lines() {
        match kind {
            'c' => {
                let ip = connection(line, value)?;
                match scope {
                    Scope::Session => session_c = Some(ip),
                    Scope::Media(_) => {
                        if let Some(m) = media.last_mut() {
                            m.1 = Some(ip);
                        }
                    }
                }
            }
            'm' => {
                let active = value
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.split('/').next()?.parse::<u16>().ok())
                    .is_some_and(|p| p != 0);
                media.push((active, None));
            }
            'a' if value.len() >= 10 && value[..10].eq_ignore_ascii_case("candidate:") => {
                return Err(RewriteError::Ice(line));
            }
            'a' if rtcp_address(value).is_some() => {
                // RFC 3605: RTCP to an explicit address is media on that host too.
                let (_, addr) = rtcp_address(value).expect("checked");
                let ip = connection(line, addr)?;
                if !ip.is_unspecified() && !rtcp_hosts.contains(&ip) {
                    rtcp_hosts.push(ip);
                }
            }
            _ => {}
        }
    }
    let mut hosts: Vec<IpAddr> = Vec::new();
    let mut any_active = false;
    for (i, (active, own)) in media.iter().enumerate() {
        if !active {
            continue;
        }
        any_active = true;
        let ip = own.or(session_c).ok_or(RewriteError::NoConnection(i))?;
        if !ip.is_unspecified() && !hosts.contains(&ip) {
            hosts.push(ip);
        }
    }
    for ip in rtcp_hosts {
        if !hosts.contains(&ip) {
            hosts.push(ip);
        }
    }
    if !any_active {
        return Err(RewriteError::NoMedia);
    }
    if hosts.len() > 1 {
        let list: Vec<String> = hosts.iter().map(IpAddr::to_string).collect();
        return Err(RewriteError::SeveralHosts(list.join(", ")));
    }
    Ok(Rewritten {
        host: hosts.first().copied(),
    })
}

/// Replaces every unicast `c=` address and the `o=` address by `to` (as `IN IP6`), after
/// [`media_host`] accepted the body. Connection addresses that are unspecified (hold,
/// RFC 3264 §8.4) stay as they are. Nothing else changes; on error nothing changed.
pub fn move_to(sdp: &mut Sdp, to: Ipv6Addr) -> Result<Rewritten, RewriteError> {
    let found = media_host(sdp)?;
    // The o= line is checked before anything changes: an edit is all or nothing.
    let mut edits: Vec<(usize, String)> = Vec::new();
    for (i, l) in sdp.lines.iter().enumerate() {
        match l.kind() {
            Some('c') => {
                let ip = connection(i + 1, l.value())?;
                if !ip.is_unspecified() {
                    edits.push((i, format!("c=IN IP6 {to}")));
                }
            }
            Some('a') if rtcp_address(l.value()).is_some() => {
                let (port, addr) = rtcp_address(l.value()).expect("checked");
                if !connection(i + 1, addr)?.is_unspecified() {
                    edits.push((i, format!("a=rtcp:{port} IN IP6 {to}")));
                }
            }
            Some('o') => {
                let f: Vec<&str> = l.value().split_whitespace().collect();
                if f.len() != 6 || !f[3].eq_ignore_ascii_case("IN") {
                    return Err(RewriteError::UnknownAddrType {
                        line: i + 1,
                        value: l.value().to_owned(),
                    });
                }
                edits.push((i, format!("o={} {} {} IN IP6 {to}", f[0], f[1], f[2])));
            }
            _ => {}
        }
    }
    for (i, text) in edits {
        sdp.lines[i].text = text;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PHONE: &str = "v=0\r\no=- 1193 3412 IN IP6 fd00::4\r\ns=baresip\r\nc=IN IP6 fd00::4\r\n\
        t=0 0\r\nm=audio 10002 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n\
        a=sendrecv\r\na=x-unknown:kept\r\n";

    fn hit() -> Ipv6Addr {
        "2001:20::a".parse().unwrap()
    }

    #[test]
    fn addresses_move_and_every_other_line_stays() {
        let mut s = Sdp::parse(PHONE).unwrap();
        let r = move_to(&mut s, hit()).unwrap();
        assert_eq!(r.host, Some("fd00::4".parse().unwrap()));
        assert_eq!(
            s.emit(),
            PHONE.replace("IN IP6 fd00::4", "IN IP6 2001:20::a")
        );
        // Ports and codecs untouched.
        assert_eq!(s.media_line(0), Some("audio 10002 RTP/AVP 0 8 101"));
    }

    #[test]
    fn ipv4_media_and_media_level_c_are_rewritten_with_lf_endings_kept() {
        let t = "v=0\no=alice 1 1 IN IP4 pc33.atlanta.com\ns=-\nt=0 0\nm=audio 4000 RTP/AVP 0\nc=IN IP4 192.0.2.1\n";
        let mut s = Sdp::parse(t).unwrap();
        move_to(&mut s, hit()).unwrap();
        assert_eq!(
            s.emit(),
            "v=0\no=alice 1 1 IN IP6 2001:20::a\ns=-\nt=0 0\nm=audio 4000 RTP/AVP 0\nc=IN IP6 2001:20::a\n"
        );
    }

    #[test]
    fn an_rtcp_address_moves_with_the_media_and_must_be_the_same_host() {
        let t = "v=0\r\no=- 1 1 IN IP6 fd00::4\r\ns=-\r\nc=IN IP6 fd00::4\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=rtcp:4001 IN IP6 fd00::4\r\na=rtcp-mux\r\n";
        let mut s = Sdp::parse(t).unwrap();
        move_to(&mut s, hit()).unwrap();
        assert!(
            s.emit()
                .contains("a=rtcp:4001 IN IP6 2001:20::a\r\na=rtcp-mux\r\n"),
            "{s}"
        );
        let other = t.replace("a=rtcp:4001 IN IP6 fd00::4", "a=rtcp:4001 IN IP6 fd00::9");
        let mut s = Sdp::parse(&other).unwrap();
        assert_eq!(
            move_to(&mut s, hit()),
            Err(RewriteError::SeveralHosts("fd00::4, fd00::9".into()))
        );
        // a=rtcp with a port only is kept as it is.
        let plain = t.replace("a=rtcp:4001 IN IP6 fd00::4", "a=rtcp:4001");
        let mut s = Sdp::parse(&plain).unwrap();
        move_to(&mut s, hit()).unwrap();
        assert!(s.emit().contains("a=rtcp:4001\r\n"));
    }

    #[test]
    fn hold_with_the_unspecified_address_stays_on_hold() {
        let t = "v=0\r\no=- 1 2 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
        let mut s = Sdp::parse(t).unwrap();
        assert_eq!(move_to(&mut s, hit()).unwrap().host, None);
        assert!(s.emit().contains("c=IN IP4 0.0.0.0\r\n"));
        assert!(s.emit().contains("o=- 1 2 IN IP6 2001:20::a\r\n"));
    }

    #[test]
    fn refusals_say_why_and_change_nothing() {
        let cases: &[(&str, RewriteError)] = &[
            (
                "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n",
                RewriteError::NoConnection(0),
            ),
            (
                "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=ATM NSAP 47.0091\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n",
                RewriteError::UnknownAddrType {
                    line: 4,
                    value: "ATM NSAP 47.0091".into(),
                },
            ),
            (
                "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 224.2.1.1/127\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n",
                RewriteError::NotUnicast {
                    line: 4,
                    value: "224.2.1.1/127".into(),
                },
            ),
            (
                "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=candidate:1 1 UDP 2130706431 198.51.100.1 4000 typ host\r\n",
                RewriteError::Ice(7),
            ),
            (
                "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\nc=IN IP4 192.0.2.1\r\nm=video 4002 RTP/AVP 96\r\nc=IN IP4 198.51.100.7\r\n",
                RewriteError::SeveralHosts("192.0.2.1, 198.51.100.7".into()),
            ),
            (
                "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 media.example.com\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n",
                RewriteError::NotUnicast {
                    line: 4,
                    value: "media.example.com".into(),
                },
            ),
            (
                "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\nm=audio 0 RTP/AVP 0\r\n",
                RewriteError::NoMedia,
            ),
        ];
        for (text, want) in cases {
            let mut s = Sdp::parse(text).unwrap();
            assert_eq!(move_to(&mut s, hit()).as_ref(), Err(want), "{text}");
            assert_eq!(s.emit(), *text, "unchanged after a refusal");
        }
    }
}
