//! Typed access to the load balancer's maps, from a freshly loaded object or from their pins.
//! Names and types come from xdp-lb-common.

use std::path::Path;

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf},
};
use xdp_lb_common::{
    Backend, BackendSeen, ClientKey, Counter, Health, KeptData, KeptRequest, LbConfig, LbSeen, Session, SwitchConfig, SwitchRequest,
    names::{
        MAP_LB_BACKEND_IFACES, MAP_LB_BACKENDS, MAP_LB_CONFIG, MAP_LB_COUNTERS, MAP_LB_EVENTS, MAP_LB_HEALTH, MAP_LB_LOAD, MAP_LB_OWN_MACS,
        MAP_LB_REQUESTS, MAP_LB_SEEN, MAP_LB_SESSIONS, MAP_LB_UPLOAD_DATA,
        MAP_SW_CLIENTS, MAP_SW_CONFIG, MAP_SW_REQUESTS, MAP_SW_COUNTERS, MAP_SW_HEALTH, MAP_SW_LB_IFACES, MAP_SW_SEEN,
    },
};

/// Every map of `balance` that an agent, `status` or a test touches. All pinned: a restarted
/// agent carries on from the state of the one before it (`LB_REQUESTS` with `LB_SESSIONS`, so
/// a session in its first moments can still be resent to another backend after a restart, and
/// `LB_UPLOAD_DATA`, so an upload's last DATA can still be handed to its replica).
pub const ALL: &[&str] = &[MAP_LB_COUNTERS, MAP_LB_CONFIG, MAP_LB_BACKENDS, MAP_LB_SEEN, MAP_LB_LOAD, MAP_LB_HEALTH, MAP_LB_SESSIONS, MAP_LB_REQUESTS, MAP_LB_UPLOAD_DATA];

pub struct LbMaps {
    pub counters: PerCpuArray<MapData, Counter>,
    pub config: Array<MapData, LbConfig>,
    pub backends: Array<MapData, Backend>,
    pub seen: Array<MapData, BackendSeen>,
    pub load: Array<MapData, u64>,
    /// The agent's verdicts and flap damping per backend.
    pub health: Array<MapData, Health>,
    pub sessions: HashMap<MapData, ClientKey, Session>,
    /// The request of each session still waiting for its backend's first answer.
    pub requests: HashMap<MapData, ClientKey, KeptRequest>,
    /// The last DATA of each upload's client.
    pub upload_data: HashMap<MapData, ClientKey, KeptData>,
}

impl LbMaps {
    /// Takes the maps out of a loaded object (the programs keep their own references).
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Self::from_maps(|name| take(ebpf, name))
    }

    /// Opens the maps pinned in `dir` (a role directory such as `<pin-root>/balance`).
    pub fn open_pinned(dir: &Path) -> anyhow::Result<Self> {
        Self::from_maps(|name| open_pinned(dir, name))
    }

    fn from_maps(mut get: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Self> {
        let mut typed = |name: &str| -> anyhow::Result<Map> { get(name) };
        Ok(Self {
            counters: PerCpuArray::try_from(typed(MAP_LB_COUNTERS)?).context(MAP_LB_COUNTERS)?,
            config: Array::try_from(typed(MAP_LB_CONFIG)?).context(MAP_LB_CONFIG)?,
            backends: Array::try_from(typed(MAP_LB_BACKENDS)?).context(MAP_LB_BACKENDS)?,
            seen: Array::try_from(typed(MAP_LB_SEEN)?).context(MAP_LB_SEEN)?,
            load: Array::try_from(typed(MAP_LB_LOAD)?).context(MAP_LB_LOAD)?,
            health: Array::try_from(typed(MAP_LB_HEALTH)?).context(MAP_LB_HEALTH)?,
            sessions: HashMap::try_from(typed(MAP_LB_SESSIONS)?).context(MAP_LB_SESSIONS)?,
            requests: HashMap::try_from(typed(MAP_LB_REQUESTS)?).context(MAP_LB_REQUESTS)?,
            upload_data: HashMap::try_from(typed(MAP_LB_UPLOAD_DATA)?).context(MAP_LB_UPLOAD_DATA)?,
        })
    }

    /// Decision counters, each summed over all CPUs, in `BalanceCounter` order.
    pub fn counters(&self) -> anyhow::Result<Vec<Counter>> {
        sum_per_cpu(&self.counters)
    }

    pub fn backend(&self, id: u32) -> anyhow::Result<Backend> {
        self.backends.get(&id, 0).with_context(|| format!("reading backend {id}"))
    }

    pub fn seen(&self, id: u32) -> anyhow::Result<BackendSeen> {
        self.seen.get(&id, 0).with_context(|| format!("reading what the kernel saw of backend {id}"))
    }

    pub fn load(&self, id: u32) -> anyhow::Result<u64> {
        self.load.get(&id, 0).with_context(|| format!("reading load of backend {id}"))
    }

    /// The request that opened `key`'s session, while it waits for its first answer.
    pub fn kept_request(&self, key: ClientKey) -> Option<Vec<u8>> {
        self.requests.get(&key, 0).ok().and_then(|kept| kept.request().map(<[u8]>::to_vec))
    }

    /// The last DATA `key`'s upload client sent, if kept (and not read while the kernel copied
    /// the next one over it).
    pub fn kept_data(&self, key: ClientKey) -> Option<Vec<u8>> {
        self.upload_data.get(&key, 0).ok().and_then(|kept| kept.data().map(<[u8]>::to_vec))
    }

    /// All sessions (a snapshot; entries may change or vanish meanwhile): a few batch lookups,
    /// or a walk key by key where the kernel has no batch operations.
    pub fn sessions(&self) -> Vec<(ClientKey, Session)> {
        use aya::maps::IterableMap as _;
        crate::batch::lookup_all(self.sessions.map()).unwrap_or_else(|_| self.sessions.iter().filter_map(Result::ok).collect())
    }
}

fn take(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<Map> {
    ebpf.take_map(name).with_context(|| format!("map {name} missing from the object"))
}

fn open_pinned(dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!("cannot open pinned map {} (is an agent running with this --pin-root, and are you root?)", path.display())
    })?;
    Ok(Map::from_map_data(data)?)
}

/// A per-CPU counter array, each slot summed over all CPUs.
fn sum_per_cpu(counters: &PerCpuArray<MapData, Counter>) -> anyhow::Result<Vec<Counter>> {
    counters
        .iter()
        .map(|per_cpu| {
            let per_cpu = per_cpu.context("reading a counter map")?;
            Ok(per_cpu.iter().fold(Counter::default(), |sum, c| sum.merged(*c)))
        })
        .collect()
}

/// The agent's own counters (the `control_*` slots from `first` on), as a previous agent left
/// them, summed over all CPUs.
pub fn agent_counters(counters: &PerCpuArray<MapData, Counter>, first: u32, n: usize) -> Vec<u64> {
    (first..)
        .take(n)
        .map(|i| counters.get(&i, 0).map_or(0, |per_cpu| per_cpu.iter().map(|c| c.packets).sum()))
        .collect()
}

/// Writes the agent's own counters from slot `first` on: each total on the first CPU's copy,
/// zero on the others (the program never touches these slots).
pub fn write_agent_counters(counters: &mut PerCpuArray<MapData, Counter>, first: u32, values: &[u64]) -> anyhow::Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(what, error)| anyhow::anyhow!("{what}: {error}"))?;
    for (i, value) in (first..).zip(values) {
        let mut per_cpu = vec![Counter::default(); cpus];
        per_cpu[0].packets = *value;
        let per_cpu = aya::maps::PerCpuValues::try_from(per_cpu).context("per-CPU counter values")?;
        counters.set(i, per_cpu, 0).context("writing the agent's control counters")?;
    }
    Ok(())
}

/// Every map of `switch` that its agent, `status` or a test touches.
pub const SWITCH_ALL: &[&str] = &[MAP_SW_COUNTERS, MAP_SW_CONFIG, MAP_SW_SEEN, MAP_SW_HEALTH, MAP_SW_CLIENTS, MAP_SW_REQUESTS];

pub struct SwitchMaps {
    pub counters: PerCpuArray<MapData, Counter>,
    pub config: Array<MapData, SwitchConfig>,
    pub seen: Array<MapData, LbSeen>,
    /// The agent's verdicts and flap damping per load balancer.
    pub health: Array<MapData, Health>,
    pub clients: HashMap<MapData, ClientKey, u64>,
    /// Each client's latest request (`SwitchRequest`).
    pub requests: HashMap<MapData, ClientKey, SwitchRequest>,
}

impl SwitchMaps {
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Self::from_maps(|name| take(ebpf, name))
    }

    pub fn open_pinned(dir: &Path) -> anyhow::Result<Self> {
        Self::from_maps(|name| open_pinned(dir, name))
    }

    fn from_maps(mut get: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Self> {
        Ok(Self {
            counters: PerCpuArray::try_from(get(MAP_SW_COUNTERS)?).context(MAP_SW_COUNTERS)?,
            config: Array::try_from(get(MAP_SW_CONFIG)?).context(MAP_SW_CONFIG)?,
            seen: Array::try_from(get(MAP_SW_SEEN)?).context(MAP_SW_SEEN)?,
            health: Array::try_from(get(MAP_SW_HEALTH)?).context(MAP_SW_HEALTH)?,
            clients: HashMap::try_from(get(MAP_SW_CLIENTS)?).context(MAP_SW_CLIENTS)?,
            requests: HashMap::try_from(get(MAP_SW_REQUESTS)?).context(MAP_SW_REQUESTS)?,
        })
    }

    /// Decision counters in `SwitchCounter` order.
    pub fn counters(&self) -> anyhow::Result<Vec<Counter>> {
        sum_per_cpu(&self.counters)
    }

    pub fn config(&self) -> anyhow::Result<SwitchConfig> {
        self.config.get(&0, 0).context("reading SW_CONFIG")
    }

    pub fn seen(&self, slot: u32) -> anyhow::Result<LbSeen> {
        self.seen.get(&slot, 0).with_context(|| format!("reading what the kernel saw of load balancer {slot}"))
    }

    pub fn health(&self, slot: u32) -> anyhow::Result<Health> {
        self.health.get(&slot, 0).with_context(|| format!("reading the health of load balancer {slot}"))
    }

    /// Clients whose last packet is younger than `window_ns` at `now_ns`.
    pub fn clients_in_flight(&self, now_ns: u64, window_ns: u64) -> u64 {
        let recent = self.clients.iter().filter_map(Result::ok).filter(|(_, seen)| now_ns.saturating_sub(*seen) < window_ns);
        u64::try_from(recent.count()).unwrap_or(u64::MAX)
    }

}

/// The balancer's interfaces that face the backends (`LB_BACKEND_IFACES`, not pinned: each
/// agent writes it before it attaches).
pub fn backend_ifaces(ebpf: &mut Ebpf) -> anyhow::Result<HashMap<MapData, u32, u32>> {
    HashMap::try_from(take(ebpf, MAP_LB_BACKEND_IFACES)?).context(MAP_LB_BACKEND_IFACES)
}

/// The switch's interfaces that face the load balancers (`SW_LB_IFACES`, not pinned: each
/// agent writes it before it attaches).
pub fn lb_ifaces(ebpf: &mut Ebpf) -> anyhow::Result<HashMap<MapData, u32, u32>> {
    HashMap::try_from(take(ebpf, MAP_SW_LB_IFACES)?).context(MAP_SW_LB_IFACES)
}

/// The balancer's own MAC per interface (`LB_OWN_MACS`, not pinned: each agent writes it).
pub fn own_macs(ebpf: &mut Ebpf) -> anyhow::Result<HashMap<MapData, u32, [u8; 6]>> {
    HashMap::try_from(take(ebpf, MAP_LB_OWN_MACS)?).context(MAP_LB_OWN_MACS)
}

/// The kernel's ring buffer of new and moved sessions (not pinned: only the running agent reads
/// it).
pub fn events(ebpf: &mut Ebpf) -> anyhow::Result<RingBuf<MapData>> {
    let map = ebpf.take_map(MAP_LB_EVENTS).with_context(|| format!("map {MAP_LB_EVENTS} missing from the object"))?;
    RingBuf::try_from(map).context(MAP_LB_EVENTS)
}
