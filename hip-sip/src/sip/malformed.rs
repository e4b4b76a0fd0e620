//! Answering requests that the parser refuses.
//!
//! RFC 3261 §8.2 / §18.3 / §21.4.1 say a UAS answers a malformed request with 400 (Bad
//! Request), but a response can only be routed and matched if the request's Via, From, To,
//! Call-ID and CSeq can be copied (§8.2.6.2). `sipx-sip` refuses the whole message on a
//! start-line or framing error, so this scans the raw header section leniently for those
//! five and builds the 400 from their raw values. Anything else — responses (§18.1.2:
//! malformed responses are discarded), ACKs (never answered, §17.2.1), bytes without those
//! headers — is dropped. Written by hand: no crate does this lenient copy.

/// The raw header rows a response needs, unfolded.
#[derive(Debug, Default)]
struct Needed {
    via: Vec<Vec<u8>>,
    from: Option<Vec<u8>>,
    to: Option<Vec<u8>>,
    call_id: Option<Vec<u8>>,
    cseq: Option<Vec<u8>>,
}

fn is_name(name: &[u8], long: &str, compact: Option<u8>) -> bool {
    name.eq_ignore_ascii_case(long.as_bytes())
        || (name.len() == 1 && compact.is_some_and(|c| name[0].eq_ignore_ascii_case(&c)))
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t' | b'\r'] = v {
        v = rest;
    }
    v
}

/// Builds `SIP/2.0 <status> <reason>` for a request that did not parse, or `None` when no
/// response can be built (then the input is dropped). `to_tag` is added to To if it has none.
pub(crate) fn error_response(
    raw: &[u8],
    status: u16,
    reason: &str,
    to_tag: &str,
    warning: &str,
) -> Option<Vec<u8>> {
    let head_end = find(raw, b"\r\n\r\n")
        .or_else(|| find(raw, b"\n\n"))
        .unwrap_or(raw.len());
    let head = &raw[..head_end];
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let start = lines.next()?;
    // A response (status line) or an ACK is never answered.
    let method = start.split(|&b| b == b' ').next()?;
    if start.starts_with(b"SIP/") || method.is_empty() || method == b"ACK" {
        return None;
    }
    // Unfold continuation lines (RFC 3261 §7.3.1) into logical header rows.
    let mut rows: Vec<Vec<u8>> = Vec::new();
    for l in lines {
        if matches!(l.first(), Some(b' ' | b'\t')) {
            if let Some(last) = rows.last_mut() {
                last.push(b' ');
                last.extend_from_slice(trim(l));
            }
            continue;
        }
        rows.push(l.to_vec());
    }
    let mut n = Needed::default();
    for row in &rows {
        let Some(colon) = row.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = trim(&row[..colon]);
        let value = trim(&row[colon + 1..]).to_vec();
        if value.is_empty() || value.iter().any(|&b| b == 0 || b == b'\r') {
            continue;
        }
        if is_name(name, "Via", Some(b'v')) {
            n.via.push(value);
        } else if is_name(name, "From", Some(b'f')) {
            n.from.get_or_insert(value);
        } else if is_name(name, "To", Some(b't')) {
            n.to.get_or_insert(value);
        } else if is_name(name, "Call-ID", Some(b'i')) {
            n.call_id.get_or_insert(value);
        } else if is_name(name, "CSeq", None) {
            n.cseq.get_or_insert(value);
        }
    }
    let (from, mut to, call_id, cseq) = (n.from?, n.to?, n.call_id?, n.cseq?);
    if n.via.is_empty() {
        return None;
    }
    if !to.windows(4).any(|w| w.eq_ignore_ascii_case(b"tag=")) {
        to.extend_from_slice(format!(";tag={to_tag}").as_bytes());
    }
    let mut out = format!("SIP/2.0 {status} {reason}\r\n").into_bytes();
    for v in &n.via {
        out.extend_from_slice(b"Via: ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    for (name, v) in [
        ("From", &from),
        ("To", &to),
        ("Call-ID", &call_id),
        ("CSeq", &cseq),
    ] {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    // RFC 3261 §20.43: 399 = miscellaneous warning; the text says what was wrong.
    let warning: String = warning
        .chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
        .take(120)
        .collect();
    out.extend_from_slice(
        format!("Warning: 399 hip-agent \"{warning}\"\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    );
    Some(out)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
