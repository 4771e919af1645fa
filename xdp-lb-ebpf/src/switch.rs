//! The switch: client traffic for the VIP goes to the active load balancer, the balancers'
//! replies go to their clients, and every load balancer frame counts as a sign of life for the
//! watchdog. The agent picks the active one; this program only follows `SW_CONFIG`.

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
    programs::XdpContext,
};
use xdp_lb_common::{
    ClientKey, Counter, FrameHeaders, Health, LbSeen, SwitchConfig, SwitchCounter, SwitchRequest, TFTP_PORT,
    frame::UDP_HEADER_LEN,
    maps::{LB_FACING, LB_SLOTS, MAX_LB_IFACES, MAX_SWITCH_REQUESTS},
    tftp::{OPCODE_LEN, OPCODE_RRQ, OPCODE_WRQ},
};

use crate::{
    kept,
    parse::{self, Layer, ptr_at, read_at},
    route::{self, egress},
    watchdog::{self, Link},
};

/// Most clients the switch remembers as in flight (least recently seen evicted first).
const MAX_CLIENTS: usize = 65_536;

#[btf_map]
pub static SW_COUNTERS: PerCpuArray<Counter, { SwitchCounter::COUNT }> = PerCpuArray::new();

#[btf_map]
pub static SW_CONFIG: Array<SwitchConfig, 1> = Array::new();

#[btf_map]
pub static SW_SEEN: Array<LbSeen, LB_SLOTS> = Array::new();

/// The switch agent's verdicts and flap damping per load balancer (agent-only, see LB_HEALTH).
#[btf_map]
pub static SW_HEALTH: Array<Health, LB_SLOTS> = Array::new();

/// The interfaces that face the load balancers (ifindex -> `LB_FACING`), written by the agent
/// from `--lb-iface`. Not pinned: each agent writes it at start.
#[btf_map]
pub static SW_LB_IFACES: HashMap<u32, u32, MAX_LB_IFACES> = HashMap::new();

#[btf_map]
pub static SW_CLIENTS: LruHashMap<ClientKey, u64, MAX_CLIENTS> = LruHashMap::new();

/// Each client's latest request, kept for the agent to steer again should the balancer it
/// went to have died with it (see `SwitchRequest`).
#[btf_map]
pub static SW_REQUESTS: LruHashMap<ClientKey, SwitchRequest, MAX_SWITCH_REQUESTS> = LruHashMap::new();

/// Per-CPU staging slot for an `SW_REQUESTS` entry: larger than the BPF stack.
#[btf_map]
pub static SW_REQUEST_SCRATCH: PerCpuArray<SwitchRequest, 1> = PerCpuArray::new();

type Verdict = (SwitchCounter, u32);

const PASS: u32 = xdp_action::XDP_PASS;
const DROP: u32 = xdp_action::XDP_DROP;

/// Adds one packet of `len` bytes to a decision counter.
#[inline(always)]
pub fn count(counter: SwitchCounter, len: u64) {
    if let Some(slot) = SW_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the per-CPU slot belongs to this CPU for the duration of the program.
        unsafe { (*slot).record(len) };
    }
}

#[inline(always)]
pub fn switch(ctx: &XdpContext) -> Verdict {
    let packet = parse::describe(ctx);
    match packet.layer {
        Layer::Truncated => return (SwitchCounter::DropTruncated, DROP),
        Layer::NotIpv4 => return (SwitchCounter::PassNotIpv4, PASS),
        Layer::NotUdp => return (SwitchCounter::PassNotUdp, PASS),
        Layer::Udp => {}
    }
    let Some(config) = SW_CONFIG.get(0) else {
        return (SwitchCounter::PassOther, PASS);
    };
    let Some(frame) = ptr_at::<FrameHeaders>(ctx, 0) else {
        return (SwitchCounter::DropTruncated, DROP);
    };
    // SAFETY: bounds-checked by ptr_at; alignment 1.
    let frame = unsafe { &mut *frame };
    // Only the balancers' side may speak for a balancer or the VIP: such a frame from the
    // clients' side would teach the switch an attacker's MAC or keep a dead balancer alive.
    let speaks_for_lb = frame.ip_src == config.lbs[0] || frame.ip_src == config.lbs[1] || frame.ip_src == config.vip;
    if speaks_for_lb && !faces_lbs(ctx.ingress_ifindex() as u32) {
        return (SwitchCounter::DropSpoofedLb, DROP);
    }
    if packet.dst_ip == config.vip {
        if !packet.plain {
            return (SwitchCounter::DropFragmentOrOptions, DROP);
        }
        return to_active_lb(ctx, config, frame, packet.dst_port);
    }
    // A load balancer's own traffic teaches us where it is; its replies to clients (from the
    // VIP) are recognised by the MAC learned that way.
    if frame.ip_src == config.lbs[0] || frame.ip_src == config.lbs[1] {
        let slot = u32::from(frame.ip_src == config.lbs[1]);
        answered_by(slot, Some(Link { mac: &frame.eth_src, our_mac: &frame.eth_dst, ifindex: ctx.ingress_ifindex() as u32 }));
        return (SwitchCounter::FromLb, PASS);
    }
    if frame.ip_src == config.vip {
        let Some(slot) = lb_by_mac(frame.eth_src) else {
            return (SwitchCounter::PassOther, PASS);
        };
        answered_by(slot, None);
        return to_client(ctx, frame);
    }
    (SwitchCounter::PassOther, PASS)
}

/// Whether `ifindex` faces the load balancers (`SW_LB_IFACES`).
#[inline(always)]
fn faces_lbs(ifindex: u32) -> bool {
    // SAFETY: a plain hash lookup; the value is copied out at once.
    unsafe { SW_LB_IFACES.get(&ifindex) }.is_some_and(|flag| *flag == LB_FACING)
}

/// A client packet for the VIP: to the active load balancer, unchanged but for the MACs. A
/// request is kept on the way (`SW_REQUESTS`).
#[inline(always)]
fn to_active_lb(ctx: &XdpContext, config: &SwitchConfig, frame: &mut FrameHeaders, port: u16) -> Verdict {
    let slot = config.active & 1;
    let Some(seen) = SW_SEEN.get_ptr_mut(slot) else {
        return (SwitchCounter::DropNoLb, DROP);
    };
    // SAFETY: map value pointer from a successful lookup; racy counters by design.
    let seen = unsafe { &mut *seen };
    if seen.mac == [0; 6] {
        return (SwitchCounter::DropNoLb, DROP);
    }
    watchdog::sent_to(seen);
    // One read: the client's stamp and its request's must be equal (another CPU may stamp
    // `last_sent_ns` anew meanwhile).
    let steered_ns = seen.last_sent_ns;
    let key = ClientKey::new(frame.ip_src, frame.udp_src);
    let _ = SW_CLIENTS.insert(&key, &steered_ns, 0);
    if port == TFTP_PORT {
        keep_request(ctx, &key, frame, slot, steered_ns);
    }
    frame.eth_dst = seen.mac;
    frame.eth_src = seen.lb_mac;
    (SwitchCounter::ToLb, egress(ctx, seen.ifindex))
}

/// Keeps a request (RRQ or WRQ) just steered to balancer `slot` in `SW_REQUESTS`, counted as
/// `request_kept` or `request_unkept`. Anything else to port 69 is the balancer's to judge.
#[inline(always)]
fn keep_request(ctx: &XdpContext, key: &ClientKey, frame: &FrameHeaders, slot: u32, steered_ns: u64) {
    // Read only inside the datagram: Ethernet padding after a short one is not TFTP.
    let payload_len = usize::from(frame.udp_len()).saturating_sub(UDP_HEADER_LEN);
    let opcode = read_at::<[u8; OPCODE_LEN]>(ctx, FrameHeaders::PAYLOAD_OFFSET)
        .filter(|_| payload_len >= OPCODE_LEN)
        .map(u16::from_be_bytes);
    if !matches!(opcode, Some(OPCODE_RRQ | OPCODE_WRQ)) {
        return;
    }
    let len = (ctx.data_end() - ctx.data()) as u64;
    let Some(entry) = SW_REQUEST_SCRATCH.get_ptr_mut(0) else {
        return count(SwitchCounter::RequestUnkept, len);
    };
    // SAFETY: per-CPU slot, ours for the duration of the program.
    let entry = unsafe { &mut *entry };
    entry.steered_ns = steered_ns;
    entry.lb_slot = slot;
    let kept = kept::copy_request(ctx, &mut entry.request, FrameHeaders::PAYLOAD_OFFSET, payload_len) && SW_REQUESTS.insert(key, &*entry, 0).is_ok();
    count(if kept { SwitchCounter::RequestKept } else { SwitchCounter::RequestUnkept }, len);
}

/// A load balancer's reply from the VIP: to the client by the routing table, or through the
/// stack while the client's MAC is not resolved yet.
#[inline(always)]
fn to_client(ctx: &XdpContext, frame: &mut FrameHeaders) -> Verdict {
    let Some(hop) = route::toward(ctx, frame.ip_src, frame.ip_dst, frame.ip_len()) else {
        return (SwitchCounter::ToClientByStack, PASS);
    };
    frame.eth_dst = hop.dst_mac;
    frame.eth_src = hop.src_mac;
    (SwitchCounter::ToClient, egress(ctx, hop.ifindex))
}

/// The slot of the load balancer whose MAC sent a frame.
#[inline(always)]
fn lb_by_mac(mac: [u8; 6]) -> Option<u32> {
    for slot in 0..LB_SLOTS as u32 {
        if SW_SEEN.get(slot).is_some_and(|seen| seen.mac == mac && mac != [0; 6]) {
            return Some(slot);
        }
    }
    None
}

/// Records a frame from load balancer `slot`, and where it came from when it was its own.
#[inline(always)]
fn answered_by(slot: u32, learned: Option<Link<'_>>) {
    if let Some(seen) = SW_SEEN.get_ptr_mut(slot) {
        // SAFETY: map value pointer from a successful lookup.
        watchdog::answered_by(unsafe { &mut *seen }, learned);
    }
}
