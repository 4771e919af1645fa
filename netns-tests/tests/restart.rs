//! The balance agent's XDP link is pinned: a killed agent leaves the program steering from the
//! pinned maps, a restarted one re-adopts the link without dropping the transfer, and a clean
//! shutdown leaves nothing attached.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use netns_tests::{
    Process, require_root,
    clients::Client,
    files::{make_file, sha256},
    topology::{LbTopology, VIP},
    wait_for,
    watch::wait_for_size,
};
use xdp_lb_common::status::BackendState;

const TFTP_PORT: u16 = 69;
const MIB: usize = 1024 * 1024;

/// The link pin of the LB's `eth0` under the topology's pin root.
fn link_pin(topo: &LbTopology) -> PathBuf {
    topo.pins.path().join("balance").join("link-eth0")
}

/// The id of the XDP program attached to the LB's `eth0`, from `ip -j link show`; `None` when
/// no program is attached.
fn attached_program(topo: &LbTopology) -> Option<u64> {
    let out = topo.lb.ip(&["-j", "link", "show", "dev", "eth0"]).expect("ip link show");
    let links: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
    let xdp = links[0].get("xdp")?;
    xdp["prog"]["id"].as_u64().or_else(|| xdp["attached"][0]["prog"]["id"].as_u64()).or(Some(0))
}

fn wait_live(topo: &LbTopology, agent: &Process, n: usize) {
    wait_for(&format!("{n} live backends"), 20, || {
        (topo.status().ok()?.live_backends() >= n).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
}

/// The backend of the only session in the LB's table.
fn session_backend(topo: &LbTopology) -> u64 {
    let sessions = topo.status().expect("status").sessions;
    assert_eq!(sessions.len(), 1, "one session in flight: {sessions:?}");
    u64::from(sessions[0].backend)
}

fn size_of(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

#[test]
fn killed_agent_keeps_steering_and_restarted_agent_readopts_the_link() {
    require_root();
    let topo = LbTopology::new(1, 2).expect("topology");
    let _backends: Vec<Process> = (0..2).map(|i| topo.start_backend(i).expect("backend")).collect();
    let mut agent = topo.start_lb(&[]).expect("xdp-lb balance");
    wait_live(&topo, &agent, 2);
    assert!(link_pin(&topo).exists(), "the agent pins its link at {}", link_pin(&topo).display());
    let first_program = attached_program(&topo).expect("balance attached to eth0");

    // Large enough that the transfer outlives a kill and a restart (~80 MB/s here).
    let size = 256 * MIB;
    let source = topo.root.join("large.bin");
    make_file(&source, size, 11).expect("test file");
    let local = std::env::temp_dir().join(topo.prefix.name("large"));
    let command = Client::Atftp { blksize: 1468, windowsize: 16 }.download(&topo.clients[0], VIP, TFTP_PORT, "large.bin", &local);
    let mut download = Process::spawn(topo.prefix.name("dl-large"), command).expect("start atftp");
    assert!(wait_for_size(&local, (size / 10) as u64, Duration::from_secs(60)), "transfer reached 10%:\n{}", download.log());
    let backend = session_backend(&topo);

    // SIGKILL: no cleanup runs; the pinned link keeps the program attached.
    agent.kill_hard().expect("agent killed");
    drop(agent);
    let at_kill = size_of(&local);
    std::thread::sleep(Duration::from_millis(300));
    assert!(link_pin(&topo).exists(), "the link stays pinned after SIGKILL");
    assert_eq!(attached_program(&topo), Some(first_program), "the same program stays attached after SIGKILL");
    let grown = size_of(&local) - at_kill;
    assert!(grown > MIB as u64, "the program keeps steering without its agent: only {grown} bytes in 300 ms");
    assert!(download.is_running(), "the transfer is still running (make the file larger)");
    eprintln!("agent killed at {} MiB; {} MiB more arrived in 300 ms without an agent", at_kill >> 20, grown >> 20);

    // A new agent re-adopts the link: the program in it is replaced, the session stays.
    let agent = topo.start_lb(&[]).expect("xdp-lb balance, restarted");
    wait_for("the link re-adopted", 20, || agent.log().contains("re-adopted the pinned link").then_some(()))
        .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
    let second_program = attached_program(&topo).expect("balance attached after the restart");
    assert_ne!(second_program, first_program, "the restarted agent's program replaced the old one in the link");
    assert!(download.is_running(), "the transfer is still running after the restart (make the file larger)");
    assert_eq!(session_backend(&topo), backend, "the session survived the restart on the same backend");
    eprintln!("program {first_program} replaced by {second_program} in the pinned link at {} MiB", size_of(&local) >> 20);
    wait_live(&topo, &agent, 2);

    let status = download.wait(Duration::from_secs(120)).expect("download finished");
    assert!(status.success(), "atftp failed ({status}):\n{}\nagent:\n{}", download.log(), agent.log());
    assert_eq!(sha256(&local).expect("sha of download"), sha256(&source).expect("sha of source"), "downloaded file differs");
    let _ = std::fs::remove_file(&local);
    let backends = topo.status().expect("status").backends;
    let dead = backends.iter().filter(|b| b.state != BackendState::Live).count();
    assert_eq!(dead, 0, "no backend was declared dead across the restart: {backends:?}");
}

#[test]
fn clean_shutdown_unpins_and_detaches() {
    require_root();
    let topo = LbTopology::new(1, 1).expect("topology");
    let _backend = topo.start_backend(0).expect("backend");
    let mut agent = topo.start_lb(&[]).expect("xdp-lb balance");
    wait_live(&topo, &agent, 1);
    assert!(link_pin(&topo).exists(), "pinned while running");
    assert!(attached_program(&topo).is_some(), "attached while running");

    let status = agent.stop().expect("agent stopped");
    assert!(status.success(), "clean exit on SIGTERM ({status}):\n{}", agent.log());
    assert!(!link_pin(&topo).exists(), "SIGTERM removes the link pin:\n{}", agent.log());
    assert_eq!(attached_program(&topo), None, "no XDP program left on eth0 after SIGTERM");
    // The maps stay pinned for `xdp-lb status` and the next agent.
    assert!(topo.status().is_ok(), "status still reads the pinned maps");
}

#[test]
fn restart_with_another_xdp_mode_is_refused_with_a_reason() {
    require_root();
    let topo = LbTopology::new(1, 1).expect("topology");
    let mut agent = topo.start_lb(&[]).expect("xdp-lb balance");
    wait_for("the link pinned", 20, || link_pin(&topo).exists().then_some(()))
        .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
    agent.kill_hard().expect("agent killed");
    drop(agent);

    // start_lb passes --xdp-mode skb; a later --xdp-mode overrides it.
    let mut native = topo.start_lb(&["--xdp-mode", "native"]).expect("xdp-lb balance, native");
    let status = native.wait(Duration::from_secs(20)).expect("a refused agent exits");
    assert!(!status.success(), "a mode change is refused:\n{}", native.log());
    let log = native.log();
    assert!(log.contains("attached in skb mode") && log.contains("--xdp-mode native"), "the error names both modes:\n{log}");
    assert!(link_pin(&topo).exists(), "the refused agent leaves the running link alone");
    assert!(attached_program(&topo).is_some(), "the old program still steers");
    drop(native);

    // The same mode re-adopts it; SIGTERM then cleans up.
    let mut agent = topo.start_lb(&[]).expect("xdp-lb balance, skb again");
    wait_for("the link re-adopted", 20, || agent.log().contains("re-adopted the pinned link").then_some(()))
        .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
    agent.stop();
    assert!(!link_pin(&topo).exists(), "SIGTERM removes the link pin:\n{}", agent.log());
    assert_eq!(attached_program(&topo), None, "nothing attached after SIGTERM");
}
