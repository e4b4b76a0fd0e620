//! hip's kernel IPsec control plane: BEET-mode ESP SAs and XFRM policies over netlink.
//!
//! When a HIP base exchange completes, the kernel carries the traffic: two ESP SAs in
//! BEET mode (RFC 7402; inner addresses are the HITs, outer ones the locators) and the
//! policies that send HIT-to-HIT traffic through them. This crate is that control plane:
//!
//! * [`KernelIpsec`]: a small interface in the spirit of strongSwan's `kernel_ipsec.h`
//!   (allocate an SPI, add/update/delete an SA, add/delete a policy, list what hip owns,
//!   subscribe to kernel events), with typed parameters ([`SaParams`], [`PolicyParams`],
//!   [`EspTransform`], [`EspKeys`], [`Lifetimes`], [`UdpEncap`]…);
//! * [`XfrmNetlink`]: its implementation over `NETLINK_XFRM` with `netlink-packet-xfrm`;
//! * [`install_association`] / [`remove_association`] / [`rekey_association`] /
//!   [`reconcile`]: the unit the agent works with, one HIP association at a time, ordered
//!   so that no clear-text window opens ([`FailClosed`]);
//! * [`HitRoutes`]: rtnetlink helpers that put local HITs on `lo` and route peer HITs;
//! * `memory` (feature `memory`): an in-memory [`KernelIpsec`] that logs operations and
//!   injects failures, so the sequences above are tested without a kernel;
//! * [`owner`]: how hip's objects are recognised (reqid and priority ranges), so that
//!   installs are upserts, a restart reconciles, and foreign objects are never touched.
//!
//! On a kernel without ESP (the development host) SA installation fails with
//! [`XfrmError::NoEspSupport`] and the association's other objects are rolled back.

use std::future::Future;

use futures::{StreamExt, channel::mpsc::UnboundedReceiver};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_xfrm::XfrmMessage;
use netlink_proto::sys::SocketAddr;
use tokio::task::JoinHandle;

mod addrs;
mod assoc;
pub mod bench;
mod error;
#[cfg(any(test, feature = "memory"))]
pub mod memory;
#[cfg(test)]
mod memory_tests;
mod msg;
mod netlink;
pub mod owner;
mod routes;
mod types;

pub use addrs::{AddressEvent, AddressEvents};
pub use assoc::{
    AssociationParams, FailClosed, Guard, ReconcileReport, ReqidPool, install_association,
    install_associations, install_guard, reconcile, rekey_association, remove_association,
    remove_guard,
};
pub use error::{XfrmError, errno_text};
pub use netlink::XfrmNetlink;
pub use routes::HitRoutes;
pub use types::{
    EspKeyPair, EspKeys, EspTransform, HitPair, KernelEvent, LEGACY_REPLAY_WINDOW, Lifetimes,
    LocatorPair, MAX_REPLAY_WINDOW, Owned, PolicyAction, PolicyDir, PolicyEntry, PolicyId,
    PolicyParams, Prefix, Reqid, SaEntry, SaId, SaParams, Spi, UdpEncap,
};

/// The kernel's IPsec database as hip uses it.
///
/// Every mutating call acts only on hip's objects (see [`owner`]): it fails with
/// [`XfrmError::ForeignConflict`] rather than change someone else's. Adds are upserts.
pub trait KernelIpsec: Send + Sync {
    /// Reserves an SPI for an inbound SA from `locators.src` (peer) to `locators.dst`
    /// (us) (`XFRM_MSG_ALLOCSPI`). The kernel keeps a larval SA with that SPI for 30 s
    /// (`XFRM_ACQ_EXPIRES`) unless [`KernelIpsec::add_sa`] completes it.
    fn alloc_spi(
        &self,
        locators: LocatorPair,
        reqid: Reqid,
    ) -> impl Future<Output = Result<Spi, XfrmError>> + Send;

    /// Installs an SA, or brings hip's SA with the same (destination, SPI) to `sa`
    /// (completing a larval one, refreshing lifetimes, or replacing different keys).
    fn add_sa(&self, sa: &SaParams) -> impl Future<Output = Result<(), XfrmError>> + Send;

    /// Updates an existing hip SA in place (`XFRM_MSG_UPDSA`: lifetimes and the UDP
    /// encapsulation's ports; the kernel does not change keys this way — rekeying uses new
    /// SPIs, RFC 7402 §6.9). Adding or removing UDP encapsulation is refused with `EINVAL`,
    /// as the kernel refuses it ([`KernelIpsec::move_sa`] does it).
    fn update_sa(&self, sa: &SaParams) -> impl Future<Output = Result<(), XfrmError>> + Send;

    /// Moves hip's SA `old` to `new`: the same SPI and keys at new outer addresses (an
    /// RFC 8046 locator change) or UDP ports (a NAT rebinding, RFC 9028), or with UDP
    /// encapsulation added or removed. The new SA continues the old one's sequence
    /// numbers and replay window, so no ESP sequence number is sent twice under its keys
    /// and no packet received before is accepted again.
    ///
    /// When only the encapsulation's ports change (same addresses, SPI and encapsulated
    /// before and after) the SA is updated in place (`XFRM_MSG_UPDSA`), which keeps its
    /// state whole and leaves no gap; otherwise it is re-added with the old one's replay
    /// state and the old one deleted (the kernel's update can neither change addresses
    /// nor add or remove encapsulation).
    fn move_sa(
        &self,
        old: &SaId,
        new: &SaParams,
    ) -> impl Future<Output = Result<(), XfrmError>> + Send;

    /// Deletes hip's SA; `Ok(false)` if there was none.
    fn del_sa(&self, id: &SaId) -> impl Future<Output = Result<bool, XfrmError>> + Send;

    /// Installs or replaces (in place, no gap) hip's policy for `p.id`.
    fn add_policy(&self, p: &PolicyParams) -> impl Future<Output = Result<(), XfrmError>> + Send;

    /// Deletes hip's policy; `Ok(false)` if there was none.
    fn del_policy(&self, id: &PolicyId) -> impl Future<Output = Result<bool, XfrmError>> + Send;

    /// All SAs and policies hip owns.
    fn list_owned(&self) -> impl Future<Output = Result<Owned, XfrmError>> + Send;

    /// Subscribes to acquire, expire, delete and NAT mapping events (all of them; filter
    /// with [`KernelEvent::is_owned`]).
    fn subscribe(&self) -> Result<Events, XfrmError>;
}

/// A stream of kernel XFRM events from a dedicated monitor socket.
#[derive(Debug)]
pub struct Events {
    rx: UnboundedReceiver<(NetlinkMessage<XfrmMessage>, SocketAddr)>,
    task: JoinHandle<()>,
}

impl Events {
    fn new(
        rx: UnboundedReceiver<(NetlinkMessage<XfrmMessage>, SocketAddr)>,
        task: JoinHandle<()>,
    ) -> Self {
        Self { rx, task }
    }

    /// The next event; `None` once the socket is gone.
    pub async fn next(&mut self) -> Option<KernelEvent> {
        loop {
            let (m, _) = self.rx.next().await?;
            if let NetlinkPayload::InnerMessage(x) = m.payload
                && let Some(e) = msg::event(&x)
            {
                return Some(e);
            }
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.task.abort();
    }
}
