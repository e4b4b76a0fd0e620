//! Our SDP offers and answers (RFC 3264), and the media a peer's SDP asks for.
//!
//! hip accepts one audio stream (RTP to its configured port, addressed to our HIT when
//! HIP is on) and refuses every other stream with port 0, keeping one `m=` line per
//! offered stream in the offer's order (RFC 3264 §6). A stream the offerer itself
//! disabled (port 0) stays disabled in the answer (§6: "MUST be marked with port zero").

use std::fmt::Write as _;

use super::{Form, HitFormat, HostIdentity, IdentityPolicy, Scope, Sdp, SdpError, insert_identity};

/// What goes into our SDP besides the peer's offer.
#[derive(Debug, Clone)]
pub struct LocalMedia<'a> {
    /// `o=` user name.
    pub user: &'a str,
    /// `o=` session id and version (increase it for every new description, RFC 3264 §8).
    pub version: u64,
    /// Connection and origin address: our HIT with HIP, else the host's address.
    pub address: &'a str,
    /// Our RTP port for the accepted audio stream.
    pub rtp_port: u16,
    /// Our Host Identity and how to write it; `None` puts no identity in.
    pub identity: Option<(&'a HostIdentity, IdentityPolicy)>,
}

/// The form the answer uses: the offer's when mirroring, else the configured one.
fn form_for(policy: &IdentityPolicy, offer: Option<&Sdp>, offer_form: Option<Form>) -> Form {
    match offer_form {
        Some(f) if offer.is_some() && policy.mirror_offer_form => f,
        _ => policy.form,
    }
}

/// The port of an `m=` line value (`audio 4000/2 RTP/AVP 0` → 4000).
fn port_of(m: &str) -> Option<u16> {
    m.split_whitespace().nth(1)?.split('/').next()?.parse().ok()
}

/// Builds our offer (`offer = None`: one PCMU audio stream) or our answer to `offer`,
/// with our identity per accepted stream or at session level. `offer_form` is the Host
/// Identity line form the offer used, for mirroring.
pub fn build(
    local: &LocalMedia<'_>,
    offer: Option<&Sdp>,
    offer_form: Option<Form>,
) -> Result<Sdp, SdpError> {
    let ip = if local.address.contains(':') {
        "IP6"
    } else {
        "IP4"
    };
    let (host, v) = (local.address, local.version);
    let mut text = format!(
        "v=0\r\no={} {v} {v} IN {ip} {host}\r\ns=hip-agent\r\nc=IN {ip} {host}\r\nt=0 0\r\n",
        local.user
    );
    let streams: Vec<Vec<&str>> = match offer {
        Some(o) => (0..o.media_count())
            .filter_map(|i| o.media_line(i))
            .map(|l| l.split_whitespace().collect())
            .collect(),
        None => vec![vec!["audio", "1", "RTP/AVP", "0"]],
    };
    let mut accepted = Vec::new();
    for (i, m) in streams.iter().enumerate() {
        let (media, proto) = (m[0], m[2]);
        // Formats as offered: an answer lists a subset of them (§6.1); we keep the first.
        let fmt = m.get(3).copied().unwrap_or("0");
        let open = port_of(&m.join(" ")).is_some_and(|p| p != 0);
        if media == "audio" && open && accepted.is_empty() {
            let _ = write!(text, "m=audio {} {proto} {fmt}\r\n", local.rtp_port);
            if fmt == "0" {
                text.push_str("a=rtpmap:0 PCMU/8000\r\n");
            }
            accepted.push(i);
        } else {
            // Refused (or disabled by the offerer): port 0, same media and transport.
            let _ = write!(text, "m={media} 0 {proto} {fmt}\r\n");
        }
    }
    let mut s = Sdp::parse(&text)?;
    if let Some((id, policy)) = &local.identity {
        let form = form_for(policy, offer, offer_form);
        let scopes: Vec<Scope> = if policy.per_media {
            accepted.iter().map(|i| Scope::Media(*i)).collect()
        } else {
            vec![Scope::Session]
        };
        let format: HitFormat = policy.hit_format;
        let id = HostIdentity {
            hit: id.hit,
            hi: if policy.send_hi { id.hi.clone() } else { None },
        };
        for scope in scopes {
            insert_identity(&mut s, scope, form, format, &id)?;
        }
    }
    Ok(s)
}

/// The connection address and port of the first accepted (non-zero port) audio stream
/// of an SDP body: where the peer wants its audio.
pub fn audio_target(sdp: &Sdp) -> Option<(String, u16)> {
    let text = sdp.emit();
    let mut session_c = None;
    let mut media_c = None;
    let mut port = None;
    let mut in_audio = false;
    let mut seen_media = false;
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(c) = line.strip_prefix("c=") {
            let addr = c.split_whitespace().nth(2).map(str::to_owned);
            if !seen_media {
                session_c = addr;
            } else if in_audio {
                media_c = addr;
            }
        } else if let Some(m) = line.strip_prefix("m=") {
            if port.is_some() {
                break;
            }
            seen_media = true;
            let mut f = m.split_whitespace();
            in_audio = f.next() == Some("audio")
                && f.next()
                    .and_then(|p| p.split('/').next()?.parse::<u16>().ok())
                    .filter(|p| *p != 0)
                    .inspect(|p| port = Some(*p))
                    .is_some();
        }
    }
    Some((media_c.or(session_c)?, port?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdp::{Hit, find_identities};

    fn hit() -> Hit {
        "2001:20::a"
            .parse::<std::net::Ipv6Addr>()
            .map(|a| Hit(a.octets()))
            .unwrap()
    }

    fn local(id: &HostIdentity) -> LocalMedia<'_> {
        LocalMedia {
            user: "bob",
            version: 7,
            address: "2001:20::a",
            rtp_port: 4000,
            identity: Some((id, IdentityPolicy::default())),
        }
    }

    fn m_lines(s: &Sdp) -> Vec<String> {
        (0..s.media_count())
            .map(|i| s.media_line(i).unwrap().to_owned())
            .collect()
    }

    #[test]
    fn an_answer_has_one_m_line_per_offered_stream_in_order() {
        // Regression: an offer with two m= lines must get two back (RFC 3264 §6).
        let offer = Sdp::parse(
            "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n\
             m=audio 5000 RTP/AVP 0 8\r\nm=video 5002 RTP/AVP 96\r\n",
        )
        .unwrap();
        let id = HostIdentity {
            hit: hit(),
            hi: None,
        };
        let a = build(&local(&id), Some(&offer), None).unwrap();
        assert_eq!(
            m_lines(&a),
            vec!["audio 4000 RTP/AVP 0", "video 0 RTP/AVP 96"]
        );
        assert_eq!(audio_target(&a), Some(("2001:20::a".into(), 4000)));
        let ids = find_identities(&a, &|_: &[u8]| Err("no HI".to_owned())).unwrap();
        assert_eq!(ids.len(), 1);
        assert_eq!(ids[0].hit, hit());
    }

    #[test]
    fn a_stream_the_offerer_disabled_stays_disabled() {
        // The first audio stream has port 0: it is answered with port 0, and the second
        // one is the stream we accept.
        let offer = Sdp::parse(
            "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n\
             m=audio 0 RTP/AVP 0\r\nm=audio 6000 RTP/AVP 0\r\nm=audio 6002 RTP/AVP 0\r\n",
        )
        .unwrap();
        let id = HostIdentity {
            hit: hit(),
            hi: None,
        };
        let a = build(&local(&id), Some(&offer), None).unwrap();
        assert_eq!(
            m_lines(&a),
            vec![
                "audio 0 RTP/AVP 0",
                "audio 4000 RTP/AVP 0",
                "audio 0 RTP/AVP 0"
            ]
        );
        assert_eq!(audio_target(&offer), Some(("192.0.2.1".into(), 6000)));
    }

    #[test]
    fn media_level_c_wins_and_no_open_audio_means_no_target() {
        let s = Sdp::parse(
            "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n\
             m=audio 7000 RTP/AVP 0\r\nc=IN IP4 198.51.100.7\r\n",
        )
        .unwrap();
        assert_eq!(audio_target(&s), Some(("198.51.100.7".into(), 7000)));
        let s = Sdp::parse(
            "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nm=audio 0 RTP/AVP 0\r\n",
        )
        .unwrap();
        assert_eq!(audio_target(&s), None);
        // An offer of ours: one PCMU stream.
        let id = HostIdentity {
            hit: hit(),
            hi: None,
        };
        let o = build(&local(&id), None, None).unwrap();
        assert_eq!(m_lines(&o), vec!["audio 4000 RTP/AVP 0"]);
    }
}
