//! SDP (RFC 8866) at the line level, and the Host Identity extension of
//! draft-tschofenig-hiprg-host-identities §3.2 on top of it.
//!
//! # Why a line-level layer of our own
//!
//! The HIT extension only needs to find and add `k=` and `a=key-mgmt:` lines at session level
//! and per media description; everything else in a peer's SDP must come back out unchanged.
//! The SDP crates that were tried, each on the draft's F1 body and `k=`/`a=key-mgmt:` lines at
//! session and media level, do not keep everything:
//! `sdp-types` drops unknown line letters, `ezk-sdp-types` drops `k=`, `webrtc-sdp` rejects it,
//! `sdp` (webrtc-rs) rejects the draft's own F1 body (`c=` after `t=`), and `sipx-sdp`, which
//! keeps unknown lines, still normalises typed ones on re-emit (it drops the `/ttl` of a
//! multicast `c=`, the `/count` of an `m=` port, and rewrites a malformed `t=` as `t=0 0`) and
//! re-orders lines. [`Sdp`] therefore keeps the exact bytes of every line and its line ending,
//! in the order received, and only knows where the media sections start: `parse` then `emit`
//! is the identity on every accepted input, byte for byte.

mod hostid;
pub mod offer;
pub mod rewrite;

pub use hostid::{
    Form, Hit, HitFormat, HitParseError, HostIdentity, IdentityEntry, IdentityPolicy, Kind, Scope,
    find_identities, form_used, hits_for_media, insert_identity, remove_identities,
};

/// What can be wrong with an SDP body or its Host Identity lines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    /// The body is not UTF-8 (RFC 8866 §5: SDP text is UTF-8 unless `a=charset` says otherwise,
    /// and the fields this crate reads are ASCII).
    #[error("SDP is not valid UTF-8")]
    NotUtf8,
    /// The body has no lines.
    #[error("SDP is empty")]
    Empty,
    /// The first line is not `v=` (RFC 8866 §5: "v=" MUST be first).
    #[error("SDP line 1 must be v=, found {0:?}")]
    NoVersion(String),
    /// A line is not `<letter>=<value>` (RFC 8866 §5).
    #[error("SDP line {line} is not <type>=<value>: {text:?}")]
    MalformedLine {
        /// 1-based line number.
        line: usize,
        /// The offending line.
        text: String,
    },
    /// The session section has no `o=` line (RFC 8866 §5.2 makes it mandatory).
    #[error("SDP has no o= line")]
    NoOrigin,
    /// An `m=` line lacks media type, port, protocol or format (RFC 8866 §5.14).
    #[error("SDP line {line}: malformed m= line {text:?}")]
    MalformedMedia {
        /// 1-based line number.
        line: usize,
        /// The offending line.
        text: String,
    },
    /// A Host Identity Tag is not 32 hex digits nor IPv6 text.
    #[error("SDP line {line}: bad Host Identity Tag {value:?}: {reason}")]
    BadHit {
        /// 1-based line number.
        line: usize,
        /// The value as written.
        value: String,
        /// Why it was refused.
        reason: HitParseError,
    },
    /// A Host Identity is not valid base64 (RFC 4648 §4) or is empty.
    #[error("SDP line {line}: Host Identity is not valid base64: {value:?}")]
    BadBase64 {
        /// 1-based line number.
        line: usize,
        /// The value as written (possibly shortened).
        value: String,
    },
    /// A Host Identity could not be turned into a HIT (unknown algorithm, truncated key…).
    #[error("SDP line {line}: Host Identity is unusable: {reason}")]
    BadHostIdentity {
        /// 1-based line number.
        line: usize,
        /// What the HIT derivation said.
        reason: String,
    },
    /// A HIT given next to HIs in the same scope matches none of them.
    #[error(
        "SDP line {line}: HIT {hit} does not match the Host Identity given in the same {scope}"
    )]
    HiHitMismatch {
        /// 1-based line number of the HIT.
        line: usize,
        /// The HIT as given.
        hit: Hit,
        /// Where both were found.
        scope: Scope,
    },
    /// A media index passed to an edit does not exist.
    #[error("SDP has no media description {0}")]
    NoSuchMedia(usize),
}

/// How a line ended on the wire, kept so that re-emitting is byte-exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    CrLf,
    Lf,
    /// The last line of a body that does not end in a newline.
    None,
}

impl Ending {
    fn as_str(self) -> &'static str {
        match self {
            Self::CrLf => "\r\n",
            Self::Lf => "\n",
            Self::None => "",
        }
    }
}

/// One SDP line: its type letter, its value (everything after `=`) and its ending.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    /// The raw text without the ending. Empty for a blank line (kept, never interpreted).
    text: String,
    ending: Ending,
}

impl Line {
    fn kind(&self) -> Option<char> {
        let mut c = self.text.chars();
        match (c.next(), c.next()) {
            (Some(k), Some('=')) => Some(k),
            _ => None,
        }
    }

    fn value(&self) -> &str {
        self.text.get(2..).unwrap_or("")
    }
}

/// A session description kept line by line, exactly as received.
///
/// Structure known: the session section is every line before the first `m=`; each `m=` line
/// starts a media section (RFC 8866 §5). Nothing else is interpreted here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sdp {
    lines: Vec<Line>,
}

impl Sdp {
    /// Parses SDP text. Accepts LF or CRLF endings and any line order inside a section
    /// (the draft's F1 puts `t=` before `c=` and `k=` after `a=`; real peers do the same),
    /// but requires `v=` first, an `o=` line, `<letter>=` on every non-blank line and
    /// well-formed `m=` lines.
    pub fn parse(text: &str) -> Result<Self, SdpError> {
        let mut lines = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let (raw, ending, next) = match rest.find('\n') {
                Some(i) => {
                    let raw = &rest[..i];
                    let (raw, ending) = match raw.strip_suffix('\r') {
                        Some(r) => (r, Ending::CrLf),
                        None => (raw, Ending::Lf),
                    };
                    (raw, ending, &rest[i + 1..])
                }
                None => (rest, Ending::None, ""),
            };
            lines.push(Line {
                text: raw.to_owned(),
                ending,
            });
            rest = next;
        }
        let sdp = Self { lines };
        sdp.validate()?;
        Ok(sdp)
    }

    /// Parses an SDP body given as bytes (a SIP message body).
    pub fn parse_bytes(body: &[u8]) -> Result<Self, SdpError> {
        Self::parse(std::str::from_utf8(body).map_err(|_| SdpError::NotUtf8)?)
    }

    fn validate(&self) -> Result<(), SdpError> {
        let mut non_blank = self
            .lines
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.text.is_empty());
        let Some((_, first)) = non_blank.next() else {
            return Err(SdpError::Empty);
        };
        if first.kind() != Some('v') {
            return Err(SdpError::NoVersion(first.text.clone()));
        }
        let mut seen_origin = false;
        let mut in_media = false;
        for (i, line) in self.lines.iter().enumerate() {
            if line.text.is_empty() {
                continue;
            }
            let kind = match line.kind() {
                Some(k) if k.is_ascii_alphabetic() => k,
                _ => {
                    return Err(SdpError::MalformedLine {
                        line: i + 1,
                        text: line.text.clone(),
                    });
                }
            };
            match kind {
                'o' if !in_media => seen_origin = true,
                'm' => {
                    in_media = true;
                    let parts: Vec<&str> = line.value().split_whitespace().collect();
                    let port_ok = parts.get(1).is_some_and(|p| {
                        let base = p.split('/').next().unwrap_or("");
                        base.parse::<u16>().is_ok()
                    });
                    if parts.len() < 4 || !port_ok {
                        return Err(SdpError::MalformedMedia {
                            line: i + 1,
                            text: line.text.clone(),
                        });
                    }
                }
                _ => {}
            }
        }
        if !seen_origin {
            return Err(SdpError::NoOrigin);
        }
        Ok(())
    }

    /// The exact text: `Sdp::parse(t)?.emit() == t` for every accepted `t`.
    pub fn emit(&self) -> String {
        let mut out = String::new();
        for l in &self.lines {
            out.push_str(&l.text);
            out.push_str(l.ending.as_str());
        }
        out
    }

    /// Number of media descriptions (`m=` lines).
    pub fn media_count(&self) -> usize {
        self.lines.iter().filter(|l| l.kind() == Some('m')).count()
    }

    /// The value of the `m=` line of media description `index` (e.g. `audio 3456 RTP/AVP 0`).
    pub fn media_line(&self, index: usize) -> Option<&str> {
        self.lines
            .iter()
            .filter(|l| l.kind() == Some('m'))
            .nth(index)
            .map(Line::value)
    }

    /// The values of the session-level attributes `a=<name>:<value>` (an attribute with no
    /// value gives `""`), in order.
    pub fn session_attributes<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.typed_lines()
            .filter(|(_, scope, kind, _)| *scope == Scope::Session && *kind == 'a')
            .filter_map(move |(_, _, _, v)| match v.split_once(':') {
                Some((n, value)) if n == name => Some(value),
                None if v == name => Some(""),
                _ => None,
            })
    }

    /// Appends `a=<name>:<value>` to the session section (before the first `m=`).
    pub fn push_session_attribute(&mut self, name: &str, value: &str) {
        let at = self
            .section(Scope::Session)
            .map_or(self.lines.len(), |r| r.end);
        self.insert_line(at, format!("a={name}:{value}"));
    }

    /// Line index range `[start, end)` of a scope: the session section, or media `i`
    /// (from its `m=` line up to the next `m=`).
    fn section(&self, scope: Scope) -> Option<std::ops::Range<usize>> {
        let m_lines: Vec<usize> = self
            .lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.kind() == Some('m'))
            .map(|(i, _)| i)
            .collect();
        match scope {
            Scope::Session => Some(0..m_lines.first().copied().unwrap_or(self.lines.len())),
            Scope::Media(i) => {
                let start = *m_lines.get(i)?;
                let end = m_lines.get(i + 1).copied().unwrap_or(self.lines.len());
                Some(start..end)
            }
        }
    }

    /// Iterates `(1-based line number, scope, type letter, value)` over non-blank lines.
    fn typed_lines(&self) -> impl Iterator<Item = (usize, Scope, char, &str)> {
        let mut media: Option<usize> = None;
        self.lines.iter().enumerate().filter_map(move |(i, l)| {
            let kind = l.kind()?;
            if kind == 'm' {
                media = Some(media.map_or(0, |m| m + 1));
            }
            let scope = media.map_or(Scope::Session, Scope::Media);
            Some((i + 1, scope, kind, l.value()))
        })
    }

    /// The ending used for new lines: the one the body already uses (CRLF if unsure).
    fn new_line_ending(&self) -> Ending {
        if self.lines.iter().any(|l| l.ending == Ending::Lf)
            && !self.lines.iter().any(|l| l.ending == Ending::CrLf)
        {
            Ending::Lf
        } else {
            Ending::CrLf
        }
    }

    /// Inserts `text` as a new line at line index `at`, giving a last line without a newline
    /// one first so that the new line does not run into it.
    fn insert_line(&mut self, at: usize, text: String) {
        let ending = self.new_line_ending();
        if at == self.lines.len()
            && let Some(last) = self.lines.last_mut()
            && last.ending == Ending::None
        {
            // A body cut right after the CR of a CRLF: with the LF we add, that CR ends the
            // line as a CRLF, and the line must say so, as a parse of the new text would.
            last.ending = match last.text.strip_suffix('\r') {
                Some(text) => {
                    last.text.truncate(text.len());
                    Ending::CrLf
                }
                None => ending,
            };
            self.lines.push(Line {
                text,
                ending: Ending::None,
            });
            return;
        }
        self.lines.insert(at, Line { text, ending });
    }
}

/// hip's own SDP attribute for NAT traversal (issue 13; not registered with IANA): a
/// session-level `a=hip-nat:initiate` says that its sender sits behind a NAT — its HIP runs
/// over UDP (RFC 9028) — and starts the base exchange itself once the dialog is confirmed,
/// so the peer must not send it an I1 (nothing reaches it through the NAT) but answer its
/// I1 as a responder, accepting only the HITs this same SDP carries.
///
/// It moves nothing but who sends the first packet: the exchange proves the HIT either
/// way, so a path that adds the attribute or strips it can only delay or stop HIP, as it
/// could by dropping the message.
pub const NAT_ATTRIBUTE: &str = "hip-nat";

/// Whether `sdp` carries `a=hip-nat:initiate` ([`NAT_ATTRIBUTE`]) at session level.
pub fn nat_initiator(sdp: &Sdp) -> bool {
    sdp.session_attributes(NAT_ATTRIBUTE)
        .any(|v| v.trim() == "initiate")
}

/// Adds `a=hip-nat:initiate` ([`NAT_ATTRIBUTE`]) to `sdp`'s session section, once.
pub fn mark_nat_initiator(sdp: &mut Sdp) {
    if !nat_initiator(sdp) {
        sdp.push_session_attribute(NAT_ATTRIBUTE, "initiate");
    }
}

impl std::fmt::Display for Sdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.emit())
    }
}

#[cfg(test)]
mod tests;
