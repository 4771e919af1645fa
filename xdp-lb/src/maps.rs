//! Typed access to the load balancer's maps, from a freshly loaded object or from their pins.
//! Names and types come from xdp-lb-common.

use std::path::Path;

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
};
use xdp_lb_common::{
    Backend, BackendSeen, ClientKey, Counter, LbConfig, Session,
    names::{MAP_LB_BACKENDS, MAP_LB_CONFIG, MAP_LB_COUNTERS, MAP_LB_LOAD, MAP_LB_SEEN, MAP_LB_SESSIONS},
};

/// Every map of `balance` that an agent, `status` or a test touches.
pub const ALL: &[&str] = &[MAP_LB_COUNTERS, MAP_LB_CONFIG, MAP_LB_BACKENDS, MAP_LB_SEEN, MAP_LB_LOAD, MAP_LB_SESSIONS];

pub struct LbMaps {
    pub counters: PerCpuArray<MapData, Counter>,
    pub config: Array<MapData, LbConfig>,
    pub backends: Array<MapData, Backend>,
    pub seen: Array<MapData, BackendSeen>,
    pub load: Array<MapData, u64>,
    pub sessions: HashMap<MapData, ClientKey, Session>,
}

impl LbMaps {
    /// Takes the maps out of a loaded object (the programs keep their own references).
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let mut take = |name: &str| ebpf.take_map(name).with_context(|| format!("map {name} missing from the object"));
        Self::from_maps(|name| take(name))
    }

    /// Opens the maps pinned in `dir` (a role directory such as `<pin-root>/balance`).
    pub fn open_pinned(dir: &Path) -> anyhow::Result<Self> {
        Self::from_maps(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("cannot open pinned map {} (is a balancer running with this --pin-root, and are you root?)", path.display()))?;
            Ok(Map::from_map_data(data)?)
        })
    }

    fn from_maps(mut get: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Self> {
        let mut typed = |name: &str| -> anyhow::Result<Map> { get(name) };
        Ok(Self {
            counters: PerCpuArray::try_from(typed(MAP_LB_COUNTERS)?).context(MAP_LB_COUNTERS)?,
            config: Array::try_from(typed(MAP_LB_CONFIG)?).context(MAP_LB_CONFIG)?,
            backends: Array::try_from(typed(MAP_LB_BACKENDS)?).context(MAP_LB_BACKENDS)?,
            seen: Array::try_from(typed(MAP_LB_SEEN)?).context(MAP_LB_SEEN)?,
            load: Array::try_from(typed(MAP_LB_LOAD)?).context(MAP_LB_LOAD)?,
            sessions: HashMap::try_from(typed(MAP_LB_SESSIONS)?).context(MAP_LB_SESSIONS)?,
        })
    }

    /// Decision counters, each summed over all CPUs, in `BalanceCounter` order.
    pub fn counters(&self) -> anyhow::Result<Vec<Counter>> {
        self.counters
            .iter()
            .map(|per_cpu| {
                let per_cpu = per_cpu.context("reading LB_COUNTERS")?;
                Ok(per_cpu.iter().fold(Counter::default(), |sum, c| sum.merged(*c)))
            })
            .collect()
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

    /// All sessions (a snapshot; entries may change or vanish meanwhile).
    pub fn sessions(&self) -> Vec<(ClientKey, Session)> {
        self.sessions.iter().filter_map(Result::ok).collect()
    }
}
