//! The load balancer agent (`xdp-lb balance`): loads and attaches `balance`, keeps its maps, and
//! runs the watchdog that moves sessions off dead backends.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};
use xdp_lb_common::{
    Backend, BalanceCounter, ClientKey, Health, LbConfig, SessionEvent, SteeringHeader,
    maps::{BACKEND_DEAD, BACKEND_FACING, BACKEND_LIVE, BACKEND_UNUSED, EVENT_CHANGED, MAX_BACKENDS, pace},
    names::{PROGRAM_BALANCE, ROLE_BALANCE},
    steering::FLAG_HEARTBEAT,
};

use crate::{
    clock::monotonic_ns,
    control::{self, BackendView, Detector, Outcome},
    ifaces, loader,
    maps::{self, LbMaps},
    pair::{self, Pair, PairEvent, Role},
    pins,
    planner::{self, Occasion},
};

/// Most sessions moved off a dead backend per watchdog tick (the rest on the next ticks, and
/// the kernel moves any session on its client's next packet anyway): a backend holding the
/// sessions of a request flood must not stall the agent's loop.
const MOVE_BATCH: usize = 2048;

/// The options of `xdp-lb balance`, from the command line or a `--config` file (serde names are
/// the long option names).
#[derive(clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Args {
    /// Interface to attach the `balance` XDP program to; repeat for several (client side and
    /// backend side).
    #[arg(long = "iface", value_name = "IFACE", required = true)]
    #[serde(rename = "iface")]
    interfaces: Vec<String>,

    /// The service address (VIP) clients send TFTP requests to. It must be configured on this
    /// host so it answers ARP for it.
    // Required on the command line unless a --config file gives it; the hidden default only
    // lets the command line parse without it before the file's value replaces it (config.rs).
    #[arg(long, value_name = "IPV4", required = true, default_value_t = Ipv4Addr::UNSPECIFIED, hide_default_value = true)]
    vip: Ipv4Addr,

    /// A backend's steered-mode address (`tftp-backend --steered --listen ADDR:PORT`); repeat
    /// for each, up to 16.
    #[arg(long = "backend", value_name = "ADDR:PORT", required = true)]
    #[serde(rename = "backend")]
    backends: Vec<SocketAddrV4>,

    /// This balancer's own address toward the backends (source of steered packets; backends
    /// answer there). Default: the first IPv4 address of the first --iface other than the VIP.
    #[arg(long, value_name = "IPV4")]
    address: Option<Ipv4Addr>,

    /// UDP port on --address where backends answer.
    #[arg(long, default_value_t = 6969)]
    steer_port: u16,

    #[command(flatten)]
    #[serde(flatten)]
    watchdog: control::WatchdogArgs,

    /// Sessions whose client has been quiet this long are forgotten (seconds).
    #[arg(long, default_value_t = 120)]
    session_idle_secs: u64,

    /// XDP attach mode: `auto` lets the kernel choose, `native` requires driver support, `skb`
    /// (generic XDP) works everywhere.
    #[arg(long, value_enum, default_value_t)]
    xdp_mode: loader::AttachMode,

    /// An --iface that faces the backends (repeat for several). Only frames arriving there may
    /// carry a registered backend's address and port: the balancer learns a backend's MAC and
    /// liveness from them. The same source on any other interface is dropped and counted as
    /// `drop_backend_wrong_side`. Default: every --iface (one interface for clients and
    /// backends); give it where the backends have their own network.
    #[arg(long = "backend-iface", value_name = "IFACE")]
    #[serde(rename = "backend-iface")]
    backend_interfaces: Vec<String>,

    /// Requests (RRQ/WRQ) admitted per second from one client address, on average; more are
    /// dropped in the kernel and counted as `drop_rate_limited`. 0: no limit.
    #[arg(long, default_value_t = 50)]
    requests_per_sec: u32,

    /// Requests one client address may send at once before the per-second rate applies.
    #[arg(long, default_value_t = 100)]
    request_burst: u32,

    /// Requests admitted per second from all addresses of one /24 together, on average; more
    /// are dropped in the kernel and counted as `drop_prefix_rate_limited`. Against floods
    /// from many (or spoofed) addresses of one network; a rack of machines booting at once
    /// shares it (a few requests per machine and file). 0: no limit.
    #[arg(long, default_value_t = 2000)]
    requests_per_prefix_sec: u32,

    /// Requests one /24 may send at once before --requests-per-prefix-sec applies.
    #[arg(long, default_value_t = 4000)]
    prefix_burst: u32,

    /// New sessions this balancer admits per second, all clients together; more requests are
    /// dropped in the kernel and counted as `drop_session_budget` (running transfers are never
    /// limited). The last guard against a flood from everywhere: it keeps the backends and the
    /// session table working for the transfers in flight. Each CPU gets an equal share (a
    /// per-CPU token bucket, no locks). 0: no limit.
    #[arg(long, default_value_t = 20_000)]
    new_sessions_per_sec: u32,

    /// New sessions this balancer admits at once before --new-sessions-per-sec applies.
    #[arg(long, default_value_t = 20_000)]
    new_session_burst: u32,

    #[command(flatten)]
    #[serde(flatten)]
    pair: pair::PairArgs,
}

pub fn run(pin_root: &Path, args: &Args) -> anyhow::Result<()> {
    if args.backends.len() > MAX_BACKENDS {
        bail!("at most {MAX_BACKENDS} backends, got {}", args.backends.len());
    }
    if let Some(stray) = args.backend_interfaces.iter().find(|i| !args.interfaces.contains(i)) {
        bail!("--backend-iface {stray} is not one of the --iface interfaces the balancer attaches to");
    }
    // Before anything is loaded or attached: no key, no agent (unless --insecure-control).
    let keys = args.pair.auth.keyring()?;
    crate::sched::realtime(args.watchdog.rt_priority);
    crate::block_on(serve(pin_root, args, keys))
}

async fn serve(pin_root: &Path, args: &Args, keys: crate::pair_wire::Keyring) -> anyhow::Result<()> {
    let address = match args.address {
        Some(address) => address,
        None => ifaces::interface_address(&args.interfaces[0], args.vip)?,
    };
    let pin_dir = pins::prepare_role_dir(pin_root, ROLE_BALANCE)?;
    let mut ebpf = loader::load_pinned(&pin_dir, maps::ALL)?;
    let mut lb_maps = LbMaps::take(&mut ebpf)?;
    let events = pair::watch_events(maps::events(&mut ebpf)?)?;
    let mut own_macs = maps::own_macs(&mut ebpf)?;
    for (ifindex, mac) in ifaces::interface_macs(&args.interfaces)? {
        own_macs.insert(ifindex, mac, 0).context("writing LB_OWN_MACS")?;
    }
    configure(&mut lb_maps, args, address)?;
    // Before attaching: the new program drops backends' frames from any other interface.
    let backend_side = if args.backend_interfaces.is_empty() { &args.interfaces } else { &args.backend_interfaces };
    let mut backend_ifaces = maps::backend_ifaces(&mut ebpf)?;
    for iface in backend_side {
        backend_ifaces.insert(ifaces::interface_index(iface)?, BACKEND_FACING, 0).context("writing LB_BACKEND_IFACES")?;
    }
    let links = loader::attach_pinned(&mut ebpf, PROGRAM_BALANCE, &args.interfaces, args.xdp_mode, &pin_dir)?;
    let socket = UdpSocket::bind(SocketAddrV4::new(address, args.steer_port))
        .await
        .with_context(|| format!("cannot bind the steering port {address}:{}", args.steer_port))?;
    info!(
        interfaces = ?args.interfaces, vip = %args.vip, %address, backends = ?args.backends,
        pin_dir = %pin_dir.display(), "balance attached"
    );
    let pair = Pair::bind(address, &args.pair, keys, &lb_maps).await?;
    let started_ns = monotonic_ns();
    let mut agent = Agent {
        maps: lb_maps,
        backends: args.backends.clone(),
        started_ns,
        dead_since_ns: vec![started_ns; args.backends.len()],
        detector: Detector::new(args.backends.len(), &args.watchdog),
        flooded: false,
        draining: std::collections::BTreeSet::new(),
        socket,
        session_idle: Duration::from_secs(args.session_idle_secs),
        pair,
        events,
        sought: std::collections::HashMap::new(),
        awaiting_data: None,
    };
    agent.run(args).await?;
    // Clean shutdown: unpinning and closing the links detaches the program (a killed agent
    // leaves them pinned, steering, for the next one to re-adopt); the pinned maps stay for
    // `xdp-lb status` and for the next agent.
    info!(links = ?links.paths(), "shutting down, unpinning the links and detaching");
    links.detach()?;
    drop(ebpf);
    Ok(())
}

/// Writes the VIP and the backends, keeping the state of backends a previous agent already
/// registered at the same slot (re-adoption: their sessions stay where they are).
fn configure(maps: &mut LbMaps, args: &Args, address: Ipv4Addr) -> anyhow::Result<()> {
    let (request_interval_ns, request_burst_ns) = pace(args.requests_per_sec, args.request_burst, 1);
    let (prefix_interval_ns, prefix_burst_ns) = pace(args.requests_per_prefix_sec, args.prefix_burst, 1);
    // Packets of one flood spread over the CPUs that receive them: each gets its share.
    let cpus = aya::util::online_cpus().map_or(1, |cpus| u32::try_from(cpus.len()).unwrap_or(1));
    let (budget_interval_ns, budget_burst_ns) = pace(args.new_sessions_per_sec, args.new_session_burst, cpus);
    let config = LbConfig {
        vip: args.vip.octets(),
        steer_addr: address.octets(),
        steer_port: args.steer_port.to_be_bytes(),
        request_interval_ns,
        request_burst_ns,
        prefix_interval_ns,
        prefix_burst_ns,
        budget_interval_ns,
        budget_burst_ns,
        ..LbConfig::default()
    };
    maps.config.set(0, config, 0).context("writing LB_CONFIG")?;
    for id in 0..MAX_BACKENDS {
        let id_u32 = u32::try_from(id)?;
        let old = maps.backend(id_u32)?;
        let backend = match args.backends.get(id) {
            Some(addr) => {
                let (ip, port) = (addr.ip().octets(), addr.port().to_be_bytes());
                let adopted = old.ip == ip && old.port == port && old.state != BACKEND_UNUSED;
                Backend { ip, port, state: if adopted { old.state } else { BACKEND_DEAD }, pad: 0 }
            }
            None => Backend::default(),
        };
        maps.backends.set(id_u32, backend, 0).context("writing LB_BACKENDS")?;
    }
    Ok(())
}

struct Agent {
    maps: LbMaps,
    backends: Vec<SocketAddrV4>,
    /// When this agent started: the watchdog's clock for every backend starts no earlier.
    started_ns: u64,
    /// When the agent declared each backend dead (its start for those dead from the start).
    dead_since_ns: Vec<u64>,
    /// The failure detector's memory (heartbeats, patience, tick timing).
    detector: Detector,
    /// Whether the detector last saw a request flood in progress (to log its start and end).
    flooded: bool,
    /// Dead backends that still hold sessions to move (more than one tick's batch).
    draining: std::collections::BTreeSet<usize>,
    /// Bound to the steering address and port: heartbeats and nudges leave from here, so
    /// backends answer to the port `balance` watches.
    socket: UdpSocket,
    session_idle: Duration,
    /// The switch's heartbeats and the peer balancer's session sync.
    pair: Pair,
    /// Sessions the kernel just created or moved (from `LB_EVENTS`).
    events: tokio::sync::mpsc::Receiver<SessionEvent>,
    /// When the backends were last asked about a client without a session (see `seek`).
    sought: std::collections::HashMap<ClientKey, Instant>,
    /// Since a takeover, until the first reply reaches a client: when, and the replies counted
    /// then (for the failover timeline in the log).
    awaiting_data: Option<(Instant, u64)>,
}

impl Agent {
    async fn run(&mut self, args: &Args) -> anyhow::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let (mut tick, mut probe) = args.watchdog.intervals();
        let mut maintain = tokio::time::interval(Duration::from_secs(1));
        let mut sync = tokio::time::interval(Duration::from_millis(args.pair.sync_ms.max(1)));
        let mut buf = [0u8; 2048];
        let mut control = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = terminate.recv() => return Ok(()),
                _ = tick.tick() => self.watchdog().await?,
                _ = probe.tick() => self.probe().await,
                _ = maintain.tick() => self.maintain()?,
                // Heartbeat answers: the kernel already recorded them; just drain the socket.
                _ = self.socket.recv_from(&mut buf) => {}
                _ = sync.tick() => self.pair.sync(&self.maps).await,
                Some(event) = self.events.recv() => {
                    // At most a batch per turn: under a flood of new sessions the other
                    // branches (heartbeats to answer, the watchdog) get their turns too.
                    const BATCH: usize = 256;
                    let mut events = vec![event];
                    while events.len() < BATCH && let Ok(event) = self.events.try_recv() {
                        events.push(event);
                    }
                    let (changed, unknown): (Vec<SessionEvent>, Vec<SessionEvent>) =
                        events.into_iter().partition(|e| e.kind == EVENT_CHANGED);
                    let changed: Vec<ClientKey> = changed.iter().map(|e| e.key).collect();
                    self.pair.announce(&changed, &self.maps).await;
                    self.seek(args.vip, unknown.iter().map(|e| e.key)).await;
                }
                received = self.pair.recv(&mut control) => {
                    let Ok((len, from)) = received else { continue };
                    if self.pair.on_datagram(&control[..len], from, &mut self.maps).await == PairEvent::Promoted {
                        self.take_over().await?;
                    }
                }
            }
        }
    }

    fn views(&self) -> anyhow::Result<Vec<BackendView>> {
        (0..self.backends.len())
            .map(|id| {
                let id_u32 = u32::try_from(id)?;
                let (backend, seen) = (self.maps.backend(id_u32)?, self.maps.seen(id_u32)?);
                // A restarted agent re-adopts the kernel's record of answers, which stopped while
                // no agent sent heartbeats (or this balancer's link was down): every backend gets
                // the full allowance from this agent's start before silence counts against it.
                Ok(BackendView {
                    state: backend.state,
                    unanswered: seen.unanswered,
                    unanswered_since_ns: seen.unanswered_since_ns.max(self.started_ns),
                    last_answer_ns: seen.last_answer_ns.max(self.started_ns),
                    mac_known: seen.mac != [0; 6],
                    sessions: self.maps.load(id_u32)?,
                    dead_since_ns: self.dead_since_ns[id],
                    address: (backend.ip, backend.port),
                    ..BackendView::default()
                })
            })
            .collect()
    }

    /// Replies this balancer delivered to clients (steered or relearned).
    fn replies_delivered(&self) -> anyhow::Result<u64> {
        let counters = self.maps.counters()?;
        Ok(counters[BalanceCounter::ToClient as usize].packets + counters[BalanceCounter::Relearned as usize].packets)
    }

    /// Completes the failover timeline once data flows through this balancer.
    fn note_first_data(&mut self) -> anyhow::Result<()> {
        if let Some((since, before)) = self.awaiting_data
            && self.replies_delivered()? > before
        {
            info!(after_ms = since.elapsed().as_millis(), "first DATA to a client through this balancer since it took over");
            self.awaiting_data = None;
        }
        Ok(())
    }

    async fn watchdog(&mut self) -> anyhow::Result<()> {
        self.note_first_data()?;
        let now = monotonic_ns();
        let late = self.detector.begin_tick(now);
        if let Some(late) = late {
            warn!(late_ms = late.as_millis(), "watchdog tick late (machine overloaded?): waiting for fresh heartbeats");
        }
        let counters = self.maps.counters()?;
        // Requests reach the active balancer; a backup sees them as sessions the peer mirrors.
        let requests = [BalanceCounter::NewSession, BalanceCounter::NewSessionUnkept, BalanceCounter::DropRateLimited].iter().map(|c| counters[*c as usize].packets).sum::<u64>()
            + self.pair.mirrored_new;
        let flooded = self.detector.note_requests(now, requests);
        if flooded != self.flooded {
            self.flooded = flooded;
            if flooded {
                warn!("request flood in progress: backends get more time before a verdict");
            } else {
                info!("request flood over");
            }
        }
        let mut views = self.views()?;
        for (id, view) in views.iter_mut().enumerate() {
            self.detector.observe(id, now, view, late.is_some());
        }
        // Dead backends whose sessions did not all fit in one tick's batch.
        for id in self.draining.clone() {
            let (moved, nudged, left) = if views[id].state == BACKEND_DEAD { self.move_sessions(id, &views).await? } else { (0, 0, 0) };
            debug!(backend = %self.backends[id], moved, nudged, left, "moving the rest of a dead backend's sessions");
            if left == 0 {
                self.draining.remove(&id);
            }
        }
        for id in 0..views.len() {
            let mut health = self.health(id)?;
            let others_usable = views.iter().enumerate().any(|(other, v)| other != id && v.state == BACKEND_LIVE && v.mac_known);
            match self.detector.decide(id, now, &views[id], &mut health, others_usable) {
                Outcome::Keep => {}
                Outcome::Revived => {
                    self.set_health(id, health)?;
                    self.set_state(id, BACKEND_LIVE)?;
                    views[id].state = BACKEND_LIVE;
                    info!(backend = %self.backends[id], revivals = health.revivals, "backend answers: back in the active set");
                }
                Outcome::Died { reason, hold } => {
                    self.set_health(id, health)?;
                    self.set_state(id, BACKEND_DEAD)?;
                    views[id].state = BACKEND_DEAD;
                    self.dead_since_ns[id] = now;
                    let started = Instant::now();
                    let (moved, nudged, left) = self.move_sessions(id, &views).await?;
                    warn!(
                        backend = %self.backends[id], %reason, moved, nudged, left,
                        took_us = started.elapsed().as_micros(),
                        "backend dead: sessions moved to live backends"
                    );
                    if left > 0 {
                        self.draining.insert(id);
                    }
                    if !hold.is_zero() {
                        warn!(backend = %self.backends[id], flaps = health.flaps, hold_ms = hold.as_millis(), "backend flapping: held out of the active set");
                    }
                }
            }
        }
        Ok(())
    }

    fn health(&self, id: usize) -> anyhow::Result<Health> {
        self.maps.health.get(&u32::try_from(id)?, 0).with_context(|| format!("reading the health of backend {id}"))
    }

    fn set_health(&mut self, id: usize, health: Health) -> anyhow::Result<()> {
        self.maps.health.set(u32::try_from(id)?, health, 0).context("writing LB_HEALTH")
    }

    fn set_state(&mut self, id: usize, state: u8) -> anyhow::Result<()> {
        let id_u32 = u32::try_from(id)?;
        let mut backend = self.maps.backend(id_u32)?;
        backend.state = state;
        self.maps.backends.set(id_u32, backend, 0).context("writing LB_BACKENDS")?;
        Ok(())
    }

    /// Moves up to `MOVE_BATCH` sessions of backend `dead` to the least loaded live backends and
    /// nudges their new backends so they resend the outstanding window at once (the planner's
    /// rules: recent clients first; a backup only rewrites, it nudges when it takes over).
    /// Returns (moved, nudged, left for the next tick).
    async fn move_sessions(&mut self, dead: usize, views: &[BackendView]) -> anyhow::Result<(usize, usize, usize)> {
        let plan = planner::plan(Occasion::BackendDied(u32::try_from(dead)?), views, self.maps.sessions(), monotonic_ns(), self.pair.role(), MOVE_BATCH);
        if plan.stranded > 0 {
            warn!(stranded = plan.stranded, "no live backend to move sessions to");
        }
        let (moved, nudged) = self.carry_out(&plan).await;
        for (id, load) in plan.loads.iter().enumerate() {
            self.maps.load.set(u32::try_from(id)?, load, 0).context("writing LB_LOAD")?;
        }
        Ok((moved, nudged, plan.left))
    }

    /// Writes a plan's moves and sends its nudges; returns how many of each went through.
    async fn carry_out(&mut self, plan: &planner::Plan) -> (usize, usize) {
        let mut moved = 0;
        for (key, session) in &plan.moves {
            match self.maps.sessions.insert(key, session, 0) {
                Ok(()) => moved += 1,
                Err(error) => debug!(%error, "session vanished while moving it"),
            }
        }
        let mut nudged = 0;
        for session in &plan.nudges {
            let Some(&to) = self.backends.get(session.backend as usize) else { continue };
            let key = ClientKey::new(session.header.client_ip, session.header.client_port);
            let request = plan.resends.contains(&key).then(|| self.maps.kept_request(key)).flatten();
            let handed = plan.handovers.contains(&key).then(|| self.maps.kept_data(key)).flatten().and_then(|data| control::hand_over_data(session, &data));
            let handed_over = request.is_none() && handed.is_some();
            let datagram = match (&request, handed) {
                (Some(request), _) => control::resend_request(session, request),
                (None, Some(handed)) => handed,
                (None, None) => control::nudge(session),
            };
            match self.socket.send_to(&datagram, to).await {
                Ok(_) if request.is_some() => {
                    info!(client = ?key, backend = %to, "the request of a session moved before its first answer resent to its new backend");
                    nudged += 1;
                }
                Ok(_) if handed_over => {
                    info!(client = ?key, backend = %to, "the last DATA of an upload moved to its replica handed over with the nudge");
                    nudged += 1;
                }
                Ok(_) => nudged += 1,
                Err(error) => warn!(%error, backend = %to, "nudge failed"),
            }
        }
        (moved, nudged)
    }

    /// The switch made this balancer active: every session it knows (mirrored from the peer)
    /// gets its backend nudged, so the outstanding window comes through this balancer now;
    /// sessions on a backend this balancer considers dead move first.
    async fn take_over(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        self.maintain()?;
        let views = self.views()?;
        let sessions = self.maps.sessions();
        let known = sessions.len();
        let plan = planner::plan(Occasion::TakeOver, &views, sessions, monotonic_ns(), Role::Active, usize::MAX);
        let (moved, nudged) = self.carry_out(&plan).await;
        if nudged + moved > 0 {
            warn!(nudged, moved, known, quiet = plan.quiet, took_us = started.elapsed().as_micros(), "now the active balancer: backends nudged");
            self.awaiting_data = Some((started, self.replies_delivered()?));
        } else {
            info!("now the active balancer");
        }
        Ok(())
    }

    /// Asks every live backend to resend what is outstanding for clients that sent to their
    /// TID without a session here (one this balancer never learned: it took over between two
    /// syncs, or was restarted). The backend holding the transfer answers through this
    /// balancer and the kernel relearns the session from the reply; the others ignore a nudge
    /// without context. At most once per 100 ms per client.
    async fn seek(&mut self, vip: Ipv4Addr, keys: impl Iterator<Item = ClientKey>) {
        const AGAIN_AFTER: Duration = Duration::from_millis(100);
        let now = Instant::now();
        self.sought.retain(|_, asked| now.duration_since(*asked) < AGAIN_AFTER);
        let live: Vec<SocketAddrV4> = self.views().map_or_else(|_| Vec::new(), |views| {
            views.iter().zip(&self.backends).filter(|(v, _)| v.state == BACKEND_LIVE).map(|(_, b)| *b).collect()
        });
        for key in keys {
            if self.sought.insert(key, now).is_some() {
                continue;
            }
            let datagram = control::nudge_unknown(key, vip.octets());
            for backend in &live {
                let _ = self.socket.send_to(&datagram, backend).await;
            }
            debug!(client = ?key, backends = live.len(), "asked the backends about a client without a session");
        }
    }

    /// Heartbeats to every backend: answers keep live ones live and bring dead ones back.
    async fn probe(&mut self) {
        let mut beat = SteeringHeader::for_client([0; 4], 0, [0; 4], 0);
        beat.flags = FLAG_HEARTBEAT;
        for (id, backend) in self.backends.iter().enumerate() {
            if let Err(error) = self.socket.send_to(bytemuck::bytes_of(&beat), backend).await {
                debug!(%error, %backend, "heartbeat not sent");
                continue;
            }
            let last_answer_ns = u32::try_from(id).ok().and_then(|id| self.maps.seen(id).ok()).map_or(0, |seen| seen.last_answer_ns);
            self.detector.probe_sent(id, monotonic_ns(), last_answer_ns);
        }
    }

    /// Recounts sessions per backend and forgets sessions idle for too long.
    fn maintain(&mut self) -> anyhow::Result<()> {
        self.pair.write_counters(&mut self.maps);
        let now = monotonic_ns();
        let idle = u64::try_from(self.session_idle.as_nanos()).unwrap_or(u64::MAX);
        let mut sessions = self.maps.sessions();
        sessions.retain(|(key, session)| {
            let stale = now.saturating_sub(session.last_client_ns) > idle;
            if stale {
                let _ = self.maps.sessions.remove(key);
            }
            !stale
        });
        let counts = control::count_sessions(&sessions);
        for (id, count) in counts.iter().enumerate().take(self.backends.len()) {
            self.maps.load.set(u32::try_from(id)?, count, 0).context("writing LB_LOAD")?;
        }
        Ok(())
    }
}
