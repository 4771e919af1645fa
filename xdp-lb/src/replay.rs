//! Requests a dead balancer took along. Between a balancer's death and the switch's verdict
//! (about 100 ms) the switch still steers new clients to it, and their requests vanish: the
//! client waits for its own timer (5 s for tftp-hpa and atftp, more for some firmware) before it
//! asks again. The switch keeps each client's latest request (`SW_REQUESTS`); at the swap its
//! agent steers again, to the new active balancer, every request that went to the dead one
//! within the client window and is still its client's last packet: a client that sent anything
//! after it had its answer. The frame is the one the kernel would have sent (the client's
//! addresses, the switch's MAC toward the balancer's), so the balancer takes it as the client's:
//! a new session, or a repeat of a session the pair mirrored (its backend answers it again,
//! through the new balancer).

use std::io;

use nix::sys::socket::{AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType, SockaddrLike as _, sendto, socket};
use xdp_lb_common::{ClientKey, FrameHeaders, LbSeen, SwitchRequest, TFTP_PORT};

/// Whether the kept `request` of a client whose last packet the switch stamped `last_seen_ns`
/// (`SW_CLIENTS`; `None` when that entry is gone) is to be steered again after balancer `dead`
/// died, at `now_ns`.
#[must_use]
pub fn due(request: &SwitchRequest, last_seen_ns: Option<u64>, dead: u32, now_ns: u64, window_ns: u64) -> bool {
    request.lb_slot == dead
        && now_ns.saturating_sub(request.steered_ns) < window_ns
        // A later packet (an ACK of the answer, a retry already steered elsewhere) says the
        // client needs nothing from us; an evicted entry says nothing, and nothing is sent.
        && last_seen_ns == Some(request.steered_ns)
        && request.request.request().is_some()
}

/// The frame that steers `key`'s kept request to the balancer `to`, as the kernel does.
#[must_use]
pub fn frame(key: ClientKey, vip: [u8; 4], to: &LbSeen, request: &[u8]) -> Option<Vec<u8>> {
    let headers = FrameHeaders::for_udp((to.lb_mac, to.mac), (key.ip, u16::from_be_bytes(key.port)), (vip, TFTP_PORT), request)?;
    let mut frame = bytemuck::bytes_of(&headers).to_vec();
    frame.extend_from_slice(request);
    Some(frame)
}

/// Sends whole Ethernet frames out of interface `ifindex` (a packet socket, opened for the
/// call: swaps are rare). How many left; the first error when none did.
pub fn send(ifindex: u32, frames: &[Vec<u8>]) -> io::Result<usize> {
    if frames.is_empty() {
        return Ok(0);
    }
    // Protocol 0: the socket only sends, it receives nothing.
    let socket = socket(AddressFamily::Packet, SockType::Raw, SockFlag::SOCK_CLOEXEC, None)?;
    let address = link_address(ifindex)?;
    let mut sent = 0;
    let mut first_error = None;
    for frame in frames {
        match sendto(std::os::fd::AsRawFd::as_raw_fd(&socket), frame, &address, MsgFlags::empty()) {
            Ok(_) => sent += 1,
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    match first_error {
        Some(error) if sent == 0 => Err(error.into()),
        _ => Ok(sent),
    }
}

/// The packet-socket address of interface `ifindex`: the frames carry their own MACs.
fn link_address(ifindex: u32) -> io::Result<LinkAddr> {
    // SAFETY: sockaddr_ll is plain data; all zeros is a valid value.
    let mut raw: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    raw.sll_family = libc::sa_family_t::try_from(libc::AF_PACKET).map_err(io::Error::other)?;
    raw.sll_ifindex = i32::try_from(ifindex).map_err(|_| io::Error::other("interface index out of range"))?;
    raw.sll_halen = 6;
    let len = libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>()).map_err(io::Error::other)?;
    // SAFETY: `raw` is a complete sockaddr_ll of the length given, family AF_PACKET; nix copies it.
    unsafe { LinkAddr::from_raw((&raw const raw).cast(), Some(len)) }.ok_or_else(|| io::Error::other("not a packet-socket address"))
}

#[cfg(test)]
mod tests {
    use xdp_lb_common::{KeptRequest, frame::checksums_valid};

    use super::*;

    const MS: u64 = 1_000_000;
    const WINDOW: u64 = 2_000 * MS;

    fn kept(slot: u32, steered_ns: u64) -> SwitchRequest {
        let mut request: KeptRequest = bytemuck::Zeroable::zeroed();
        request.bytes[..14].copy_from_slice(b"\x00\x01kernel\x00octet");
        request.len = 14;
        SwitchRequest { steered_ns, lb_slot: slot, pad: 0, request }
    }

    #[test]
    fn a_request_that_is_its_clients_last_packet_is_steered_again() {
        let request = kept(0, 10_000 * MS);
        assert!(due(&request, Some(10_000 * MS), 0, 10_100 * MS, WINDOW));
    }

    #[test]
    fn a_client_that_sent_anything_later_is_left_alone() {
        let request = kept(0, 10_000 * MS);
        assert!(!due(&request, Some(10_001 * MS), 0, 10_100 * MS, WINDOW), "it acknowledged an answer, or asked again");
        assert!(!due(&request, None, 0, 10_100 * MS, WINDOW), "no record of the client: nothing is known, nothing sent");
    }

    #[test]
    fn only_recent_requests_to_the_dead_balancer_count() {
        let request = kept(0, 10_000 * MS);
        assert!(!due(&request, Some(10_000 * MS), 1, 10_100 * MS, WINDOW), "it went to the survivor");
        assert!(!due(&request, Some(10_000 * MS), 0, 12_000 * MS, WINDOW), "older than the client window");
        let mut empty = request;
        empty.request.len = 0;
        assert!(!due(&empty, Some(10_000 * MS), 0, 10_100 * MS, WINDOW), "an entry without a request");
    }

    #[test]
    fn the_frame_is_the_clients_request_to_the_vip_toward_the_new_balancer() {
        let key = ClientKey::new([10, 78, 0, 50], 40_000u16.to_be_bytes());
        let to = LbSeen { mac: [2, 0, 0, 0, 0, 0xa1], lb_mac: [2, 0, 0, 0, 0, 1], ..LbSeen::default() };
        let request = kept(0, 0);
        let frame = frame(key, [10, 77, 9, 100], &to, request.request.request().unwrap()).unwrap();
        assert!(checksums_valid(&frame));
        let headers = bytemuck::from_bytes::<FrameHeaders>(&frame[..FrameHeaders::LEN]);
        assert_eq!((headers.eth_dst, headers.eth_src), (to.mac, to.lb_mac));
        assert_eq!((headers.ip_src, headers.udp_src_port()), (key.ip, 40_000));
        assert_eq!((headers.ip_dst, headers.udp_dst_port()), ([10, 77, 9, 100], TFTP_PORT));
        assert_eq!(&frame[FrameHeaders::LEN..], b"\x00\x01kernel\x00octet");
    }
}
