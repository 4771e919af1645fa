//! Steering decisions: client packets to their backend with the steering header inserted,
//! backend replies to their client with it removed.
//!
//! Headers are rewritten in place in the packet and copied between packet and map memory
//! directly: the BPF stack is 512 bytes, and these structs are large.

use core::ptr::copy_nonoverlapping;

use aya_log_ebpf::{info, warn};

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_csum_diff, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use xdp_lb_common::{
    BalanceCounter, ClientKey, FrameHeaders, LbConfig, Session, SteeringHeader, TFTP_PORT,
    checksum::fold,
    steering::{FLAG_FINISHED, FLAG_FROM_BACKEND, FLAG_HAS_CONTEXT, FLAG_HEARD, FLAG_HEARTBEAT, FLAG_NUDGE},
};

use crate::{
    backends,
    maps::{LB_BACKENDS, LB_CONFIG, LB_SCRATCH, LB_SEEN, LB_SESSIONS, Refused, addressed_to_us, admit_request, announce, faces_backends, now_ns, report_unknown},
    parse::{self, Layer, ptr_at, read_at},
    route::{self, egress},
};

/// An outcome: the counter to increment and the XDP action.
type Verdict = (BalanceCounter, u32);

const PASS: u32 = xdp_action::XDP_PASS;
const DROP: u32 = xdp_action::XDP_DROP;
const HEADER_LEN: usize = SteeringHeader::LEN;
/// Signed form for length arithmetic (64 always fits).
const HEADER_DELTA: i16 = 64;

const OPCODE_RRQ: u16 = 1;
const OPCODE_WRQ: u16 = 2;
const OPCODE_ACK: u16 = 4;

#[inline(always)]
pub fn balance(ctx: &XdpContext) -> Verdict {
    let packet = parse::describe(ctx);
    match packet.layer {
        Layer::Truncated => return (BalanceCounter::DropTruncated, DROP),
        Layer::NotIpv4 => return (BalanceCounter::PassNotIpv4, PASS),
        Layer::NotUdp => return (BalanceCounter::PassNotUdp, PASS),
        Layer::Udp => {}
    }
    let Some(config) = LB_CONFIG.get(0) else {
        return (BalanceCounter::PassNotService, PASS);
    };
    let from_client = packet.dst_ip == config.vip;
    let from_backend =
        packet.dst_ip == config.steer_addr && packet.dst_port == u16::from_be_bytes(config.steer_port);
    if !from_client && !from_backend {
        return (BalanceCounter::PassNotService, PASS);
    }
    let eth_dst = read_at::<[u8; 6]>(ctx, 0).unwrap_or_default();
    if !addressed_to_us(ctx.ingress_ifindex() as u32, eth_dst) {
        return (BalanceCounter::PassNotOurs, PASS);
    }
    if !packet.plain {
        return (BalanceCounter::DropFragmentOrOptions, DROP);
    }
    let Some(frame) = ptr_at::<FrameHeaders>(ctx, 0) else {
        return (BalanceCounter::DropTruncated, DROP);
    };
    // SAFETY: bounds-checked by ptr_at; alignment 1.
    let frame = unsafe { &*frame };

    // The lengths the rewrite adjusts must agree with each other and with the frame.
    let udp_len = usize::from(frame.udp_len());
    if udp_len < 8
        || frame.ip_len() != frame.udp_len() + 20
        || ctx.data() + 34 + udp_len > ctx.data_end()
    {
        return (BalanceCounter::DropTruncated, DROP);
    }
    if from_client {
        client_packet(ctx, config, frame)
    } else {
        backend_packet(ctx, config, frame)
    }
}

/// A client packet to the VIP: a request opens a session; anything to the client's TID
/// follows its session.
#[inline(always)]
fn client_packet(ctx: &XdpContext, config: &LbConfig, frame: &FrameHeaders) -> Verdict {
    let key = ClientKey::new(frame.ip_src, frame.udp_src);
    // Read only inside the datagram: Ethernet padding after a short one is not TFTP.
    let payload_len = frame.udp_len().saturating_sub(8);
    let opcode = read_at::<[u8; 2]>(ctx, FrameHeaders::PAYLOAD_OFFSET)
        .filter(|_| payload_len >= 2)
        .map(u16::from_be_bytes);
    let port = frame.udp_dst_port();
    if port == TFTP_PORT {
        if !matches!(opcode, Some(OPCODE_RRQ | OPCODE_WRQ)) {
            return (BalanceCounter::DropNotRequest, DROP);
        }
        match admit_request(key.ip, config) {
            Ok(()) => {}
            Err(Refused::Address) => return (BalanceCounter::DropRateLimited, DROP),
            Err(Refused::Prefix) => return (BalanceCounter::DropPrefixRateLimited, DROP),
            Err(Refused::Budget) => return (BalanceCounter::DropSessionBudget, DROP),
        }
        let Some(session) = open_session(ctx, config, &key, frame) else {
            return (BalanceCounter::DropNoBackend, DROP);
        };
        return forward_to_backend(ctx, config, session, BalanceCounter::NewSession);
    }
    if port != key.tid() {
        return (BalanceCounter::PassNotService, PASS);
    }
    let Some(session) = LB_SESSIONS.get_ptr_mut(key) else {
        report_unknown(&key);
        return (BalanceCounter::DropNoSession, DROP);
    };
    // SAFETY: map value pointer from a successful lookup.
    let session = unsafe { &mut *session };
    // Replies go back the way the client's packets come: a session learned from the peer LB
    // or from a backend gets its route here, and follows the client if its path changes.
    session.client_mac = frame.eth_src;
    session.lb_mac = frame.eth_dst;
    session.ifindex = ctx.ingress_ifindex() as u32;
    session.last_client_ns = now_ns();
    if opcode == Some(OPCODE_ACK)
        && payload_len >= 4
        && let Some(block) = read_at::<[u8; 2]>(ctx, FrameHeaders::PAYLOAD_OFFSET + 2)
    {
        session.last_ack = block;
    }
    forward_to_backend(ctx, config, session, BalanceCounter::ToBackend)
}

/// Creates the client's session, or restarts it when the client sends a new request from the
/// same port (it then keeps its backend, unless that one is gone).
#[inline(always)]
fn open_session<'a>(
    ctx: &XdpContext,
    config: &LbConfig,
    key: &ClientKey,
    frame: &FrameHeaders,
) -> Option<&'a mut Session> {
    let session = match LB_SESSIONS.get_ptr_mut(key) {
        Some(session) => session,
        None => {
            let backend = backends::least_loaded()?;
            // SAFETY: per-CPU slot, ours for the duration of the program.
            let fresh = unsafe { &mut *LB_SCRATCH.get_ptr_mut(0)? };
            fresh.backend = backend;
            fresh.last_ack = [0; 2];
            LB_SESSIONS.insert(key, &*fresh, 0).ok()?;
            backends::add_session(backend);
            announce(key);
            LB_SESSIONS.get_ptr_mut(key)?
        }
    };
    // SAFETY: map value pointer from a successful lookup.
    let session = unsafe { &mut *session };
    session.header.reset_for_client(key.ip, key.port, config.vip, key.tid());
    session.client_mac = frame.eth_src;
    session.lb_mac = frame.eth_dst;
    session.ifindex = ctx.ingress_ifindex() as u32;
    session.last_client_ns = now_ns();
    Some(session)
}

/// Inserts the session's steering header and sends the packet to its backend. A session whose
/// backend is no longer usable moves to the least loaded one first, with a nudge.
#[inline(always)]
fn forward_to_backend(
    ctx: &XdpContext,
    config: &LbConfig,
    session: &mut Session,
    counter: BalanceCounter,
) -> Verdict {
    let mut counter = counter;
    let mut nudge = 0;
    if !backends::usable(session.backend) {
        let Some(id) = backends::least_loaded() else {
            warn!(ctx, "no live backend for a session whose backend {} is gone", session.backend);
            return (BalanceCounter::DropNoBackend, DROP);
        };
        // Rare (the agent normally moves sessions first), so worth a line in the agent's log.
        info!(ctx, "session moved in the kernel from backend {} to {}", session.backend, id);
        backends::remove_session(session.backend);
        backends::add_session(id);
        session.backend = id;
        nudge = FLAG_NUDGE;
        counter = BalanceCounter::Moved;
        announce(&ClientKey::new(session.header.client_ip, session.header.client_port));
    }
    let (Some(backend), Some(seen)) = (LB_BACKENDS.get(session.backend), LB_SEEN.get(session.backend)) else {
        return (BalanceCounter::DropNoBackend, DROP);
    };
    // SAFETY: helper on our own context; every packet pointer is re-derived afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(HEADER_LEN as i32)) } != 0 {
        return (BalanceCounter::DropAdjustHead, DROP);
    }
    let (Some(frame), Some(old), Some(header)) = (
        ptr_at::<FrameHeaders>(ctx, 0),
        ptr_at::<FrameHeaders>(ctx, HEADER_LEN),
        ptr_at::<SteeringHeader>(ctx, FrameHeaders::PAYLOAD_OFFSET),
    ) else {
        return (BalanceCounter::DropAdjustHead, DROP);
    };
    // SAFETY: all three ranges were bounds-checked just above; the types have alignment 1; the
    // old headers (64..106) and their new place (0..42) do not overlap, and the steering header
    // (42..106) is written only after the old headers were copied out of its place.
    let (frame, header) = unsafe {
        copy_nonoverlapping(old, frame, 1);
        copy_nonoverlapping(&raw const session.header, header, 1);
        (&mut *frame, &mut *header)
    };
    header.flags = (session.header.flags & FLAG_HAS_CONTEXT) | nudge;
    let header_sum = header_sum(header);
    frame.eth_dst = seen.mac;
    frame.eth_src = seen.lb_mac;
    frame.rewrite(config.steer_addr, backend.ip, config.steer_port, backend.port, HEADER_DELTA, 0, header_sum);
    let ifindex = seen.ifindex;
    backends::sent_to(session.backend);
    (counter, egress(ctx, ifindex))
}

/// A packet to the steering port: only registered backends may send there.
#[inline(always)]
fn backend_packet(ctx: &XdpContext, config: &LbConfig, frame: &FrameHeaders) -> Verdict {
    let Some(id) = backends::find(frame.ip_src, frame.udp_src) else {
        return (BalanceCounter::DropUnknownSource, DROP);
    };
    // Only the backends' side may speak for a backend: such a frame from elsewhere would
    // teach this balancer an attacker's MAC for it, or keep a dead one alive.
    if !faces_backends(ctx.ingress_ifindex() as u32) {
        return (BalanceCounter::DropBackendWrongSide, DROP);
    }
    let Some(header) = ptr_at::<SteeringHeader>(ctx, FrameHeaders::PAYLOAD_OFFSET) else {
        return (BalanceCounter::DropBadHeader, DROP);
    };
    // SAFETY: bounds-checked by ptr_at; alignment 1. Valid until the packet is resized.
    let header = unsafe { &*header };
    if !header.has_magic()
        || !header.has_flag(FLAG_FROM_BACKEND)
        || usize::from(frame.udp_len()) < 8 + HEADER_LEN
    {
        return (BalanceCounter::DropBadHeader, DROP);
    }
    backends::answered_by(id, frame.eth_src, frame.eth_dst, ctx.ingress_ifindex() as u32);
    if header.has_flag(FLAG_HEARTBEAT) {
        // The agent's probe socket wants it too.
        return (BalanceCounter::Heartbeat, PASS);
    }
    if header.has_flag(FLAG_HEARD) {
        // The backend read a datagram that needed no reply: an answer for the watchdog,
        // nothing for the client.
        return (BalanceCounter::BackendHeard, DROP);
    }
    if usize::from(frame.udp_len()) > 8 + HEADER_LEN + header.longest_reply() {
        return (BalanceCounter::DropOversize, DROP);
    }
    let key = ClientKey::new(header.client_ip, header.client_port);
    let (session, counter) = match LB_SESSIONS.get_ptr_mut(key) {
        Some(session) => (session, BalanceCounter::ToClient),
        None if header.has_flag(FLAG_FINISHED) => return (BalanceCounter::SessionFinished, DROP),
        None => match relearn(config, &key, id) {
            Some(session) => (session, BalanceCounter::Relearned),
            None => return (BalanceCounter::DropNoSession, DROP),
        },
    };
    // SAFETY: map value pointer from a successful lookup.
    let session = unsafe { &mut *session };
    if session.backend != id {
        return (BalanceCounter::DropStaleBackend, DROP);
    }
    if header.has_flag(FLAG_FINISHED) {
        let _ = LB_SESSIONS.remove(key);
        backends::remove_session(id);
        return (BalanceCounter::SessionFinished, DROP);
    }
    let first_context = session.header.flags & FLAG_HAS_CONTEXT == 0;
    learn_context(&mut session.header, header);
    if first_context {
        // The file, digest and options are what a backup needs to carry the transfer on: it
        // gets them now, not at the next periodic sync (the block may lag, not the context).
        announce(&key);
    }
    forward_to_client(ctx, config, frame, session, header, counter)
}

/// A registered backend answers for a client this LB has no session for: it took over from
/// its peer, or the LRU evicted the entry. The backend's header names the client; the way to
/// the client comes from the routing table until the client's next packet shows it.
#[inline(always)]
fn relearn(config: &LbConfig, key: &ClientKey, backend: u32) -> Option<*mut Session> {
    // SAFETY: per-CPU slot, ours for the duration of the program.
    let fresh = unsafe { &mut *LB_SCRATCH.get_ptr_mut(0)? };
    fresh.header.reset_for_client(key.ip, key.port, config.vip, key.tid());
    fresh.backend = backend;
    fresh.ifindex = 0;
    fresh.client_mac = [0; 6];
    fresh.lb_mac = [0; 6];
    fresh.last_ack = [0; 2];
    fresh.last_client_ns = now_ns();
    LB_SESSIONS.insert(key, &*fresh, 0).ok()?;
    backends::add_session(backend);
    announce(key);
    LB_SESSIONS.get_ptr_mut(key)
}

/// Keeps the transfer context the backend reports, so another backend can resume from it.
#[inline(always)]
fn learn_context(ours: &mut SteeringHeader, theirs: &SteeringHeader) {
    let highest = ours.block().max(theirs.block());
    ours.flags |= FLAG_HAS_CONTEXT;
    ours.mode = theirs.mode;
    ours.options = theirs.options;
    ours.timeout = theirs.timeout;
    ours.blksize = theirs.blksize;
    ours.windowsize = theirs.windowsize;
    ours.path_hash = theirs.path_hash;
    ours.digest = theirs.digest;
    ours.file_size = theirs.file_size;
    ours.rtt = theirs.rtt;
    ours.set_block(highest);
}

/// Removes the steering header and sends the reply to the client from VIP:TID.
#[inline(always)]
fn forward_to_client(
    ctx: &XdpContext,
    config: &LbConfig,
    frame: &FrameHeaders,
    session: &mut Session,
    header: &SteeringHeader,
    counter: BalanceCounter,
) -> Verdict {
    // Everything needed from the steering header is read before the new Ethernet/IP/UDP
    // headers overwrite its tail.
    let header_sum = header_sum(header);
    let (client_ip, client_port) = (header.client_ip, header.client_port);
    if session.ifindex == 0 {
        let ip_len = frame.ip_len().saturating_sub(HEADER_LEN as u16);
        let Some(hop) = route::toward(ctx, config.vip, client_ip, ip_len) else {
            return (BalanceCounter::DropNoRoute, DROP);
        };
        session.ifindex = hop.ifindex;
        session.client_mac = hop.dst_mac;
        session.lb_mac = hop.src_mac;
    }
    let Some(moved) = ptr_at::<FrameHeaders>(ctx, HEADER_LEN) else {
        return (BalanceCounter::DropBadHeader, DROP);
    };
    // SAFETY: bounds-checked just above; 0..42 and 64..106 do not overlap; alignment 1.
    let moved = unsafe {
        copy_nonoverlapping(frame, moved, 1);
        &mut *moved
    };
    moved.eth_dst = session.client_mac;
    moved.eth_src = session.lb_mac;
    moved.rewrite(config.vip, client_ip, session.header.vip_port, client_port, -HEADER_DELTA, header_sum, 0);
    // SAFETY: helper on our own context; no packet pointer is used afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, HEADER_LEN as i32) } != 0 {
        return (BalanceCounter::DropAdjustHead, DROP);
    }
    (counter, egress(ctx, session.ifindex))
}

/// Word sum of a steering header (in packet or map memory) for the incremental UDP checksum.
/// The kernel's `bpf_csum_diff` sums it: an unrolled sum of 64 unaligned bytes would not fit
/// the BPF registers and spill past the 512-byte stack.
#[inline(always)]
fn header_sum(header: &SteeringHeader) -> u32 {
    let to = core::ptr::from_ref(header).cast::<u32>().cast_mut();
    // SAFETY: reads HEADER_LEN bytes of a live header; the verifier checks the range. (The
    // helper subtracts `from` and adds `to`: the header goes in `to`.)
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, to, HEADER_LEN as u32, 0) };
    // The helper sums native-endian (little-endian) words; a ones' complement sum of byte-swapped
    // words is the byte-swapped sum (RFC 1071), so fold and swap back to network order.
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "a 32-bit partial sum")]
    let sum = sum as u32;
    u32::from(fold(sum).swap_bytes())
}
