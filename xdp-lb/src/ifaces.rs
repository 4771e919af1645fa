//! What the agents ask the kernel about network interfaces: indices, MAC and IPv4 addresses
//! (getifaddrs, in this network namespace, unlike /sys/class/net under `nsenter --net`), and the
//! mode an XDP program is attached in (an `RTM_GETLINK` netlink request).

use std::net::Ipv4Addr;

use anyhow::{Context as _, bail};
use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// The index of `iface`.
pub fn interface_index(iface: &str) -> anyhow::Result<u32> {
    nix::net::if_::if_nametoindex(iface).with_context(|| format!("no interface {iface} in this network namespace"))
}

/// The index and MAC address of each of `interfaces` that has one, from the link-layer entries
/// of getifaddrs.
pub fn interface_macs(interfaces: &[String]) -> anyhow::Result<Vec<(u32, [u8; 6])>> {
    let mut found = Vec::new();
    for entry in nix::ifaddrs::getifaddrs().context("getifaddrs")? {
        if !interfaces.contains(&entry.interface_name) {
            continue;
        }
        let Some(link) = entry.address.as_ref().and_then(|address| address.as_link_addr()) else { continue };
        if link.halen() == 6
            && let Some(mac) = link.addr()
        {
            found.push((u32::try_from(link.ifindex())?, mac));
        }
    }
    Ok(found)
}

/// The first IPv4 address of `iface` other than `exclude`.
pub fn interface_address(iface: &str, exclude: Ipv4Addr) -> anyhow::Result<Ipv4Addr> {
    nix::ifaddrs::getifaddrs()
        .context("getifaddrs")?
        .filter(|entry| entry.interface_name == iface)
        .filter_map(|entry| Some(entry.address?.as_sockaddr_in()?.ip()))
        .find(|address| *address != exclude)
        .with_context(|| format!("{iface} has no IPv4 address besides the VIP; pass --address"))
}

/// The mode of the XDP program attached to interface `ifindex` (the kernel's `IFLA_XDP` /
/// `IFLA_XDP_ATTACHED`; [`XdpAttached::None`] without one).
pub fn xdp_attached(ifindex: u32) -> anyhow::Result<XdpAttached> {
    let socket = Socket::new(NETLINK_ROUTE).context("netlink socket")?;
    let mut link = LinkMessage::default();
    link.header.index = ifindex;
    let mut request = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(RouteNetlinkMessage::GetLink(link)));
    request.header.flags = NLM_F_REQUEST;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buffer = vec![0; request.buffer_len()];
    request.serialize(&mut buffer);
    socket.send_to(&buffer, &SocketAddr::new(0, 0), 0).context("netlink send")?;
    let (reply, _) = socket.recv_from_full().context("netlink recv")?;
    let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply).context("decoding the RTM_GETLINK answer")?;
    match answer.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => Ok(attached_mode(&link)),
        NetlinkPayload::Error(error) => Err(error.to_io()).context("RTM_GETLINK"),
        other => bail!("unexpected netlink answer to RTM_GETLINK: {other:?}"),
    }
}

/// The XDP mode a link message reports.
fn attached_mode(link: &LinkMessage) -> XdpAttached {
    link.attributes
        .iter()
        .filter_map(|attribute| match attribute {
            LinkAttribute::Xdp(xdp) => Some(xdp),
            _ => None,
        })
        .flatten()
        .find_map(|xdp| match xdp {
            LinkXdp::Attached(mode) => Some(*mode),
            _ => None,
        })
        .unwrap_or(XdpAttached::None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_comes_from_the_xdp_attribute() {
        let mut link = LinkMessage::default();
        assert_eq!(attached_mode(&link), XdpAttached::None, "no IFLA_XDP: nothing attached");
        link.attributes.push(LinkAttribute::Xdp(vec![LinkXdp::ProgId(7), LinkXdp::Attached(XdpAttached::SocketBuffer)]));
        assert_eq!(attached_mode(&link), XdpAttached::SocketBuffer);
    }

    #[test]
    fn the_loopback_interface_is_found() {
        // Every network namespace has `lo`: index 1, 127.0.0.1.
        assert_eq!(interface_index("lo").unwrap(), 1);
        assert!(interface_macs(&["lo".to_owned()]).unwrap().iter().all(|(ifindex, _)| *ifindex == 1));
        assert!(interface_index("no-such-iface0").unwrap_err().to_string().contains("no interface no-such-iface0"));
        assert_eq!(interface_address("lo", Ipv4Addr::UNSPECIFIED).unwrap(), Ipv4Addr::LOCALHOST);
        assert!(interface_address("lo", Ipv4Addr::LOCALHOST).is_err(), "only the excluded address");
        assert_eq!(xdp_attached(1).unwrap(), XdpAttached::None);
    }
}
