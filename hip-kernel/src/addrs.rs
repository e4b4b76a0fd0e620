//! Local address changes, for HIP mobility (RFC 8046): the agent follows the host's
//! addresses and tells its peers with an UPDATE carrying a LOCATOR_SET when the one an
//! association uses goes away (`ip monitor address`, `RTM_NEWADDR` / `RTM_DELADDR`).

use std::net::IpAddr;

use futures::{StreamExt, channel::mpsc::UnboundedReceiver};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::{
    MulticastGroup,
    packet_route::{RouteNetlinkMessage, address::AddressAttribute},
};
use tokio::task::JoinHandle;

use crate::XfrmError;

/// One change of the host's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressEvent {
    /// An address was added (or changed).
    Added(IpAddr),
    /// An address was removed.
    Removed(IpAddr),
}

/// A subscription to the kernel's address notifications in the current network
/// namespace (its own socket, bound to the `IPV4_IFADDR` and `IPV6_IFADDR` groups).
#[derive(Debug)]
pub struct AddressEvents {
    rx: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, netlink_sys::SocketAddr)>,
    task: JoinHandle<()>,
}

impl Drop for AddressEvents {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AddressEvents {
    /// Subscribes (inside a tokio runtime).
    pub fn subscribe() -> Result<Self, XfrmError> {
        let (conn, _handle, rx) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Ifaddr,
        ])
        .map_err(XfrmError::Socket)?;
        let task = tokio::spawn(conn);
        Ok(Self { rx, task })
    }

    /// The next address change; `None` once the socket is gone.
    pub async fn next(&mut self) -> Option<AddressEvent> {
        loop {
            let (m, _) = self.rx.next().await?;
            if let Some(e) = event(&m) {
                return Some(e);
            }
        }
    }
}

/// The address event a netlink message carries, if any (pure, for tests).
pub fn event(m: &NetlinkMessage<RouteNetlinkMessage>) -> Option<AddressEvent> {
    let NetlinkPayload::InnerMessage(inner) = &m.payload else {
        return None;
    };
    let (msg, added) = match inner {
        RouteNetlinkMessage::NewAddress(a) => (a, true),
        RouteNetlinkMessage::DelAddress(a) => (a, false),
        _ => return None,
    };
    // IFA_LOCAL is the local address on point-to-point links, IFA_ADDRESS otherwise.
    let addr = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        })
        .or_else(|| {
            msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        })?;
    Some(if added {
        AddressEvent::Added(addr)
    } else {
        AddressEvent::Removed(addr)
    })
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::address::AddressMessage;

    use super::*;

    fn msg(new: bool, attrs: Vec<AddressAttribute>) -> NetlinkMessage<RouteNetlinkMessage> {
        let mut a = AddressMessage::default();
        a.attributes = attrs;
        let inner = if new {
            RouteNetlinkMessage::NewAddress(a)
        } else {
            RouteNetlinkMessage::DelAddress(a)
        };
        NetlinkMessage::from(inner)
    }

    #[test]
    fn address_messages_become_events() {
        let ip: IpAddr = "192.0.2.11".parse().unwrap();
        assert_eq!(
            event(&msg(true, vec![AddressAttribute::Address(ip)])),
            Some(AddressEvent::Added(ip))
        );
        assert_eq!(
            event(&msg(false, vec![AddressAttribute::Address(ip)])),
            Some(AddressEvent::Removed(ip))
        );
        // IFA_LOCAL wins over IFA_ADDRESS (the peer's address on point-to-point links).
        let peer: IpAddr = "192.0.2.99".parse().unwrap();
        assert_eq!(
            event(&msg(
                true,
                vec![AddressAttribute::Address(peer), AddressAttribute::Local(ip)]
            )),
            Some(AddressEvent::Added(ip))
        );
        assert_eq!(event(&msg(true, vec![])), None);
    }
}
