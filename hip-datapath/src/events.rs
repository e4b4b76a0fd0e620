//! The datapath's event ring buffer, read from userspace.
//!
//! [`EventReader`] is synchronous (poll with [`EventReader::next_event`], block with
//! [`EventReader::wait`]); it implements `AsRawFd`/`AsFd`, so an async agent wraps it
//! in `tokio::io::unix::AsyncFd` and reads after each readiness notification.

use std::{
    io,
    net::{IpAddr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use hip_common::{EVENT_GUARD_DROP, EVENT_LOCATOR_CHANGE, Event};
use serde::Serialize;

use crate::maps::addr_to_ip;

/// An event reported by the programs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DatapathEvent {
    /// ESP for a known inbound SPI arrived from a new outer source address.
    LocatorChange {
        spi: u32,
        peer_hit: Ipv6Addr,
        old: IpAddr,
        new: IpAddr,
        ts_ns: u64,
    },
    /// The media guard dropped the first clear-text RTP packet towards `dst`.
    GuardDrop {
        src: IpAddr,
        dst: IpAddr,
        src_port: u16,
        dst_port: u16,
        ts_ns: u64,
    },
    /// A record this version does not know (a newer object file).
    Unknown { code: u32 },
}

impl DatapathEvent {
    /// Decodes one ring-buffer record; `None` if it is too short to be an [`Event`].
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<Event>() {
            return None;
        }
        // SAFETY: `Event` is `repr(C)` of integers/byte arrays (every bit pattern is
        // valid); the read is unaligned-safe and bounded by the length check.
        let e: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        Some(match e.kind {
            EVENT_LOCATOR_CHANGE => Self::LocatorChange {
                spi: e.spi,
                peer_hit: Ipv6Addr::from(e.peer_hit.0),
                old: addr_to_ip(e.old_addr),
                new: addr_to_ip(e.new_addr),
                ts_ns: e.ts_ns,
            },
            EVENT_GUARD_DROP => Self::GuardDrop {
                src: addr_to_ip(e.old_addr),
                dst: addr_to_ip(e.new_addr),
                src_port: e.src_port,
                dst_port: e.dst_port,
                ts_ns: e.ts_ns,
            },
            code => Self::Unknown { code },
        })
    }
}

/// Reads [`DatapathEvent`]s from the `HIP_EVENTS` ring buffer.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// The next event, if one is waiting (never blocks).
    pub fn next_event(&mut self) -> Option<DatapathEvent> {
        loop {
            let item = self.ring.next()?;
            if let Some(ev) = DatapathEvent::decode(&item) {
                return Some(ev);
            }
        }
    }

    /// Blocks up to `timeout` until the ring buffer has data; `Ok(false)` on timeout.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        match r {
            -1 => Err(io::Error::last_os_error()),
            0 => Ok(false),
            _ => Ok(true),
        }
    }

    /// Drains every waiting event.
    pub fn drain(&mut self) -> Vec<DatapathEvent> {
        std::iter::from_fn(|| self.next_event()).collect()
    }
}

impl AsRawFd for EventReader {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

impl AsFd for EventReader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hip_common::Addr;

    #[test]
    fn decodes_locator_change_and_rejects_short() {
        let e = Event {
            kind: EVENT_LOCATOR_CHANGE,
            spi: 0x1234,
            ts_ns: 5,
            peer_hit: Addr("2001:20::b".parse::<Ipv6Addr>().unwrap().octets()),
            old_addr: Addr::from_v4([192, 0, 2, 1]),
            new_addr: Addr::from_v4([192, 0, 2, 9]),
            ..Event::default()
        };
        // SAFETY: plain-old-data view of a repr(C) struct without padding.
        let bytes = unsafe {
            std::slice::from_raw_parts((&e as *const Event).cast::<u8>(), size_of::<Event>())
        };
        assert_eq!(
            DatapathEvent::decode(bytes),
            Some(DatapathEvent::LocatorChange {
                spi: 0x1234,
                peer_hit: "2001:20::b".parse().unwrap(),
                old: "192.0.2.1".parse().unwrap(),
                new: "192.0.2.9".parse().unwrap(),
                ts_ns: 5,
            })
        );
        assert_eq!(DatapathEvent::decode(&bytes[..10]), None);
    }
}
