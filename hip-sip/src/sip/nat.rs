//! SIP through NATs, the parts that are pure: the `received`/`rport` stamp a server puts on
//! the top `Via` of a request (RFC 3261 §18.2.1, RFC 3581 §4), and the keep-alive schedule
//! of a registration flow (RFC 5626 §4.4.1).
//!
//! Written by hand: sipx-sip parses `Via` and finds where its first hop ends
//! ([`sh::via::first_hop_end`]) but has no call that rewrites its parameters.

use std::{net::SocketAddr, time::Duration};

use sipx_sip::{self as sx, HeaderName, headers as sh};

/// Stamps the top `Via` of a request that arrived from `src`:
///
/// * `received=<source IP>` when the sent-by host is not that address (RFC 3261 §18.2.1), and
///   always when the hop asked for `rport` (RFC 3581 §4);
/// * `rport=<source port>` when the hop carries `rport` (RFC 3581 §4).
///
/// Any `received` or `rport` the sender wrote itself is replaced. Other hops and every other
/// header are left byte for byte as they came. A `Via` that does not parse is left alone (the
/// request is refused elsewhere).
pub(crate) fn stamp_via(headers: &mut sx::Headers, src: SocketAddr) {
    let Some(first) = headers.get(&HeaderName::Via) else {
        return;
    };
    let value = first.value();
    let end = sh::via::first_hop_end(&value);
    let Ok(hop) = std::str::from_utf8(&value[..end]) else {
        return;
    };
    let Ok(via) = sh::Via::parse_one(hop.trim().as_bytes()) else {
        return;
    };
    let wants_rport = via.rport().is_some();
    let sent_by_is_source = matches!(via.host, sipx_sip::Host::Ip(ip) if ip == src.ip());
    if sent_by_is_source && !wants_rport {
        return;
    }
    let mut parts = split_params(hop.trim());
    // parts[0] is "SIP/2.0/UDP host:port"; the rest are parameters.
    let mut kept = vec![parts.remove(0).trim().to_owned()];
    kept.extend(
        parts
            .into_iter()
            .map(str::trim)
            .filter(|p| {
                let name = p.split('=').next().unwrap_or_default().trim();
                !name.eq_ignore_ascii_case("received") && !name.eq_ignore_ascii_case("rport")
            })
            .map(str::to_owned),
    );
    kept.push(format!("received={}", src.ip()));
    if wants_rport {
        kept.push(format!("rport={}", src.port()));
    }
    let mut new = kept.join(";").into_bytes();
    new.extend_from_slice(&value[end..]);
    let Ok(stamped) = sx::Header::build(HeaderName::Via, new) else {
        return;
    };
    let mut out = sx::Headers::new();
    let mut done = false;
    for h in headers.iter() {
        if !done && h.name() == &HeaderName::Via {
            done = true;
            out.push(stamped.clone());
        } else {
            out.push(h.clone());
        }
    }
    *headers = out;
}

/// Splits a `Via` hop at the `;` that are not inside a quoted string.
fn split_params(hop: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in hop.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => {
                out.push(&hop[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&hop[start..]);
    out
}

/// How often a registration flow is kept alive (RFC 5626 §4.4.1): the interval the
/// registrar asked for in `Flow-Timer`, else what the RFC recommends per transport, each
/// drawn between 80 % and 100 % of it so that many clients do not send in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// No keep-alives.
    Off,
    /// RFC 5626's recommendation: 24–29 s over UDP, 95–120 s over TCP and TLS, or 80–100 % of
    /// a `Flow-Timer` the registrar sent.
    Rfc5626,
    /// A fixed interval (a NAT known to drop UDP bindings sooner).
    Every(Duration),
}

impl KeepAlive {
    /// The bounds (low, high) of the next interval; `None` when off.
    pub(crate) fn bounds(
        self,
        reliable: bool,
        flow_timer: Option<u32>,
    ) -> Option<(Duration, Duration)> {
        match self {
            Self::Off => None,
            Self::Every(d) if d.is_zero() => None,
            Self::Every(d) => Some((d, d)),
            Self::Rfc5626 => Some(match flow_timer {
                Some(t) if t > 0 => {
                    let t = Duration::from_secs(u64::from(t));
                    (t * 4 / 5, t)
                }
                _ if reliable => (Duration::from_secs(95), Duration::from_secs(120)),
                _ => (Duration::from_secs(24), Duration::from_secs(29)),
            }),
        }
    }
}

/// The double-CRLF keep-alive ("ping", RFC 5626 §3.5.1).
pub(crate) const PING: &[u8] = b"\r\n\r\n";
/// The single-CRLF answer to a ping on a stream ("pong").
pub(crate) const PONG: &[u8] = b"\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(vias: &[&str]) -> sx::Headers {
        let mut h = sx::Headers::new();
        for v in vias {
            h.push(sx::Header::build(HeaderName::Via, v.to_string()).unwrap());
        }
        h.push(sx::Header::build(HeaderName::CallId, "x").unwrap());
        h
    }

    fn vias(h: &sx::Headers) -> Vec<String> {
        h.get_all(&HeaderName::Via)
            .map(|v| String::from_utf8_lossy(&v.value()).into_owned())
            .collect()
    }

    fn src(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rport_gets_the_source_port_and_received_the_source_address() {
        // RFC 3581 §4's example: a client behind a NAT at 10.1.1.1:4540, seen from 1.2.3.4:9988.
        let mut h = headers(&["SIP/2.0/UDP 10.1.1.1:4540;rport;branch=z9hG4bKkjshdyff"]);
        stamp_via(&mut h, src("1.2.3.4:9988"));
        assert_eq!(
            vias(&h),
            ["SIP/2.0/UDP 10.1.1.1:4540;branch=z9hG4bKkjshdyff;received=1.2.3.4;rport=9988"]
        );
        let via = h.typed::<sh::Via>().unwrap().unwrap();
        assert_eq!(via.received(), Some(&b"1.2.3.4"[..]));
        assert_eq!(via.rport(), Some(Some(&b"9988"[..])));
        assert_eq!(via.branch(), Some(&b"z9hG4bKkjshdyff"[..]));
    }

    #[test]
    fn received_is_added_when_the_sent_by_is_not_the_source_and_only_then() {
        let mut h = headers(&["SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bK1"]);
        stamp_via(&mut h, src("192.0.2.1:5060"));
        assert_eq!(
            vias(&h),
            ["SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bK1;received=192.0.2.1"]
        );
        // Sent-by is the source, no rport: nothing to say.
        let mut h = headers(&["SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1"]);
        stamp_via(&mut h, src("192.0.2.1:5060"));
        assert_eq!(vias(&h), ["SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1"]);
    }

    #[test]
    fn only_the_top_hop_changes_and_forged_values_are_replaced() {
        let mut h = headers(&[
            "SIP/2.0/UDP 10.0.0.2;rport=1;received=6.6.6.6;x=\"a;rport\", SIP/2.0/UDP p1;rport",
            "SIP/2.0/TCP p2;branch=z9hG4bK2;rport",
        ]);
        stamp_via(&mut h, src("[2001:db8::5]:7000"));
        assert_eq!(
            vias(&h),
            [
                "SIP/2.0/UDP 10.0.0.2;x=\"a;rport\";received=2001:db8::5;rport=7000, SIP/2.0/UDP p1;rport",
                "SIP/2.0/TCP p2;branch=z9hG4bK2;rport",
            ]
        );
    }

    #[test]
    fn an_unparsable_via_is_left_alone() {
        let mut h = headers(&["not a via;rport"]);
        stamp_via(&mut h, src("192.0.2.1:5060"));
        assert_eq!(vias(&h), ["not a via;rport"]);
    }

    #[test]
    fn keep_alive_intervals_follow_rfc_5626() {
        let s = Duration::from_secs;
        assert_eq!(KeepAlive::Rfc5626.bounds(false, None), Some((s(24), s(29))));
        assert_eq!(KeepAlive::Rfc5626.bounds(true, None), Some((s(95), s(120))));
        assert_eq!(
            KeepAlive::Rfc5626.bounds(false, Some(30)),
            Some((s(24), s(30)))
        );
        assert_eq!(
            KeepAlive::Every(s(10)).bounds(true, Some(30)),
            Some((s(10), s(10)))
        );
        assert_eq!(KeepAlive::Every(s(0)).bounds(false, None), None);
        assert_eq!(KeepAlive::Off.bounds(false, None), None);
    }
}
