//! The switch agent (`xdp-lb switch`): loads and attaches `switch`, heartbeats both load
//! balancers (telling each whether it is active), and swaps active and backup when the active
//! one stops answering. The kernel re-steers every client at once: they all follow
//! `SW_CONFIG.active`.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use anyhow::{Context as _, bail};
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};
use xdp_lb_common::{
    SwitchConfig, SwitchCounter,
    maps::{BACKEND_DEAD, BACKEND_LIVE, LB_FACING},
    names::{PROGRAM_SWITCH, ROLE_SWITCH},
};

use crate::{
    clock::monotonic_ns,
    control::{self, BackendView, Detector, Outcome},
    control_auth::{AuthArgs, Control, Stats},
    ifaces, loader,
    maps::{self, SWITCH_ALL, SwitchMaps},
    pair_wire::{Keyring, Message, Sender},
    pins, replay,
};

/// The first of the agent's `control_*` slots in `SW_COUNTERS`.
const CONTROL_COUNTERS: u32 = xdp_lb_common::SwitchCounter::ControlAccepted as u32;

/// The control counters are written to the map at most this often.
const COUNTERS_EVERY_NS: u64 = 500_000_000;

/// How long the first --lb has, after the agent starts, to answer before the second one is
/// made active instead.
const STARTUP_GRACE_NS: u64 = 2_000_000_000;

/// The options of `xdp-lb switch`, from the command line or a `--config` file (serde names are
/// the long option names).
#[derive(clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Args {
    /// Interface to attach the `switch` XDP program to; repeat for several (the client side
    /// and the load balancer side).
    #[arg(long = "iface", value_name = "IFACE", required = true)]
    #[serde(rename = "iface")]
    interfaces: Vec<String>,

    /// An --iface that faces the load balancers (repeat for several). Only frames arriving on
    /// one of these may carry a load balancer's or the VIP's source address: the switch learns
    /// a balancer's MAC and liveness from them. The same addresses arriving on any other
    /// interface (the clients' side) are dropped and counted as `drop_spoofed_lb`: one spoofed
    /// frame there would otherwise send the VIP's traffic to its sender.
    #[arg(long = "lb-iface", value_name = "IFACE", required = true)]
    #[serde(rename = "lb-iface")]
    lb_interfaces: Vec<String>,

    /// The service address (VIP) whose traffic goes to the active load balancer.
    // Required on the command line unless a --config file gives it; the hidden default only
    // lets the command line parse without it before the file's value replaces it (config.rs).
    #[arg(long, value_name = "IPV4", required = true, default_value_t = Ipv4Addr::UNSPECIFIED, hide_default_value = true)]
    vip: Ipv4Addr,

    /// A load balancer: its own address and its --control-port. Give exactly two; the first
    /// starts active.
    #[arg(long = "lb", value_name = "ADDR:PORT", required = true)]
    #[serde(rename = "lb")]
    lbs: Vec<SocketAddrV4>,

    /// Local address the heartbeats leave from (default: chosen by the routing table).
    #[arg(long, value_name = "IPV4")]
    address: Option<Ipv4Addr>,

    #[command(flatten)]
    #[serde(flatten)]
    watchdog: control::WatchdogArgs,

    /// A client counts as in flight while its last packet is younger than this (ms).
    #[arg(long, default_value_t = 2000)]
    client_window_ms: u64,

    /// XDP attach mode: `auto` lets the kernel choose, `native` requires driver support, `skb`
    /// (generic XDP) works everywhere.
    #[arg(long, value_enum, default_value_t)]
    xdp_mode: loader::AttachMode,

    #[command(flatten)]
    #[serde(flatten)]
    auth: AuthArgs,
}

pub fn run(pin_root: &Path, args: &Args) -> anyhow::Result<()> {
    let [first, second] = args.lbs[..] else {
        bail!("give exactly two load balancers with --lb, got {}", args.lbs.len());
    };
    if first.ip() == second.ip() {
        bail!("the two load balancers need different addresses, both are {}", first.ip());
    }
    // Before anything is loaded or attached: no key, no agent (unless --insecure-control).
    if let Some(stray) = args.lb_interfaces.iter().find(|i| !args.interfaces.contains(i)) {
        bail!("--lb-iface {stray} is not one of the --iface interfaces the switch attaches to");
    }
    let keys = args.auth.keyring()?;
    crate::sched::realtime(args.watchdog.rt_priority);
    crate::block_on(serve(pin_root, args, keys))
}

async fn serve(pin_root: &Path, args: &Args, keys: Keyring) -> anyhow::Result<()> {
    let pin_dir = pins::prepare_role_dir(pin_root, ROLE_SWITCH)?;
    let mut ebpf = loader::load_pinned(&pin_dir, SWITCH_ALL)?;
    let mut maps = SwitchMaps::take(&mut ebpf)?;
    let active = configure(&mut maps, args)?;
    // Before attaching: the new program drops balancers' frames from any other interface.
    let mut lb_ifaces = maps::lb_ifaces(&mut ebpf)?;
    for iface in &args.lb_interfaces {
        lb_ifaces.insert(ifaces::interface_index(iface)?, LB_FACING, 0).context("writing SW_LB_IFACES")?;
    }
    // Pinned links: a killed agent leaves the switch steering; the next one re-adopts them.
    let links = loader::attach_pinned(&mut ebpf, PROGRAM_SWITCH, &args.interfaces, args.xdp_mode, &pin_dir)?;
    let bind = SocketAddrV4::new(args.address.unwrap_or(Ipv4Addr::UNSPECIFIED), 0);
    let socket = UdpSocket::bind(bind).await.with_context(|| format!("cannot bind the heartbeat socket {bind}"))?;
    info!(interfaces = ?args.interfaces, vip = %args.vip, lbs = ?args.lbs, active = %args.lbs[active], pin_dir = %pin_dir.display(), "switch attached");
    let stats = Stats::from_counters(&maps::agent_counters(&maps.counters, CONTROL_COUNTERS, Stats::SLOTS));
    // Carried on from a previous agent, as the control counters are.
    let replayed = maps::agent_counters(&maps.counters, SwitchCounter::RequestReplayed as u32, 1)[0];
    let me = match socket.local_addr()? {
        std::net::SocketAddr::V4(me) => me,
        std::net::SocketAddr::V6(_) => bind,
    };
    let control = Control::new(keys, Sender::Switch, me, args.auth.max_skew(), args.lbs.iter().map(|lb| *lb.ip()).collect(), stats);
    control.log_keys("switch");
    let mut agent = Agent {
        maps,
        lbs: [args.lbs[0], args.lbs[1]],
        states: [BACKEND_DEAD; 2],
        dead_since_ns: [0; 2],
        detector: Detector::new(2, &args.watchdog),
        client_window_ns: args.client_window_ms * 1_000_000,
        socket,
        started_ns: monotonic_ns(),
        control,
        counters_written_ns: 0,
        counters_failed: false,
        replayed,
    };
    agent.run(args).await?;
    info!(links = ?links.paths(), "shutting down, unpinning the links and detaching");
    links.detach()?;
    drop(ebpf);
    Ok(())
}

/// Writes the VIP and the balancers. A previous agent's choice of the active one is kept when
/// the balancers are the same (a restarted agent does not swap).
fn configure(maps: &mut SwitchMaps, args: &Args) -> anyhow::Result<usize> {
    let lbs = [args.lbs[0].ip().octets(), args.lbs[1].ip().octets()];
    let old = maps.config().unwrap_or_default();
    let active = if old.lbs == lbs && old.vip == args.vip.octets() { old.active & 1 } else { 0 };
    let config = SwitchConfig { vip: args.vip.octets(), lbs, active };
    maps.config.set(0, config, 0).context("writing SW_CONFIG")?;
    Ok(active as usize)
}

struct Agent {
    maps: SwitchMaps,
    lbs: [SocketAddrV4; 2],
    /// The agent's verdict on each balancer: `BACKEND_LIVE` or `BACKEND_DEAD`.
    states: [u8; 2],
    dead_since_ns: [u64; 2],
    /// The failure detector's memory (heartbeats, patience, tick timing).
    detector: Detector,
    client_window_ns: u64,
    socket: UdpSocket,
    /// When the agent started: the configured active balancer gets `STARTUP_GRACE_NS` to
    /// answer before the backup is preferred, so starting order does not decide the roles.
    started_ns: u64,
    /// Seals the heartbeats; checks the balancers' echoes and rejection notices.
    control: Control,
    counters_written_ns: u64,
    counters_failed: bool,
    /// Requests steered again at swaps (`request_replayed`).
    replayed: u64,
}

impl Agent {
    async fn run(&mut self, args: &Args) -> anyhow::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let (mut tick, mut probe) = args.watchdog.intervals();
        let mut buf = [0u8; 512];
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = terminate.recv() => return Ok(()),
                _ = tick.tick() => self.watchdog().await?,
                _ = probe.tick() => {
                    self.heartbeat().await?;
                    self.note_probes()?;
                }
                // Answers: the kernel recorded them from the balancers' frames. Echoes are checked
                // (a forged one is counted) and rejection notices reported.
                received = self.socket.recv_from(&mut buf) => {
                    if let Ok((len, from)) = received {
                        self.control.receive_echo(&buf[..len], from);
                    }
                }
            }
        }
    }

    fn active(&self) -> anyhow::Result<usize> {
        Ok((self.maps.config()?.active & 1) as usize)
    }

    /// Tells each balancer its role; the answers (any frame from it) keep it alive.
    async fn heartbeat(&mut self) -> anyhow::Result<()> {
        let active = self.active()?;
        for (slot, lb) in self.lbs.iter().enumerate() {
            for datagram in self.control.seal(&Message::Heartbeat { active: slot == active }, *lb) {
                if let Err(error) = self.socket.send_to(&datagram, lb).await {
                    debug!(%error, %lb, "heartbeat not sent");
                }
            }
        }
        Ok(())
    }

    /// Heartbeats just left: each starts waiting unless an older one is still unanswered.
    fn note_probes(&mut self) -> anyhow::Result<()> {
        let now = monotonic_ns();
        for slot in 0..2 {
            let seen = self.maps.seen(u32::try_from(slot)?)?;
            self.detector.probe_sent(slot, now, seen.last_answer_ns);
        }
        Ok(())
    }

    async fn watchdog(&mut self) -> anyhow::Result<()> {
        let now = monotonic_ns();
        if now.saturating_sub(self.counters_written_ns) >= COUNTERS_EVERY_NS && self.control.take_dirty() {
            self.counters_written_ns = now;
            // Not fatal (a counter map pinned by an older version lacks these slots): logged once.
            if let Err(error) = maps::write_agent_counters(&mut self.maps.counters, CONTROL_COUNTERS, &self.control.stats.counters())
                && !std::mem::replace(&mut self.counters_failed, true)
            {
                warn!(error = format!("{error:#}"), "control counters not written: `xdp-lb status` will not show them (a counter map pinned by an older version? remove the pins and restart)");
            }
        }
        let late = self.detector.begin_tick(now);
        if let Some(late) = late {
            warn!(late_ms = late.as_millis(), "watchdog tick late (machine overloaded?): waiting for fresh heartbeats");
        }
        let active = self.active()?;
        for slot in 0..2 {
            let seen = self.maps.seen(u32::try_from(slot)?)?;
            // Clients wait on the active balancer while the last packet steered to it is recent
            // (one read, however many clients a flood put in SW_CLIENTS).
            let clients_waiting = slot == active && now.saturating_sub(seen.last_sent_ns) < self.client_window_ns;
            let mut view = BackendView {
                state: self.states[slot],
                unanswered: seen.unanswered,
                unanswered_since_ns: seen.unanswered_since_ns,
                last_answer_ns: seen.last_answer_ns,
                mac_known: seen.mac != [0; 6],
                sessions: u64::from(clients_waiting),
                dead_since_ns: self.dead_since_ns[slot],
                ..BackendView::default()
            };
            self.detector.observe(slot, now, &mut view, late.is_some());
            let mut health = self.maps.health(u32::try_from(slot)?)?;
            let other_usable = self.states[1 - slot] == BACKEND_LIVE;
            match self.detector.decide(slot, now, &view, &mut health, other_usable) {
                Outcome::Keep => continue,
                Outcome::Revived => {
                    self.states[slot] = BACKEND_LIVE;
                    let role = if slot == active { "active" } else { "backup" };
                    info!(lb = %self.lbs[slot], role, revivals = health.revivals, "load balancer answers");
                }
                Outcome::Died { reason, hold } => {
                    self.states[slot] = BACKEND_DEAD;
                    self.dead_since_ns[slot] = now;
                    warn!(lb = %self.lbs[slot], %reason, clients_waiting, "load balancer dead");
                    if !hold.is_zero() {
                        warn!(lb = %self.lbs[slot], flaps = health.flaps, hold_ms = hold.as_millis(), "load balancer flapping: held out");
                    }
                }
            }
            self.maps.health.set(u32::try_from(slot)?, health, 0).context("writing SW_HEALTH")?;
        }
        let clients = u64::from(now.saturating_sub(self.maps.seen(u32::try_from(active)?)?.last_sent_ns) < self.client_window_ns);
        let backup = 1 - active;
        let grace = self.dead_since_ns[active] == 0 && now.saturating_sub(self.started_ns) < STARTUP_GRACE_NS;
        if self.states[active] != BACKEND_LIVE && self.states[backup] == BACKEND_LIVE && !grace {
            self.swap(backup).await?;
        } else if self.states == [BACKEND_DEAD; 2] && clients > 0 {
            debug!("both load balancers are dead; clients wait");
        }
        Ok(())
    }

    /// Makes `slot` the active balancer: from the next packet on, every client goes there.
    async fn swap(&mut self, slot: usize) -> anyhow::Result<()> {
        let mut config = self.maps.config()?;
        config.active = u32::try_from(slot)?;
        self.maps.config.set(0, config, 0).context("writing SW_CONFIG")?;
        // Tell the new active balancer at once, so it nudges its backends now rather than at
        // the next heartbeat.
        self.heartbeat().await?;
        warn!(active = %self.lbs[slot], dead = %self.lbs[1 - slot], "swapped: the backup load balancer is active now");
        self.replay_requests(1 - slot, slot, config.vip)
    }

    /// Steers the requests the dead balancer may have taken along to the new active one
    /// (`replay`): each one that went to `dead` within the client window and is still its
    /// client's last packet.
    fn replay_requests(&mut self, dead: usize, to: usize, vip: [u8; 4]) -> anyhow::Result<()> {
        let now = monotonic_ns();
        let seen = self.maps.seen(u32::try_from(to)?)?;
        let dead = u32::try_from(dead)?;
        let frames: Vec<Vec<u8>> = self
            .maps
            .requests
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, request)| replay::due(request, self.maps.clients.get(key, 0).ok(), dead, now, self.client_window_ns))
            .filter_map(|(key, request)| replay::frame(key, vip, &seen, request.request.request()?))
            .collect();
        if frames.is_empty() {
            return Ok(());
        }
        match replay::send(seen.ifindex, &frames) {
            Ok(sent) => {
                self.replayed += sent as u64;
                info!(requests = sent, to = %self.lbs[to], "steered again the requests the dead load balancer may have lost");
                if let Err(error) = maps::write_agent_counters(&mut self.maps.counters, SwitchCounter::RequestReplayed as u32, &[self.replayed]) {
                    warn!(error = format!("{error:#}"), "request_replayed not written");
                }
            }
            Err(error) => warn!(%error, requests = frames.len(), ifindex = seen.ifindex, "requests the dead load balancer may have lost not steered again: their clients' timers will resend them"),
        }
        Ok(())
    }
}
