//! Steering decisions, the tree docs/ARCHITECTURE.md draws for `balance`: client packets to
//! their backend with the steering header pushed, backend replies to their client with it
//! popped. The mechanics are elsewhere: `encap` pushes and pops the header, `session` keeps
//! the sessions, `watchdog` records what each backend was sent and answered, `backends`
//! chooses and counts load.

use aya_log_ebpf::{info, warn};

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use xdp_lb_common::{
    BalanceCounter, ClientKey, FrameHeaders, LbConfig, Session, SteeringHeader, TFTP_PORT,
    frame::{IPV4_HEADER_LEN, UDP_HEADER_LEN},
    steering::{FLAG_FINISHED, FLAG_HAS_CONTEXT, FLAG_FROM_BACKEND, FLAG_HEARD, FLAG_HEARTBEAT, FLAG_NUDGE},
    tftp::{BLOCK_LEN, DATA_HEADER_LEN, OPCODE_ACK, OPCODE_DATA, OPCODE_LEN, OPCODE_RRQ, OPCODE_WRQ},
};

use crate::{
    backends,
    encap::{self, Addresses, Failed},
    maps::{LB_BACKENDS, LB_CONFIG, LB_SEEN, LB_SESSIONS, Refused, addressed_to_us, admit_request, faces_backends, report_unknown},
    parse::{self, Layer, ptr_at, read_at},
    route::{self, egress},
    session,
    watchdog::{self, Link},
};

/// An outcome: the counter to increment and the XDP action.
type Verdict = (BalanceCounter, u32);

const PASS: u32 = xdp_action::XDP_PASS;
const DROP: u32 = xdp_action::XDP_DROP;
/// The UDP length of a backend's datagram that holds a whole steering header.
const STEERED_UDP_LEN: usize = UDP_HEADER_LEN + SteeringHeader::LEN;

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
    let frame = unsafe { &mut *frame };

    // The lengths the rewrite adjusts must agree with each other and with the frame.
    let udp_len = usize::from(frame.udp_len());
    if udp_len < UDP_HEADER_LEN
        || usize::from(frame.ip_len()) != udp_len + IPV4_HEADER_LEN
        || ctx.data() + FrameHeaders::UDP_OFFSET + udp_len > ctx.data_end()
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
    let payload_len = usize::from(frame.udp_len()).saturating_sub(UDP_HEADER_LEN);
    let opcode = read_at::<[u8; OPCODE_LEN]>(ctx, FrameHeaders::PAYLOAD_OFFSET)
        .filter(|_| payload_len >= OPCODE_LEN)
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
        let Some(session) = session::open(ctx, config, &key, frame) else {
            return (BalanceCounter::DropNoBackend, DROP);
        };
        let (counter, action) = to_backend(ctx, config, session, BalanceCounter::NewSession);
        // Kept from the steered packet, once every branch of the steering is behind us: a
        // decision taken before it would double the paths the verifier walks through it.
        if action == DROP || session::keep_request(ctx, &key, FrameHeaders::PAYLOAD_OFFSET + SteeringHeader::LEN, payload_len) {
            return (counter, action);
        }
        let counter = if counter == BalanceCounter::NewSession { BalanceCounter::NewSessionUnkept } else { counter };
        return (counter, action);
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
    session::follow_client(ctx, session, frame);
    if opcode == Some(OPCODE_ACK)
        && payload_len >= DATA_HEADER_LEN
        && let Some(block) = read_at::<[u8; BLOCK_LEN]>(ctx, FrameHeaders::PAYLOAD_OFFSET + OPCODE_LEN)
    {
        session.last_ack = block;
    }
    let verdict = to_backend(ctx, config, session, BalanceCounter::ToBackend);
    keep_upload_data(ctx, verdict)
}

/// After a client packet was steered: an upload's DATA is kept (`LB_UPLOAD_DATA`) for the
/// replica should its backend die with it. Everything is read back from the steered packet
/// (its header says upload, and names the client), so that nothing of the packet's way
/// through the steering stays live across it: each would multiply the paths the verifier
/// walks there.
#[inline(always)]
fn keep_upload_data(ctx: &XdpContext, (counter, action): Verdict) -> Verdict {
    if action == DROP {
        return (counter, action);
    }
    let (Some(frame), Some(header)) = (ptr_at::<FrameHeaders>(ctx, 0), ptr_at::<SteeringHeader>(ctx, FrameHeaders::PAYLOAD_OFFSET)) else {
        return (counter, action);
    };
    // SAFETY: bounds-checked by ptr_at; alignment 1.
    let (frame, header) = unsafe { (&*frame, &*header) };
    let data = FrameHeaders::PAYLOAD_OFFSET + SteeringHeader::LEN;
    if !header.is_upload() || read_at::<[u8; OPCODE_LEN]>(ctx, data).map(u16::from_be_bytes) != Some(OPCODE_DATA) {
        return (counter, action);
    }
    let len = usize::from(frame.udp_len()).saturating_sub(UDP_HEADER_LEN + SteeringHeader::LEN);
    let key = ClientKey::new(header.client_ip, header.client_port);
    if session::keep_data(ctx, &key, data, len) {
        return (counter, action);
    }
    let counter = if counter == BalanceCounter::ToBackend { BalanceCounter::UploadDataUnkept } else { counter };
    (counter, action)
}

/// Sends a client packet to its session's backend with the steering header pushed. A session
/// whose backend is no longer usable moves first, with a nudge: an upload to its replica (the
/// one backend that holds its blocks), anything else to the least loaded backend.
#[inline(always)]
fn to_backend(ctx: &XdpContext, config: &LbConfig, session: &mut Session, counter: BalanceCounter) -> Verdict {
    let mut counter = counter;
    let mut nudge = 0;
    if !backends::usable(session.backend) {
        let Some(id) = upload_replica(&session.header).or_else(backends::least_loaded) else {
            warn!(ctx, "no live backend for a session whose backend {} is gone", session.backend);
            return (BalanceCounter::DropNoBackend, DROP);
        };
        // Rare (the agent normally moves sessions first), so worth a line in the agent's log.
        info!(ctx, "session moved in the kernel from backend {} to {}", session.backend, id);
        session::move_to(session, id);
        nudge = FLAG_NUDGE;
        counter = BalanceCounter::Moved;
    }
    let (Some(backend), Some(seen)) = (LB_BACKENDS.get(session.backend), LB_SEEN.get_ptr_mut(session.backend)) else {
        return (BalanceCounter::DropNoBackend, DROP);
    };
    // SAFETY: map value pointer from a successful lookup.
    let seen = unsafe { &mut *seen };
    let to = Addresses {
        eth_dst: &seen.mac,
        eth_src: &seen.lb_mac,
        ip_src: &config.steer_addr,
        ip_dst: &backend.ip,
        udp_src: &config.steer_port,
        udp_dst: &backend.port,
    };
    let flags = (session.header.flags & FLAG_HAS_CONTEXT) | nudge;
    if encap::push(ctx, &session.header, flags, &to).is_err() {
        return (BalanceCounter::DropAdjustHead, DROP);
    }
    watchdog::sent_to(seen);
    (counter, egress(ctx, seen.ifindex))
}

/// The usable backend an upload's header names as its replica.
#[inline(always)]
fn upload_replica(header: &SteeringHeader) -> Option<u32> {
    let (ip, port) = header.replica()?;
    let id = backends::find(ip, port)?;
    backends::usable(id).then_some(id)
}

/// A packet to the steering port: only registered backends may send there.
#[inline(always)]
fn backend_packet(ctx: &XdpContext, config: &LbConfig, frame: &mut FrameHeaders) -> Verdict {
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
    if !header.has_magic() || !header.has_flag(FLAG_FROM_BACKEND) || usize::from(frame.udp_len()) < STEERED_UDP_LEN {
        return (BalanceCounter::DropBadHeader, DROP);
    }
    if let Some(seen) = LB_SEEN.get_ptr_mut(id) {
        let link = Link { mac: &frame.eth_src, our_mac: &frame.eth_dst, ifindex: ctx.ingress_ifindex() as u32 };
        // SAFETY: map value pointer from a successful lookup.
        watchdog::answered_by(unsafe { &mut *seen }, Some(link));
    }
    if header.has_flag(FLAG_HEARTBEAT) {
        // The agent's probe socket wants it too.
        return (BalanceCounter::Heartbeat, PASS);
    }
    if header.has_flag(FLAG_HEARD) {
        // The backend read a datagram that needed no reply: an answer for the watchdog,
        // nothing for the client.
        return (BalanceCounter::BackendHeard, DROP);
    }
    if usize::from(frame.udp_len()) > STEERED_UDP_LEN + header.longest_reply() {
        return (BalanceCounter::DropOversize, DROP);
    }
    let key = ClientKey::new(header.client_ip, header.client_port);
    let (session, counter) = match LB_SESSIONS.get_ptr_mut(key) {
        Some(session) => (session, BalanceCounter::ToClient),
        None if header.has_flag(FLAG_FINISHED) => return (BalanceCounter::SessionFinished, DROP),
        None => match session::relearn(config, &key, id) {
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
        session::finish(&key, id);
        return (BalanceCounter::SessionFinished, DROP);
    }
    session::learn_context(&key, session, header);
    to_client(ctx, config, frame, session, header, counter)
}

/// Sends a backend's reply to the client from VIP:TID with the steering header popped.
#[inline(always)]
fn to_client(
    ctx: &XdpContext,
    config: &LbConfig,
    frame: &mut FrameHeaders,
    session: &mut Session,
    header: &SteeringHeader,
    counter: BalanceCounter,
) -> Verdict {
    if session.ifindex == 0 {
        let ip_len = frame.ip_len().saturating_sub(SteeringHeader::LEN as u16);
        let Some(hop) = route::toward(ctx, config.vip, header.client_ip, ip_len) else {
            return (BalanceCounter::DropNoRoute, DROP);
        };
        session.ifindex = hop.ifindex;
        session.client_mac = hop.dst_mac;
        session.lb_mac = hop.src_mac;
    }
    let to = Addresses {
        eth_dst: &session.client_mac,
        eth_src: &session.lb_mac,
        ip_src: &config.vip,
        ip_dst: &header.client_ip,
        udp_src: &session.header.vip_port,
        udp_dst: &header.client_port,
    };
    match encap::pop(ctx, frame, header, &to) {
        Ok(()) => (counter, egress(ctx, session.ifindex)),
        Err(Failed::Short) => (BalanceCounter::DropBadHeader, DROP),
        Err(Failed::AdjustHead) => (BalanceCounter::DropAdjustHead, DROP),
    }
}
