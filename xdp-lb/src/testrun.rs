//! Runs `balance` on crafted packets with BPF_PROG_TEST_RUN: the kernel tests' fixture, and the
//! source of the per-packet cost figures (`xdp-lb bench-xdp`). Needs root, not an interface.

use std::time::Duration;

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, RingBuf},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use xdp_lb_common::{
    Backend, BackendSeen, ClientKey, FrameHeaders, LbConfig, SessionEvent,
    maps::BACKEND_LIVE,
    names::PROGRAM_BALANCE,
};

use crate::maps::LbMaps;

pub const VIP: [u8; 4] = [10, 77, 0, 100];
pub const STEER_ADDR: [u8; 4] = [10, 77, 0, 2];
pub const STEER_PORT: u16 = 6969;
pub const BACKEND_PORT: u16 = 7000;
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
/// Ifindex of a BPF_PROG_TEST_RUN packet without context: the namespace's loopback.
pub const TEST_IFINDEX: u32 = 1;

/// XDP actions as BPF_PROG_TEST_RUN reports them (`enum xdp_action`).
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// Address of backend `id`.
#[must_use]
pub fn backend_ip(id: u32) -> [u8; 4] {
    [10, 77, 0, 11 + u8::try_from(id).unwrap_or(0)]
}

/// MAC address of backend `id`.
#[must_use]
pub fn backend_mac(id: u32) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, 0x20 + u8::try_from(id).unwrap_or(0)]
}

/// A loaded `balance` with a VIP and live backends whose MACs are known.
pub struct Fixture {
    ebpf: Ebpf,
    events: RingBuf<MapData>,
    #[cfg_attr(not(test), expect(dead_code, reason = "read by the kernel tests"))]
    pub maps: LbMaps,
    #[cfg_attr(not(test), expect(dead_code, reason = "changed by the kernel tests"))]
    backend_ifaces: aya::maps::HashMap<MapData, u32, u32>,
}

impl Fixture {
    pub fn new(backends: u32) -> anyhow::Result<Self> {
        let mut ebpf = EbpfLoader::new().load(crate::loader::OBJECT).context("loading the object (root?)")?;
        let program: &mut Xdp = ebpf.program_mut(PROGRAM_BALANCE).context("no balance program")?.try_into()?;
        program.load().context("the verifier rejected balance")?;
        let mut maps = LbMaps::take(&mut ebpf)?;
        let events = crate::maps::events(&mut ebpf)?;
        // The test's frames arrive on the backends' side unless a test says otherwise.
        let mut backend_ifaces = crate::maps::backend_ifaces(&mut ebpf)?;
        backend_ifaces.insert(TEST_IFINDEX, xdp_lb_common::maps::BACKEND_FACING, 0)?;
        let config = LbConfig { vip: VIP, steer_addr: STEER_ADDR, steer_port: STEER_PORT.to_be_bytes(), ..LbConfig::default() };
        maps.config.set(0, config, 0)?;
        for id in 0..backends {
            let backend = Backend { ip: backend_ip(id), port: BACKEND_PORT.to_be_bytes(), state: BACKEND_LIVE, pad: 0 };
            maps.backends.set(id, backend, 0)?;
            let seen = BackendSeen { mac: backend_mac(id), lb_mac: LB_MAC, ifindex: TEST_IFINDEX, ..BackendSeen::default() };
            maps.seen.set(id, seen, 0)?;
        }
        Ok(Self { ebpf, events, maps, backend_ifaces })
    }

    /// The session events the program announced since the last call.
    #[cfg_attr(not(test), expect(dead_code, reason = "read by the kernel tests"))]
    pub fn drain_events(&mut self) -> Vec<SessionEvent> {
        std::iter::from_fn(|| self.events.next().and_then(|item| bytemuck::try_pod_read_unaligned(&item).ok())).collect()
    }

    fn program(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(self.ebpf.program_mut(PROGRAM_BALANCE).context("no balance program")?.try_into()?)
    }

    /// Runs the program once on `frame`: its action and the packet it leaves.
    pub fn run(&mut self, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self.program()?.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })?;
        out.truncate(usize::try_from(result.data_size_out)?);
        Ok((result.return_value, out))
    }

    /// Mean time per run of `frame` over `repeat` runs (the kernel resets the packet each run,
    /// not the maps).
    pub fn time(&mut self, frame: &[u8], repeat: u32) -> anyhow::Result<Duration> {
        let result = self.program()?.test_run(TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::default() })?;
        Ok(result.duration)
    }

}

/// Inspection and fault injection for the kernel tests.
#[cfg(test)]
impl Fixture {
    pub fn counter(&self, which: xdp_lb_common::BalanceCounter) -> anyhow::Result<u64> {
        Ok(self.maps.counters()?[which as usize].packets)
    }

    pub fn session(&self, key: ClientKey) -> Option<xdp_lb_common::Session> {
        self.maps.sessions.get(&key, 0).ok()
    }

    /// Makes the test's interface one that faces only clients (no `--backend-iface`).
    pub fn face_only_clients(&mut self) -> anyhow::Result<()> {
        Ok(self.backend_ifaces.remove(&TEST_IFINDEX)?)
    }

    /// Tells the program the balancer's MAC on the test's interface (as the agent does).
    pub fn set_own_mac(&mut self, mac: [u8; 6]) -> anyhow::Result<()> {
        let mut own = crate::maps::own_macs(&mut self.ebpf)?;
        Ok(own.insert(TEST_IFINDEX, mac, 0)?)
    }

    pub fn set_backend_state(&mut self, id: u32, state: u8) -> anyhow::Result<()> {
        let mut backend = self.maps.backend(id)?;
        backend.state = state;
        Ok(self.maps.backends.set(id, backend, 0)?)
    }
}

/// An Ethernet/IPv4/UDP frame with valid checksums.
#[must_use]
pub fn udp_frame(macs: ([u8; 6], [u8; 6]), src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let headers = FrameHeaders::for_udp(macs, src, dst, payload).expect("payload fits a UDP datagram");
    let mut frame = bytemuck::bytes_of(&headers).to_vec();
    frame.extend_from_slice(payload);
    frame
}

/// A client's frame to the VIP.
#[must_use]
pub fn from_client(client_ip: [u8; 4], client_port: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    udp_frame((CLIENT_MAC, LB_MAC), (client_ip, client_port), (VIP, dport), payload)
}

/// A backend's frame to the steering port: `header` then `payload`.
#[must_use]
pub fn from_backend(id: u32, header: &xdp_lb_common::SteeringHeader, payload: &[u8]) -> Vec<u8> {
    let mut body = bytemuck::bytes_of(header).to_vec();
    body.extend_from_slice(payload);
    udp_frame((backend_mac(id), LB_MAC), (backend_ip(id), BACKEND_PORT), (STEER_ADDR, STEER_PORT), &body)
}

/// Mean cost per packet of each path through `balance`, measured with BPF_PROG_TEST_RUN and
/// `repeat` runs per path (the figures `cargo xtask bench` reports).
pub fn bench(repeat: u32) -> anyhow::Result<Vec<(&'static str, Duration)>> {
    use xdp_lb_common::{SteeringHeader, TFTP_PORT, steering::{FLAG_FROM_BACKEND, FLAG_HAS_CONTEXT}};
    const CLIENT: [u8; 4] = [10, 77, 0, 50];
    const PORT: u16 = 40_000;
    let mut f = Fixture::new(3)?;
    let rrq = from_client(CLIENT, PORT, TFTP_PORT, b"\x00\x01boot/kernel.img\x00octet\x00blksize\x001468\x00");
    let (_, steered) = f.run(&rrq)?;
    let backend = (0..3).find(|&i| steered[30..34] == backend_ip(i)).context("RRQ not steered")?;
    let key = ClientKey::new(CLIENT, PORT.to_be_bytes());
    let mut reply = SteeringHeader::for_client(CLIENT, PORT, VIP, key.tid());
    reply.flags = FLAG_FROM_BACKEND | FLAG_HAS_CONTEXT;
    reply.set_block(1);
    reply.blksize = 1468u16.to_be_bytes();
    let mut data = b"\x00\x03\x00\x01".to_vec();
    data.resize(4 + 1468, 0xa5);
    let paths = [
        ("request: RRQ to VIP:69 -> backend", rrq, XDP_TX),
        ("client ACK -> backend", from_client(CLIENT, PORT, key.tid(), b"\x00\x04\x00\x01"), XDP_TX),
        ("backend DATA 1468 B -> client", from_backend(backend, &reply, &data), XDP_TX),
        ("other traffic: pass", udp_frame((CLIENT_MAC, LB_MAC), (CLIENT, 5353), ([10, 77, 0, 9], 53), b"dns?"), XDP_PASS),
        ("spoofed reply: drop", udp_frame((CLIENT_MAC, LB_MAC), (CLIENT, 7000), (STEER_ADDR, STEER_PORT), &data), XDP_DROP),
    ];
    paths
        .into_iter()
        .map(|(name, frame, action)| {
            // A figure for a path the packet does not take would be a figure for another one.
            let (taken, _) = f.run(&frame)?;
            anyhow::ensure!(taken == action, "{name}: XDP action {taken}, expected {action}");
            Ok((name, f.time(&frame, repeat)?))
        })
        .collect()
}
