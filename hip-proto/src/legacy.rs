//! Legacy identities: the Boeing HIP implementation's XML `<host_identity>` format (as
//! reproduced in section 3.3 of draft-tschofenig-hiprg-host-identities-05) and the
//! pre-ORCHID HIT of a DSA identity.
//!
//! Which legacy HIT rule the draft used was found by trying the candidates against the
//! draft's own examples: the early HIP base drafts' "type 1" HIT — the prefix bits `01`
//! followed by the low-order 126 bits of SHA-1 over the DSA public key in RFC 2536 form
//! (T, Q, P, G, Y) — reproduces Bob's declared HIT 44A5C522D7EDEDF962E55A0677DB1346.
//! Also tried without success: RFC 4843 ORCHIDv1 (its prefix 2001:10::/28 cannot yield
//! either declared HIT), SHA-1 over DNSKEY-style RDATA (flags/protocol/algorithm
//! header) and over the HIPv1 HOST_ID contents, the high-order bits instead of the low
//! ones, and SHA-256. Alice's example cannot be checked at all: her P, G and PUB carry 253
//! hex digits where a 128-octet key needs 256 (digits were lost when the draft was
//! typeset), so importing her entry reports an error naming the field.

use sha1::{Digest, Sha1};

use crate::{hit::Hit, identity::IdentityError};

/// One `<host_identity>` element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmlIdentity {
    /// `<name>`.
    pub name: String,
    /// The `alg` attribute (e.g. "DSA", "RSA").
    pub algorithm: String,
    /// The `<HIT>` element, if present.
    pub hit_declared: Option<Hit>,
    /// The public key, when it could be decoded.
    pub key: Result<LegacyKey, String>,
}

/// A decoded legacy public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegacyKey {
    /// DSA public key (RFC 2536 components, big-endian).
    Dsa {
        /// Prime modulus.
        p: Vec<u8>,
        /// Subgroup order (160 bits).
        q: Vec<u8>,
        /// Generator.
        g: Vec<u8>,
        /// Public value.
        y: Vec<u8>,
    },
    /// An algorithm whose legacy HIT is not computed here (named by the `alg` attribute).
    Other(String),
}

impl LegacyKey {
    /// The legacy (pre-ORCHID, "type 1") HIT: `01` ‖ low 126 bits of SHA-1(RFC 2536 key).
    pub fn legacy_hit(&self) -> Option<Hit> {
        let LegacyKey::Dsa { p, q, g, y } = self else {
            return None;
        };
        let rdata = dsa_rfc2536(p, q, g, y)?;
        let d = Sha1::digest(&rdata);
        let mut h = [0u8; 16];
        h.copy_from_slice(&d[4..20]);
        h[0] = (h[0] & 0x3f) | 0x40;
        Some(Hit(h))
    }
}

/// RFC 2536 §2: T (1 octet), Q (20), P, G, Y (64 + 8T octets each).
fn dsa_rfc2536(p: &[u8], q: &[u8], g: &[u8], y: &[u8]) -> Option<Vec<u8>> {
    let len = p.len();
    if !(64..=128).contains(&len) || !(len - 64).is_multiple_of(8) || q.len() > 20 {
        return None;
    }
    if g.len() > len || y.len() > len {
        return None;
    }
    let t = ((len - 64) / 8) as u8;
    let mut v = vec![t];
    for (x, w) in [(q, 20), (p, len), (g, len), (y, len)] {
        v.extend(std::iter::repeat_n(0u8, w - x.len()));
        v.extend_from_slice(x);
    }
    Some(v)
}

/// Parses every `<host_identity>` element in `xml`. The document may be a Boeing
/// `my_host_identities.xml` (one root element) or a bare sequence of `<host_identity>`
/// elements, as printed in the draft.
///
/// Structural errors (not XML, no identity, a missing `<name>`/`<HIT>`/key field) fail the
/// whole import with the field named; a key field that does not decode (odd number of hex
/// digits, a non-hex character, a size RFC 2536 does not allow) is reported per identity
/// in [`XmlIdentity::key`], so one damaged entry does not hide the others.
pub fn parse_host_identities(xml: &str) -> Result<Vec<XmlIdentity>, IdentityError> {
    let wrapped;
    let doc = match roxmltree::Document::parse(xml) {
        Ok(d) => d,
        Err(_) => {
            // A bare sequence of elements has no single root: wrap it.
            let body = xml
                .trim_start()
                .strip_prefix("<?xml")
                .and_then(|r| r.split_once("?>").map(|(_, b)| b))
                .unwrap_or(xml);
            wrapped = format!("<hip_identities>{body}</hip_identities>");
            roxmltree::Document::parse(&wrapped)
                .map_err(|e| IdentityError::Xml(format!("not well-formed XML: {e}")))?
        }
    };
    let mut out = Vec::new();
    for (i, node) in doc
        .descendants()
        .filter(|n| n.has_tag_name("host_identity"))
        .enumerate()
    {
        let child = |tag: &str| {
            node.children().find(|c| c.has_tag_name(tag)).map(|c| {
                c.text()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect::<String>()
            })
        };
        let name = child("name").ok_or_else(|| {
            IdentityError::Xml(format!("host_identity #{}: missing <name>", i + 1))
        })?;
        let who = format!("host_identity {name:?}");
        let algorithm = node
            .attribute("alg")
            .ok_or_else(|| IdentityError::Xml(format!("{who}: missing attribute alg")))?
            .to_owned();
        let hit_declared = match child("HIT") {
            None => None,
            Some(h) => Some(h.parse::<Hit>().map_err(|_| {
                IdentityError::Xml(format!("{who}: field <HIT>: {h:?} is not 32 hex digits"))
            })?),
        };
        let key = if algorithm.eq_ignore_ascii_case("DSA") {
            let mut fields = Vec::new();
            for tag in ["P", "Q", "G", "PUB"] {
                let text = child(tag)
                    .ok_or_else(|| IdentityError::Xml(format!("{who}: missing <{tag}>")))?;
                fields.push((tag, text));
            }
            decode_dsa(&fields)
        } else {
            Ok(LegacyKey::Other(algorithm.clone()))
        };
        out.push(XmlIdentity {
            name,
            algorithm,
            hit_declared,
            key,
        });
    }
    if out.is_empty() {
        return Err(IdentityError::Xml("no <host_identity> element".into()));
    }
    Ok(out)
}

fn decode_dsa(fields: &[(&str, String)]) -> Result<LegacyKey, String> {
    let mut v = Vec::new();
    for (tag, text) in fields {
        if !text.len().is_multiple_of(2) {
            return Err(format!(
                "field <{tag}>: odd number of hex digits ({})",
                text.len()
            ));
        }
        let bytes = hex::decode(text).map_err(|e| format!("field <{tag}>: {e}"))?;
        v.push(bytes);
    }
    let [p, q, g, y] = <[Vec<u8>; 4]>::try_from(v).expect("four fields");
    if dsa_rfc2536(&p, &q, &g, &y).is_none() {
        return Err(format!(
            "field <P>: {} octets is not a DSA size RFC 2536 allows (64 + 8T, T <= 8), or \
             <Q>/<G>/<PUB> is longer than allowed",
            p.len()
        ));
    }
    Ok(LegacyKey::Dsa { p, q, g, y })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two identities of the draft's section 3.3, as printed.
    pub(crate) const DRAFT_XML: &str = include_str!("../tests/data/draft-host-identities.xml");

    #[test]
    fn draft_identities() {
        let ids = parse_host_identities(DRAFT_XML).unwrap();
        assert_eq!(ids.len(), 2);
        let alice = &ids[0];
        assert_eq!(alice.name, "sip:alice@atlanta.com");
        assert_eq!(alice.algorithm, "DSA");
        assert_eq!(
            alice.hit_declared.unwrap().to_hex32(),
            "7214148E0433AFE2FA2D48003D31172E"
        );
        let err = alice.key.as_ref().unwrap_err();
        assert!(err.contains("<P>") && err.contains("odd"), "{err}");
        let bob = &ids[1];
        let hit = bob.key.as_ref().unwrap().legacy_hit().unwrap();
        assert_eq!(hit, bob.hit_declared.unwrap());
        assert_eq!(hit.to_hex32(), "44A5C522D7EDEDF962E55A0677DB1346");
    }

    #[test]
    fn a_changed_key_changes_the_hit() {
        let xml = DRAFT_XML.replace("E481C20D8FBAA84F", "E481C20D8FBAA84E");
        let ids = parse_host_identities(&xml).unwrap();
        let bob = &ids[1];
        assert_ne!(bob.key.as_ref().unwrap().legacy_hit(), bob.hit_declared);
    }

    #[test]
    fn malformed_inputs_name_the_field() {
        let e =
            parse_host_identities("<a><host_identity alg=\"DSA\"><P>00</P></host_identity></a>")
                .unwrap_err()
                .to_string();
        assert!(e.contains("<name>"), "{e}");
        let e = parse_host_identities(
            "<host_identity alg=\"DSA\"><name>x</name><P>00</P><Q>00</Q><G>00</G></host_identity>",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("<PUB>"), "{e}");
        let e = parse_host_identities(
            "<host_identity alg=\"DSA\"><name>x</name><HIT>12</HIT></host_identity>",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("<HIT>"), "{e}");
        let ids = parse_host_identities(
            "<host_identity alg=\"DSA\"><name>x</name><P>0G</P><Q>00</Q><G>00</G><PUB>00</PUB></host_identity>",
        )
        .unwrap();
        assert!(ids[0].key.as_ref().unwrap_err().contains("<P>"));
        assert!(parse_host_identities("not xml <<").is_err());
        assert!(parse_host_identities("<a/>").is_err());
    }
}
