//! Link monitor: interface existence, admin state and carrier from rtnetlink.
//!
//! Invariants:
//! - Event-driven: subscribes to the `RTNLGRP_LINK` multicast group *before* dumping
//!   the current links, so no change between dump and subscription is missed (a
//!   duplicate is harmless; the state is absolute, not a delta).
//! - After the dump, one [`MonitorEvent::Link`] per configured interface (absent
//!   ones as `exists: false`), then [`MonitorEvent::Synced`]; afterwards one event
//!   per kernel notification about a configured interface.
//! - If the netlink socket fails (e.g. ENOBUFS after a burst), [`run_link_monitor`]
//!   returns an error and the caller restarts it, which re-dumps.

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::{MulticastGroup, new_multicast_connection};
use tokio::sync::mpsc;

/// The state of one interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStatus {
    pub interface: String,
    pub exists: bool,
    /// IFF_UP.
    pub up: bool,
    /// IFF_LOWER_UP (carrier).
    pub carrier: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorEvent {
    Link(LinkStatus),
    /// The initial dump is complete: every configured interface has been reported.
    Synced,
}

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("netlink link dump: {0}")]
    Dump(#[from] rtnetlink::Error),
    #[error("netlink multicast stream ended")]
    Ended,
    #[error("event receiver dropped")]
    Closed,
}

fn status(msg: &LinkMessage, exists: bool) -> Option<LinkStatus> {
    let name = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    let flags = msg.header.flags;
    Some(LinkStatus {
        interface: name,
        exists,
        up: exists && flags.contains(LinkFlags::Up),
        carrier: exists && flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::LowerUp),
    })
}

/// Watch `interfaces` until the receiver is dropped (Ok is never returned otherwise).
///
/// Generic over what the channel carries so the events go straight into the engine's
/// input queue (`E` = `engine::Input`) without this module knowing the engine.
pub async fn run_link_monitor<E: From<MonitorEvent>>(
    interfaces: &[String],
    tx: &mpsc::Sender<E>,
) -> Result<(), MonitorError> {
    let (conn, handle, mut messages) = new_multicast_connection(&[MulticastGroup::Link])?;
    let conn = tokio::spawn(conn);
    let result = async {
        let mut seen = Vec::new();
        let mut dump = handle.link().get().execute();
        while let Some(msg) = dump.try_next().await? {
            if let Some(s) = status(&msg, true)
                && interfaces.contains(&s.interface)
            {
                seen.push(s.interface.clone());
                tx.send(MonitorEvent::Link(s).into())
                    .await
                    .map_err(|_| MonitorError::Closed)?;
            }
        }
        for i in interfaces.iter().filter(|i| !seen.contains(i)) {
            let absent = LinkStatus {
                interface: i.clone(),
                exists: false,
                up: false,
                carrier: false,
            };
            tx.send(MonitorEvent::Link(absent).into())
                .await
                .map_err(|_| MonitorError::Closed)?;
        }
        tx.send(MonitorEvent::Synced.into())
            .await
            .map_err(|_| MonitorError::Closed)?;
        while let Some((msg, _)) = messages.next().await {
            let s = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => status(&m, true),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => status(&m, false),
                _ => None,
            };
            if let Some(s) = s.filter(|s| interfaces.contains(&s.interface)) {
                tx.send(MonitorEvent::Link(s).into())
                    .await
                    .map_err(|_| MonitorError::Closed)?;
            }
        }
        Err(MonitorError::Ended)
    }
    .await;
    conn.abort();
    result
}
