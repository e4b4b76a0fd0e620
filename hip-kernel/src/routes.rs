//! rtnetlink helpers that make HITs routable (`ip addr add HIT/128 dev lo`,
//! `ip route add PEER_HIT/128 via … dev … src HIT`), with `rtnetlink`.
//!
//! BEET mode needs a route for the *inner* destination: the kernel looks it up first,
//! then the XFRM policy transforms the packet and the outer (locator) addresses are
//! routed on their own. The route's `src` makes sockets that do not bind pick the local
//! HIT as source, so their traffic matches the HIT-to-HIT policy.

use std::net::{IpAddr, Ipv6Addr};

use futures::TryStreamExt;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::route::{RouteAddress, RouteAttribute},
};
use tokio::task::JoinHandle;

use crate::XfrmError;

/// rtnetlink in the network namespace of the thread that created it.
#[derive(Debug)]
pub struct HitRoutes {
    handle: Handle,
    task: JoinHandle<()>,
}

impl Drop for HitRoutes {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn rt_err(op: String, e: rtnetlink::Error) -> XfrmError {
    match e {
        rtnetlink::Error::NetlinkError(m) => match m.code {
            Some(c) => XfrmError::kernel(op, -c.get()),
            None => XfrmError::UnexpectedReply {
                op,
                detail: "empty error".into(),
            },
        },
        other => XfrmError::UnexpectedReply {
            op,
            detail: other.to_string(),
        },
    }
}

impl HitRoutes {
    /// Opens the rtnetlink socket (inside a tokio runtime).
    pub fn new() -> Result<Self, XfrmError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(XfrmError::Socket)?;
        let task = tokio::spawn(conn);
        Ok(Self { handle, task })
    }

    async fn link_index(&self, name: &str) -> Result<u32, XfrmError> {
        let op = || format!("find link {name}");
        let link = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_next()
            .await
            .map_err(|e| rt_err(op(), e))?;
        link.map(|l| l.header.index)
            .ok_or_else(|| XfrmError::kernel(op(), libc::ENODEV))
    }

    /// Puts `hit` on `lo` as a /128 (idempotent: an existing address is replaced).
    pub async fn add_local_hit(&self, hit: Ipv6Addr) -> Result<(), XfrmError> {
        let lo = self.link_index("lo").await?;
        self.handle
            .address()
            .add(lo, IpAddr::V6(hit), 128)
            .replace()
            .execute()
            .await
            .map_err(|e| rt_err(format!("add address {hit}/128 dev lo"), e))
    }

    /// Removes `hit` from `lo`; `Ok(false)` if it was not there.
    pub async fn del_local_hit(&self, hit: Ipv6Addr) -> Result<bool, XfrmError> {
        let lo = self.link_index("lo").await?;
        let op = || format!("delete address {hit}/128 dev lo");
        let found = self
            .handle
            .address()
            .get()
            .set_link_index_filter(lo)
            .set_address_filter(IpAddr::V6(hit))
            .execute()
            .try_next()
            .await
            .map_err(|e| rt_err(op(), e))?;
        let Some(msg) = found else {
            return Ok(false);
        };
        self.handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(|e| rt_err(op(), e))?;
        Ok(true)
    }

    /// Routes `peer_hit`/128 the way the kernel routes `peer_locator` (same device; for
    /// an IPv6 locator the locator's gateway, or the locator itself if on-link), with
    /// `local_hit` as preferred source. Replaces an existing route.
    pub async fn add_peer_route(
        &self,
        peer_hit: Ipv6Addr,
        local_hit: Ipv6Addr,
        peer_locator: IpAddr,
    ) -> Result<(), XfrmError> {
        let op = || format!("add route {peer_hit}/128 src {local_hit} (towards {peer_locator})");
        let query = match peer_locator {
            IpAddr::V4(a) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        let to_loc = self
            .handle
            .route()
            .get(query)
            .execute()
            .try_next()
            .await
            .map_err(|e| rt_err(op(), e))?
            .ok_or_else(|| XfrmError::kernel(op(), libc::ENETUNREACH))?;
        let mut oif = None;
        let mut gw = None;
        for a in &to_loc.attributes {
            match a {
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gw = Some(*g),
                _ => {}
            }
        }
        let oif = oif.ok_or_else(|| XfrmError::kernel(op(), libc::ENETUNREACH))?;
        let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(peer_hit, 128)
            .pref_source(local_hit)
            .output_interface(oif);
        match (gw, peer_locator) {
            (Some(g), _) => b = b.gateway(g),
            (None, IpAddr::V6(l)) => b = b.gateway(l),
            // An IPv4 locator cannot be an IPv6 next hop: a device route suffices, the
            // outer packet is routed by its own (IPv4) lookup after XFRM.
            (None, IpAddr::V4(_)) => {}
        }
        self.handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(|e| rt_err(op(), e))
    }

    /// Deletes the route to `peer_hit`/128; `Ok(false)` if there was none.
    pub async fn del_peer_route(&self, peer_hit: Ipv6Addr) -> Result<bool, XfrmError> {
        let msg = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(peer_hit, 128)
            .build();
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) => match rt_err(format!("delete route {peer_hit}/128"), e) {
                e if matches!(e.errno(), Some(libc::ESRCH | libc::ENOENT)) => Ok(false),
                e => Err(e),
            },
        }
    }
}
