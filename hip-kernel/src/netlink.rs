//! The netlink implementation of [`KernelIpsec`]: `NETLINK_XFRM` through
//! `netlink-proto` (requests) and a separate `netlink-sys` monitor socket (events).
//!
//! What the crates do not do and is written here: the errno → `ip` text mapping, the
//! ownership check before touching an object, and the upsert logic (`NEWSA` then, on
//! `EEXIST`, `GETSA` + `UPDSA`), since `netlink-packet-xfrm` only provides the messages.

use futures::StreamExt;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_xfrm::{
    XFRMNLGRP_ACQUIRE, XFRMNLGRP_EXPIRE, XFRMNLGRP_MAPPING, XFRMNLGRP_POLICY, XFRMNLGRP_SA,
    XfrmMessage,
};
use netlink_proto::{
    ConnectionHandle, NetlinkCodec,
    sys::{AsyncSocket, SocketAddr, TokioSocket, protocols::NETLINK_XFRM},
};
use tokio::task::JoinHandle;

use crate::{
    Events, KernelIpsec, Owned, PolicyId, PolicyParams, Reqid, SaId, SaParams, Spi, XfrmError, msg,
    owner, types::LocatorPair,
};

/// Receive buffer of the request socket: large enough that the acks of a burst of
/// pipelined requests (see [`crate::install_associations`]) never overflow it.
const RX_BUF: usize = 8 << 20;

/// SPI range for `ALLOCSPI`. 1..=255 are reserved (RFC 4303 §2.1); the top bit is left
/// out so SPIs print the same signed or unsigned.
const SPI_MIN: Spi = 0x100;
const SPI_MAX: Spi = 0x7fff_ffff;

/// XFRM over netlink, in the network namespace of the thread that created it.
#[derive(Debug)]
pub struct XfrmNetlink {
    handle: ConnectionHandle<XfrmMessage>,
    task: JoinHandle<()>,
}

impl Drop for XfrmNetlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl XfrmNetlink {
    /// Opens the request socket. Must be called inside a tokio runtime (the connection
    /// task is spawned on it); the socket belongs to the calling thread's network
    /// namespace for its whole life.
    pub fn new() -> Result<Self, XfrmError> {
        let (mut conn, handle, _unsolicited) =
            netlink_proto::new_connection::<XfrmMessage>(NETLINK_XFRM)
                .map_err(XfrmError::Socket)?;
        conn.socket_mut()
            .socket_mut()
            .set_rx_buf_sz(RX_BUF)
            .map_err(XfrmError::Socket)?;
        let task = tokio::spawn(conn);
        Ok(Self { handle, task })
    }

    async fn request(
        &self,
        msg: XfrmMessage,
        flags: u16,
        op: impl FnOnce() -> String,
    ) -> Result<Vec<XfrmMessage>, XfrmError> {
        let mut hdr = NetlinkHeader::default();
        hdr.flags = flags;
        let mut nl = NetlinkMessage::new(hdr, NetlinkPayload::from(msg));
        nl.finalize();
        let mut replies = self
            .handle
            .request(nl, SocketAddr::new(0, 0))
            .map_err(|_| XfrmError::ConnectionClosed)?;
        let mut out = Vec::new();
        while let Some(m) = replies.next().await {
            match m.payload {
                NetlinkPayload::InnerMessage(x) => out.push(x),
                NetlinkPayload::Error(e) => {
                    if let Some(code) = e.code {
                        return Err(XfrmError::kernel(op(), -code.get()));
                    }
                }
                NetlinkPayload::Overrun(_) => {
                    return Err(XfrmError::UnexpectedReply {
                        op: op(),
                        detail: "netlink overrun".into(),
                    });
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Sends an SA request, naming missing ESP or crypto support in the error.
    async fn sa_request(&self, p: &SaParams, update: bool) -> Result<(), XfrmError> {
        self.send_sa(
            p,
            msg::sa_message(p, update),
            if update { "update" } else { "add" },
        )
        .await
    }

    /// Sends `m`, an SA message for `p`.
    async fn send_sa(&self, p: &SaParams, m: XfrmMessage, verb: &str) -> Result<(), XfrmError> {
        let op = || format!("{verb} {}", p.id());
        match self.request(m, NLM_F_REQUEST | NLM_F_ACK, op).await {
            Ok(_) => Ok(()),
            // xfrm_init_state(): xfrm_get_type() found no ESP handler
            // ("Requested type not found" in the extended ack).
            Err(XfrmError::Kernel { op, errno, .. }) if errno == libc::EPROTONOSUPPORT => {
                Err(XfrmError::NoEspSupport { op })
            }
            // xfrm_user's attach_one_algo()/attach_aead(): no such crypto algorithm.
            Err(XfrmError::Kernel { op, errno, .. }) if errno == libc::ENOSYS => {
                let a = p.keys.transform().kernel_algs();
                let alg = [a.enc, a.auth.map(|x| x.0), a.aead.map(|x| x.0)]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" + ");
                Err(XfrmError::AlgorithmUnavailable { op, alg })
            }
            Err(e) => Err(e),
        }
    }

    /// The SA with this id, if any: (reqid, algorithm attributes).
    async fn get_sa(&self, id: &SaId) -> Result<Option<XfrmMessage>, XfrmError> {
        match self
            .request(msg::get_sa_message(id), NLM_F_REQUEST, || {
                format!("get {id}")
            })
            .await
        {
            Ok(mut v) => Ok(v.pop()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn get_policy_priority(&self, id: &PolicyId) -> Result<Option<u32>, XfrmError> {
        match self
            .request(msg::get_policy_message(id), NLM_F_REQUEST, || {
                format!("get {id}")
            })
            .await
        {
            Ok(v) => Ok(v.into_iter().find_map(|m| match m {
                XfrmMessage::AddPolicy(p) => Some(p.user_policy_info.priority),
                _ => None,
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The kernel's `EINVAL` for an `UPDSA` that adds or removes UDP encapsulation, with the
/// reason (the kernel gives none).
pub(crate) fn encap_change_refused(op: String) -> XfrmError {
    XfrmError::kernel(
        format!("{op} (the kernel cannot add or remove UDP encapsulation in place: move the SA)"),
        libc::EINVAL,
    )
}

fn sa_reqid(m: &XfrmMessage) -> Option<u32> {
    match m {
        XfrmMessage::AddSa(s) | XfrmMessage::UpdateSa(s) => Some(s.user_sa_info.reqid),
        _ => None,
    }
}

impl KernelIpsec for XfrmNetlink {
    async fn alloc_spi(&self, locators: LocatorPair, reqid: Reqid) -> Result<Spi, XfrmError> {
        locators.check()?;
        let op = || format!("allocate SPI for SA {} -> {}", locators.src, locators.dst);
        let replies = self
            .request(
                msg::allocspi_message(locators, reqid, SPI_MIN, SPI_MAX),
                NLM_F_REQUEST,
                op,
            )
            .await?;
        match replies.first() {
            Some(XfrmMessage::AddSa(s)) => Ok(s.user_sa_info.id.spi),
            other => Err(XfrmError::UnexpectedReply {
                op: op(),
                detail: format!("{other:?}"),
            }),
        }
    }

    async fn add_sa(&self, sa: &SaParams) -> Result<(), XfrmError> {
        sa.check()?;
        match self.sa_request(sa, false).await {
            Err(e) if e.is_exists() => {}
            r => return r,
        }
        // Upsert: something holds (dst, SPI, ESP) already. Only hip's may be changed.
        let Some(cur) = self.get_sa(&sa.id()).await? else {
            // Deleted in between: try once more.
            return self.sa_request(sa, false).await;
        };
        if !sa_reqid(&cur).is_some_and(owner::is_owned_reqid) {
            return Err(XfrmError::ForeignConflict {
                what: sa.id().to_string(),
            });
        }
        let XfrmMessage::AddSa(cur) = cur else {
            unreachable!("sa_reqid matched AddSa/UpdateSa")
        };
        let larval = msg::alg_attrs(&cur.nlas).is_empty();
        if larval || msg::updatable_to(&cur, sa) {
            // UPDSA replaces a larval SA (from ALLOCSPI) by the full one, encapsulated or
            // not, or refreshes the lifetimes and encapsulation ports of an otherwise
            // identical one (xfrm_state_update(), net/xfrm/xfrm_state.c).
            self.sa_request(sa, true).await
        } else {
            // The kernel's update never changes keys or selectors, nor adds or removes
            // encapsulation: replace. The policy still demands ESP, so the short gap drops
            // packets, it does not leak them.
            self.del_sa(&sa.id()).await?;
            self.sa_request(sa, false).await
        }
    }

    async fn update_sa(&self, sa: &SaParams) -> Result<(), XfrmError> {
        sa.check()?;
        match self.get_sa(&sa.id()).await? {
            None => Err(XfrmError::kernel(
                format!("update {}", sa.id()),
                libc::ESRCH,
            )),
            Some(cur) if !sa_reqid(&cur).is_some_and(owner::is_owned_reqid) => {
                Err(XfrmError::ForeignConflict {
                    what: sa.id().to_string(),
                })
            }
            Some(XfrmMessage::AddSa(cur)) => {
                let larval = msg::alg_attrs(&cur.nlas).is_empty();
                match self.sa_request(sa, true).await {
                    // xfrm_state_update() refuses to add or remove encapsulation.
                    Err(XfrmError::Kernel { op, errno, .. })
                        if errno == libc::EINVAL
                            && !larval
                            && !msg::same_encap_kind(&cur.nlas, sa) =>
                    {
                        Err(encap_change_refused(op))
                    }
                    r => r,
                }
            }
            Some(_) => unreachable!("sa_reqid matched AddSa/UpdateSa"),
        }
    }

    async fn move_sa(&self, old: &SaId, new: &SaParams) -> Result<(), XfrmError> {
        new.check()?;
        let cur = match self.get_sa(old).await? {
            None => return Err(XfrmError::kernel(format!("move {old}"), libc::ESRCH)),
            Some(c) if !sa_reqid(&c).is_some_and(owner::is_owned_reqid) => {
                return Err(XfrmError::ForeignConflict {
                    what: old.to_string(),
                });
            }
            Some(XfrmMessage::AddSa(c)) => c,
            Some(_) => unreachable!("sa_reqid matched AddSa/UpdateSa"),
        };
        if *old == new.id() && msg::updatable_to(&cur, new) {
            // Only the encapsulation's ports (or nothing) change: UPDSA in place keeps the
            // kernel's state whole — sequence numbers, replay window, counters — with no
            // gap and no copy that packets sent meanwhile could outdate.
            return self.send_sa(new, msg::sa_message(new, true), "move").await;
        }
        let m = match msg::replay_state(&cur.nlas) {
            Some(r) => msg::sa_message_continuing(new, r),
            // The kernel reports one for every SA (copy_to_user_state_extra()).
            None => {
                return Err(XfrmError::InvalidParam(format!(
                    "{old} carries no replay state to continue"
                )));
            }
        };
        // New addresses, or encapsulation added or removed (which UPDSA refuses): a new
        // SA. The same (destination, SPI) must go before it can be added again; a new
        // destination is added first. The policies still demand ESP: a gap drops packets.
        let same = *old == new.id();
        if same {
            self.del_sa(old).await?;
        }
        self.send_sa(new, m, "move").await?;
        if !same {
            self.del_sa(old).await?;
        }
        Ok(())
    }

    async fn del_sa(&self, id: &SaId) -> Result<bool, XfrmError> {
        match self.get_sa(id).await? {
            None => Ok(false),
            Some(cur) if !sa_reqid(&cur).is_some_and(owner::is_owned_reqid) => {
                Err(XfrmError::ForeignConflict {
                    what: id.to_string(),
                })
            }
            Some(_) => {
                match self
                    .request(msg::del_sa_message(id), NLM_F_REQUEST | NLM_F_ACK, || {
                        format!("delete {id}")
                    })
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e) if e.is_not_found() => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    async fn add_policy(&self, p: &PolicyParams) -> Result<(), XfrmError> {
        p.check()?;
        let op = || format!("add {}", p.id);
        match self
            .request(msg::policy_message(p, false), NLM_F_REQUEST | NLM_F_ACK, op)
            .await
        {
            Err(e) if e.is_exists() => {}
            r => return r.map(|_| ()),
        }
        match self.get_policy_priority(&p.id).await? {
            Some(prio) if !owner::is_owned_priority(prio) => Err(XfrmError::ForeignConflict {
                what: p.id.to_string(),
            }),
            // hip's (or gone in between): UPDPOLICY creates or replaces in place, so the
            // selector is never without a policy.
            _ => self
                .request(
                    msg::policy_message(p, true),
                    NLM_F_REQUEST | NLM_F_ACK,
                    || format!("update {}", p.id),
                )
                .await
                .map(|_| ()),
        }
    }

    async fn del_policy(&self, id: &PolicyId) -> Result<bool, XfrmError> {
        match self.get_policy_priority(id).await? {
            None => Ok(false),
            Some(prio) if !owner::is_owned_priority(prio) => Err(XfrmError::ForeignConflict {
                what: id.to_string(),
            }),
            Some(_) => {
                match self
                    .request(
                        msg::del_policy_message(id),
                        NLM_F_REQUEST | NLM_F_ACK,
                        || format!("delete {id}"),
                    )
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e) if e.is_not_found() => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    async fn list_owned(&self) -> Result<Owned, XfrmError> {
        let sas = self
            .request(msg::dump_sa_message(), NLM_F_REQUEST | NLM_F_DUMP, || {
                "dump SAs".into()
            })
            .await?;
        let pols = self
            .request(
                msg::dump_policy_message(),
                NLM_F_REQUEST | NLM_F_DUMP,
                || "dump policies".into(),
            )
            .await?;
        let mut owned = Owned::default();
        for m in &sas {
            if let XfrmMessage::AddSa(s) = m
                && owner::is_owned_reqid(s.user_sa_info.reqid)
                && let Some(e) = msg::sa_entry(&s.user_sa_info, &s.nlas)
            {
                owned.sas.push(e);
            }
        }
        for m in &pols {
            if let XfrmMessage::AddPolicy(p) = m
                && owner::is_owned_priority(p.user_policy_info.priority)
                && let Some(e) = msg::policy_entry(&p.user_policy_info, &p.nlas)
            {
                owned.policies.push(e);
            }
        }
        Ok(owned)
    }

    fn subscribe(&self) -> Result<Events, XfrmError> {
        let mut sock = TokioSocket::new(NETLINK_XFRM).map_err(XfrmError::Socket)?;
        let s = sock.socket_mut();
        // A socket that never sent anything has port id 0, and the kernel's XFRM
        // broadcasts skip port 0: bind to a kernel-chosen port id first.
        s.bind_auto().map_err(XfrmError::Socket)?;
        s.set_rx_buf_sz(RX_BUF).map_err(XfrmError::Socket)?;
        for g in [
            XFRMNLGRP_ACQUIRE,
            XFRMNLGRP_EXPIRE,
            XFRMNLGRP_SA,
            XFRMNLGRP_POLICY,
            XFRMNLGRP_MAPPING,
        ] {
            s.add_membership(g).map_err(XfrmError::Socket)?;
        }
        // A separate socket: notifications caused by our own requests would come back on
        // the request socket, where netlink-proto treats them as replies.
        let (conn, _handle, rx) =
            netlink_proto::from_socket_with_codec::<XfrmMessage, TokioSocket, NetlinkCodec>(sock);
        let task = tokio::spawn(conn);
        Ok(Events::new(rx, task))
    }
}
