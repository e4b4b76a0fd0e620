//! The known-HITs pool (draft §3.3: "The exchanged HITs are now placed in the pool of known
//! HITs at both end hosts. As such there is also a binding established between URI and HIT").
//!
//! One entry per peer SIP URI, replaced by the newest confirmed call with that peer. HIP
//! later looks the expected peer HIT up here. Persisted as JSON, written atomically
//! (temporary file, fsync, rename) so that a crash leaves the old or the new file, never
//! half of one.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use hip_sip::sdp::{Form, Hit, Scope};
use serde::{Deserialize, Serialize};

/// Errors of the pool store.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Reading or writing the file failed.
    #[error("pool file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a pool (it is left untouched; the agent refuses to start).
    #[error("pool file {path} is corrupt: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        message: String,
    },
}

/// One identity learned from the peer's SDP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedIdentity {
    /// The HIT (given, or derived from the HI).
    pub hit: Hit,
    /// The HI, base64 as it was sent (2-octet algorithm + HOST_ID HI field), if sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hi: Option<String>,
    /// Media description index it applies to, or `None` for session level.
    pub media: Option<usize>,
    /// `k` or `key-mgmt`.
    pub form: Form,
}

/// What we know about one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolEntry {
    /// The peer's SIP URI (From of its INVITE, or To of ours).
    pub peer_uri: String,
    /// Every identity it sent in the call that confirmed the binding.
    pub identities: Vec<LearnedIdentity>,
    /// That call's Call-ID.
    pub call_id: String,
    /// Seconds since the Unix epoch when the dialog was confirmed.
    pub learned_at: u64,
}

impl PoolEntry {
    /// Distinct HITs, in SDP order.
    pub fn hits(&self) -> Vec<Hit> {
        let mut v: Vec<Hit> = Vec::new();
        for i in &self.identities {
            if !v.contains(&i.hit) {
                v.push(i.hit);
            }
        }
        v
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    entries: Vec<PoolEntry>,
}

/// The pool, with its file.
#[derive(Debug)]
pub struct Pool {
    path: PathBuf,
    entries: BTreeMap<String, PoolEntry>,
    dirty: bool,
}

/// Seconds since the epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Pool {
    /// Opens the pool at `path`; a missing file is an empty pool.
    pub fn open(path: &Path) -> Result<Self, PoolError> {
        let entries = match std::fs::read(path) {
            Ok(bytes) => {
                let f: FileFormat =
                    serde_json::from_slice(&bytes).map_err(|e| PoolError::Corrupt {
                        path: path.to_owned(),
                        message: e.to_string(),
                    })?;
                f.entries
                    .into_iter()
                    .map(|e| (e.peer_uri.clone(), e))
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(PoolError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Ok(Self {
            path: path.to_owned(),
            entries,
            dirty: false,
        })
    }

    /// Records (or replaces) the binding for `entry.peer_uri`.
    pub fn learn(&mut self, entry: PoolEntry) {
        self.entries.insert(entry.peer_uri.clone(), entry);
        self.dirty = true;
    }

    /// The binding for a peer URI.
    pub fn get(&self, peer_uri: &str) -> Option<&PoolEntry> {
        self.entries.get(peer_uri)
    }

    /// The HITs HIP should expect from `peer_uri`.
    pub fn expected_hits(&self, peer_uri: &str) -> Vec<Hit> {
        self.get(peer_uri).map(PoolEntry::hits).unwrap_or_default()
    }

    /// Which peer a HIT belongs to.
    pub fn peer_of(&self, hit: &Hit) -> Option<&PoolEntry> {
        self.entries
            .values()
            .find(|e| e.identities.iter().any(|i| &i.hit == hit))
    }

    /// The SIP URI a HIT (as an IPv6 address, e.g. an XFRM selector) is bound to.
    pub fn peer_uri(&self, hit: &std::net::Ipv6Addr) -> Option<String> {
        self.peer_of(&Hit(hit.octets())).map(|e| e.peer_uri.clone())
    }

    /// All entries, by URI.
    pub fn entries(&self) -> impl Iterator<Item = &PoolEntry> {
        self.entries.values()
    }

    /// Whether there are changes not yet on disk.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Writes the pool if it changed: temp file in the same directory, fsync, rename.
    pub fn flush(&mut self) -> Result<(), PoolError> {
        if !self.dirty {
            return Ok(());
        }
        let io = |source| PoolError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = FileFormat {
            version: 1,
            entries: self.entries.values().cloned().collect(),
        };
        let data = serde_json::to_vec_pretty(&file).map_err(|e| io(std::io::Error::other(e)))?;
        let tmp = self
            .path
            .with_extension(format!("tmp.{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&data).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        self.dirty = false;
        Ok(())
    }
}

/// Builds the pool entry for a peer from identities found in its SDP.
pub fn entry_from_sdp(
    peer_uri: &str,
    call_id: &str,
    found: &[hip_sip::sdp::IdentityEntry],
) -> PoolEntry {
    use base64::Engine as _;
    PoolEntry {
        peer_uri: peer_uri.to_owned(),
        call_id: call_id.to_owned(),
        learned_at: unix_now(),
        identities: found
            .iter()
            .map(|e| LearnedIdentity {
                hit: e.hit,
                hi: e
                    .hi
                    .as_ref()
                    .map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
                media: match e.scope {
                    Scope::Session => None,
                    Scope::Media(i) => Some(i),
                },
                form: e.form,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(uri: &str, hit: &str, call: &str) -> PoolEntry {
        PoolEntry {
            peer_uri: uri.into(),
            identities: vec![LearnedIdentity {
                hit: hit.parse().unwrap(),
                hi: None,
                media: Some(0),
                form: Form::K,
            }],
            call_id: call.into(),
            learned_at: 1,
        }
    }

    #[test]
    fn survives_a_restart_and_newest_binding_wins() {
        let dir = std::env::temp_dir().join(format!("hip-pool-{}", std::process::id()));
        let path = dir.join("pool.json");
        let _ = std::fs::remove_dir_all(&dir);
        let mut p = Pool::open(&path).unwrap();
        assert_eq!(p.entries().count(), 0);
        p.learn(entry(
            "sip:bob@biloxi.com",
            "44A5C522D7EDEDF962E55A0677DB1346",
            "c1",
        ));
        p.learn(entry("sip:carol@chicago.com", "2001:20::c", "c2"));
        p.flush().unwrap();
        assert!(!p.is_dirty());
        let mut q = Pool::open(&path).unwrap();
        assert_eq!(
            q.expected_hits("sip:bob@biloxi.com"),
            vec!["44A5C522D7EDEDF962E55A0677DB1346".parse().unwrap()]
        );
        assert_eq!(
            q.peer_of(&"2001:20::c".parse().unwrap()).unwrap().peer_uri,
            "sip:carol@chicago.com"
        );
        q.learn(entry("sip:bob@biloxi.com", "2001:20::b", "c3"));
        q.flush().unwrap();
        let r = Pool::open(&path).unwrap();
        assert_eq!(r.get("sip:bob@biloxi.com").unwrap().call_id, "c3");
        assert_eq!(r.entries().count(), 2);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("pool.json")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_an_error_and_is_left_alone() {
        let path = std::env::temp_dir().join(format!("hip-pool-bad-{}.json", std::process::id()));
        std::fs::write(&path, b"{not json").unwrap();
        let e = Pool::open(&path).unwrap_err();
        assert!(matches!(e, PoolError::Corrupt { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"{not json");
        std::fs::remove_file(&path).unwrap();
    }
}
