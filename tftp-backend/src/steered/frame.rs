//! Framing of the steered mode: each datagram is a steering header, then (except for
//! heartbeats and the backend's header-only replies) a TFTP packet.

use xdp_lb_common::SteeringHeader;

/// Length of the steering header before each TFTP packet.
pub const HEADER: usize = SteeringHeader::LEN;

/// The steering header at the front of a datagram, if it is long enough for one.
pub fn steering_header(datagram: &[u8]) -> Option<SteeringHeader> {
    datagram.get(..HEADER).and_then(|h| bytemuck::try_from_bytes::<SteeringHeader>(h).ok()).copied()
}

/// The TFTP packet after the steering header (empty for a header alone).
pub fn tftp_packet(datagram: &[u8]) -> &[u8] {
    datagram.get(HEADER..).unwrap_or_default()
}

/// A reply of the backend carrying `header`'s session: `flags` with `FLAG_FROM_BACKEND`.
pub fn reply(header: &SteeringHeader, flags: u8) -> SteeringHeader {
    let mut reply = *header;
    reply.flags = xdp_lb_common::steering::FLAG_FROM_BACKEND | flags;
    reply
}
