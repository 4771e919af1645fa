//! Uploads through the whole system (switch, balancer pair, three steered backends) with stock
//! clients. With replication (`--peer`) every backend's root must end with the client's bytes
//! (SHA-256) and no temporary, also when the serving backend, its replica or the active
//! balancer dies on the way; the client must finish without a restart. Each test prints its
//! figures: time, goodput, the stall after each failure (the longest time no temporary grew),
//! and the replies the balancers delivered to the client (resent ACKs show there).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use netns_tests::{
    Process,
    clients::{Client, Ending, expect_download},
    cluster::Cluster,
    files::{make_file, sha256},
    pair_topology::Uploads,
    upload::{RootState, all_roots, download_from_each_backend, problems, replica, serving, surviving_roots, wait_for_progress, watch_progress},
    wait_for,
    watch::stall_until,
};

const MIB: usize = 1024 * 1024;
const TFTP_HPA: Client = Client::TftpHpa;
const CURL: Client = Client::Curl { blksize: 1428 };
const ATFTP: Client = Client::Atftp { blksize: 1428, windowsize: 16 };
const BUSYBOX: Client = Client::Busybox { blksize: 1428 };
/// What checks a copy by downloading it: windowed, so that it takes a fraction of a second.
const CHECKER: Client = Client::Atftp { blksize: 1428, windowsize: 16 };
/// How long the backends may take, after the client's last ACK, to push the file to every
/// other backend and remove their temporaries.
const SETTLE: Duration = Duration::from_secs(10);

/// A failure injected once the upload reached a share of the file.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// SIGKILL of the backend the active balancer's session names.
    ServingBackend,
    /// SIGKILL of the other backend writing a temporary: the replica.
    Replica,
    /// The active balancer killed (agent and link).
    ActiveBalancer,
}

/// A test file for client `client` to upload, in the host's temporary directory (the clients
/// share the host's filesystem), and its SHA-256.
fn source(cluster: &Cluster, name: &str, size: usize, seed: u64) -> (PathBuf, String) {
    let path = cluster.local(&format!("src-{name}"));
    make_file(&path, size, seed).expect("source file");
    let digest = sha256(&path).expect("source digest");
    (path, digest)
}

/// What one upload did, for the figures and the end-state checks.
struct Upload {
    source: PathBuf,
    sha256: String,
    /// The backends killed on the way.
    killed: Vec<usize>,
    /// After each failure, the longest time no temporary grew (until the next one, or the end).
    stalls: Vec<Duration>,
}

/// Client 0 uploads a `size`-byte file as `name` with `how`, the `failures` injected at their
/// shares of it; asserts that the client exited 0 (one client process: no restart) and prints
/// the figures. The end state is the caller's to check.
fn upload_with_failures(cluster: &mut Cluster, how: Client, name: &str, size: usize, failures: &[(f64, Failure)]) -> Upload {
    let (source, digest) = source(cluster, name, size, 17);
    let replies_before = cluster.delivered();
    let progress = watch_progress(cluster.topo.backend_roots());
    let started = Instant::now();
    let mut upload = cluster.upload(0, how, &source, name);
    let (mut at, mut killed) = (Vec::new(), Vec::new());
    for &(share, failure) in failures {
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss, reason = "a byte count")]
        let bytes = (size as f64 * share) as u64;
        assert!(
            wait_for_progress(&progress, bytes, Duration::from_secs(180)),
            "{} upload of {name}: no temporary reached {bytes} bytes ({} seen) before the {failure:?} failure\nclient:\n{}\n{}",
            how.name(),
            progress.bytes(),
            upload.log(),
            cluster.logs()
        );
        let (lb, backend) = serving(cluster, 0).unwrap_or_else(|| panic!("no session of the upload at the active balancer\n{}", cluster.logs()));
        match failure {
            Failure::ServingBackend => {
                println!("{:>6} ms: backend {backend} (serving) killed at {bytes} bytes", started.elapsed().as_millis());
                cluster.kill_backend(backend);
                killed.push(backend);
            }
            Failure::Replica => {
                let replica = replica(cluster, backend).unwrap_or_else(|| {
                    panic!("backend {backend} serves the upload and no other backend writes a temporary: no replica\n{}", cluster.logs())
                });
                println!("{:>6} ms: backend {replica} (the replica of backend {backend}) killed at {bytes} bytes", started.elapsed().as_millis());
                cluster.kill_backend(replica);
                killed.push(replica);
            }
            Failure::ActiveBalancer => {
                println!("{:>6} ms: balancer {lb} (active; backend {backend} serving) killed at {bytes} bytes", started.elapsed().as_millis());
                cluster.kill_lb(lb);
            }
        }
        at.push(Instant::now());
    }
    let status = upload.wait(Duration::from_secs(300));
    let elapsed = started.elapsed();
    let samples = progress.stop();
    let Some(status) = status else { panic!("{} upload of {name}: not done after 300 s\nclient:\n{}\n{}", how.name(), upload.log(), cluster.logs()) };
    let ending = how.ending(status, &upload.log());
    assert_eq!(ending, Ending::Done, "{} upload of {name}: the client did not succeed — no restart is allowed\nclient:\n{}\n{}", how.name(), upload.log(), cluster.logs());
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let goodput = size as f64 / elapsed.as_secs_f64() / 1e6;
    println!("{} upload of {} MiB: {} ms, {goodput:.1} MB/s, client exited 0 (one run, no restart)", how.name(), size / MIB, elapsed.as_millis());
    let mut stalls = Vec::new();
    for (i, &since) in at.iter().enumerate() {
        let until = at.get(i + 1).copied().unwrap_or_else(Instant::now);
        let stall = stall_until(&samples, since, until).0;
        println!("failure {}: no temporary grew for {} ms", i + 1, stall.as_millis());
        stalls.push(stall);
    }
    println!("replies the balancers delivered to the client (ACKs, OACK, resends included): {}", cluster.delivered() - replies_before);
    if !failures.is_empty() {
        cluster.print_timeline();
    }
    Upload { source, sha256: digest, killed, stalls }
}

/// Waits up to [`SETTLE`] for the running backends to hold the upload and no temporary, and
/// asserts that they do, and that a killed backend's root has nothing but the client's bytes
/// under the name (its temporaries stay: it was killed).
fn expect_landed(cluster: &Cluster, name: &str, upload: &Upload) {
    let _ = wait_for("every running backend to hold the upload", SETTLE.as_secs(), || {
        problems(&surviving_roots(cluster, name), &upload.sha256, true).is_empty().then_some(())
    });
    let mut wrong = problems(&surviving_roots(cluster, name), &upload.sha256, true);
    for &backend in &upload.killed {
        let state = RootState { temporaries: Vec::new(), ..RootState::read(&cluster.topo.backend_root(backend), name) };
        wrong.extend(problems(&[state], &upload.sha256, false));
    }
    assert!(wrong.is_empty(), "{name}: the backends' roots are not as the upload should leave them:\n  {}\n{}", wrong.join("\n  "), cluster.logs());
    println!("{name}: byte-identical (SHA-256 {}) on backends {:?}, no temporary", &upload.sha256[..16], running(cluster));
}

fn running(cluster: &Cluster) -> Vec<usize> {
    (0..cluster.backends.len()).filter(|&i| cluster.backends[i].is_some()).collect()
}

/// An upload without failures with `how`: the file lands on all three backends, and each
/// backend serves its copy (downloaded through the VIP, then that backend killed, three times).
fn upload_lands_on_every_backend(how: Client, size: usize) {
    let mut cluster = Cluster::start_uploads(1, 3, Uploads::replicated());
    let name = "clean.bin";
    let upload = upload_with_failures(&mut cluster, how, name, size, &[]);
    expect_landed(&cluster, name, &upload);
    let served = download_from_each_backend(&mut cluster, 0, CHECKER, name, &upload.source).expect("downloads");
    println!("{name}: downloaded through the VIP from backends {served:?} in turn (each killed after serving)");
    let _ = std::fs::remove_file(&upload.source);
}

#[test]
fn tftp_hpa_upload_lands_on_every_backend() {
    upload_lands_on_every_backend(TFTP_HPA, 2 * MIB);
}

#[test]
fn curl_upload_lands_on_every_backend() {
    upload_lands_on_every_backend(CURL, 4 * MIB);
}

#[test]
fn atftp_windowed_upload_lands_on_every_backend() {
    upload_lands_on_every_backend(ATFTP, 8 * MIB);
}

#[test]
fn busybox_upload_lands_on_every_backend() {
    upload_lands_on_every_backend(BUSYBOX, 4 * MIB);
}

/// Without replication, on the root the backends share (as before issue 17): every stock
/// client's upload goes through the balancers into place, and downloads back identical.
#[test]
fn every_stock_client_uploads_through_the_balancers_to_the_shared_root() {
    let mut cluster = Cluster::start_uploads(1, 3, Uploads::default());
    for (i, how) in [TFTP_HPA, CURL, ATFTP, BUSYBOX].into_iter().enumerate() {
        let name = format!("shared-{i}.bin");
        let upload = upload_with_failures(&mut cluster, how, &name, 2 * MIB, &[]);
        let wrong = problems(&all_roots(&cluster, &name), &upload.sha256, true);
        assert!(wrong.is_empty(), "{}: {}\n{}", how.name(), wrong.join("\n"), cluster.logs());
        let local = cluster.local(&format!("back-{name}"));
        let download = cluster.download(0, CHECKER, &name, &local);
        expect_download(download, &local, &upload.source, Duration::from_secs(30), &format!("{name} downloaded back"), || cluster.logs());
        let _ = std::fs::remove_file(&upload.source);
    }
}

/// A 64 MiB upload with `failures`, then every surviving backend holds it; the stall after
/// each failure.
fn upload_survives(how: Client, name: &str, failures: &[(f64, Failure)]) -> Vec<Duration> {
    let mut cluster = Cluster::start_uploads(1, 3, Uploads::replicated());
    let upload = upload_with_failures(&mut cluster, how, name, 64 * MIB, failures);
    expect_landed(&cluster, name, &upload);
    let _ = std::fs::remove_file(&upload.source);
    upload.stalls
}

/// tftp-hpa is lock-step and, after DATA n, waits for ACK n and ignores ACK n-1. Its DATA n
/// reached the backend that died (the balancer steers there until its verdict), and the
/// replica most often lacks it, so the replica's nudge answer alone (ACK n-1) would leave the
/// client to its own 5 s timer: the balancer hands the replica the DATA it kept
/// (`LB_UPLOAD_DATA`). The bound separates that timer from a failover (about 0.1 s of
/// detection here).
#[test]
fn serving_backend_killed_at_half_of_a_lock_step_upload() {
    let stalls = upload_survives(TFTP_HPA, "lockstep.bin", &[(0.5, Failure::ServingBackend)]);
    assert!(stalls[0] < Duration::from_secs(2), "no temporary grew for {} ms after the kill: the client waited for its own timer", stalls[0].as_millis());
}

/// At any moment: the serving backend killed as soon as the upload began (the replica holds a
/// few windows), windowed.
#[test]
fn serving_backend_killed_at_the_start_of_an_upload() {
    upload_survives(ATFTP, "early.bin", &[(0.01, Failure::ServingBackend)]);
}

/// At any moment: the serving backend killed in the upload's last 3% (~0.3 s before its end at
/// the lock-step rate with replication), the hand-over of the client's last DATA included.
#[test]
fn serving_backend_killed_near_the_end_of_a_lock_step_upload() {
    let stalls = upload_survives(TFTP_HPA, "late.bin", &[(0.97, Failure::ServingBackend)]);
    assert!(stalls[0] < Duration::from_secs(2), "no temporary grew for {} ms after the kill: the client waited for its own timer", stalls[0].as_millis());
}

#[test]
fn serving_backend_killed_at_half_of_a_windowed_upload() {
    upload_survives(ATFTP, "windowed.bin", &[(0.5, Failure::ServingBackend)]);
}

#[test]
fn active_balancer_killed_at_half_of_an_upload() {
    upload_survives(ATFTP, "lb.bin", &[(0.5, Failure::ActiveBalancer)]);
}

#[test]
fn active_balancer_then_serving_backend_killed_in_one_upload() {
    upload_survives(ATFTP, "both.bin", &[(0.3, Failure::ActiveBalancer), (0.6, Failure::ServingBackend)]);
}

#[test]
fn replica_killed_at_half_of_an_upload() {
    upload_survives(ATFTP, "replica.bin", &[(0.5, Failure::Replica)]);
}

/// Backend 2's root is a 16 MiB tmpfs and the upload (curl: it tells the ERROR's code by its
/// exit status) 32 MiB. Either outcome is defined: the upload completes (then at least two
/// backends hold it) or the client gets ERROR 3 (disk full); in every root nothing but the
/// client's bytes is under the name, and no temporary.
#[test]
fn a_disk_full_backend_fails_the_upload_cleanly_or_is_left_out() {
    let uploads = Uploads { small_disk: Some((2, 16)), backend_args: vec!["--min-free-mib".into(), "1".into()], ..Uploads::replicated() };
    let cluster = Cluster::start_uploads(1, 3, uploads);
    let name = "full.bin";
    let (source, digest) = source(&cluster, name, 32 * MIB, 23);
    let started = Instant::now();
    let mut upload = cluster.upload(0, CURL, &source, name);
    let exit = upload.wait(Duration::from_secs(120)).unwrap_or_else(|| panic!("upload not done after 120 s\n{}\n{}", upload.log(), cluster.logs()));
    let ending = CURL.ending(exit, &upload.log());
    println!("curl upload of 32 MiB with backend 2 on a 16 MiB disk: {} ms, {ending:?}", started.elapsed().as_millis());
    let done = ending == Ending::Done;
    let _ = wait_for("the backends to settle", SETTLE.as_secs(), || {
        let states = all_roots(&cluster, name);
        (problems(&states, &digest, false).is_empty() && (!done || states.iter().filter(|s| s.sha256.is_some()).count() >= 2)).then_some(())
    });
    let states = all_roots(&cluster, name);
    let wrong = problems(&states, &digest, false);
    assert!(wrong.is_empty(), "partial or stray files left:\n  {}\n{}", wrong.join("\n  "), cluster.logs());
    let holders: Vec<String> = states.iter().filter(|s| s.sha256.is_some()).map(|s| s.root.display().to_string()).collect();
    match ending {
        Ending::Done => {
            assert!(holders.len() >= 2, "the upload completed but only {holders:?} hold it: one copy is not replicated\n{}", cluster.logs());
            println!("outcome: completed, held by {holders:?}");
        }
        Ending::ServerError { code: Some(3), message } => {
            assert!(holders.is_empty(), "the upload failed ({message}) but {holders:?} hold the file");
            println!("outcome: ERROR 3 to the client ({message}), nothing left");
        }
        other => panic!("the client neither finished nor got ERROR 3 (disk full): {other:?}\nclient:\n{}\n{}", upload.log(), cluster.logs()),
    }
    let _ = std::fs::remove_file(&source);
}

/// Two clients upload different files under one name at once (no --allow-overwrite): exactly
/// one succeeds, the other gets a TFTP error, and every backend ends with the winner's bytes.
#[test]
fn two_clients_uploading_one_name_at_once_one_wins_everywhere() {
    let cluster = Cluster::start_uploads(2, 3, Uploads::replicated());
    let name = "same.bin";
    let sources = [source(&cluster, "same-0", 8 * MIB, 31), source(&cluster, "same-1", 8 * MIB, 32)];
    let started = Instant::now();
    let mut uploads: Vec<Process> = sources.iter().enumerate().map(|(i, (path, _))| cluster.upload(i, ATFTP, path, name)).collect();
    let statuses: Vec<_> = uploads
        .iter_mut()
        .map(|u| u.wait(Duration::from_secs(120)).unwrap_or_else(|| panic!("an upload not done after 120 s:\n{}", u.log())))
        .collect();
    println!("two 8 MiB uploads of {name}: {} ms, exits {statuses:?}", started.elapsed().as_millis());
    let logs = || uploads.iter().map(Process::log).collect::<Vec<_>>().join("\n---\n");
    let endings: Vec<Ending> = (0..2).map(|i| ATFTP.ending(statuses[i], &uploads[i].log())).collect();
    let winners: Vec<usize> = (0..2).filter(|&i| endings[i] == Ending::Done).collect();
    assert_eq!(winners.len(), 1, "exactly one upload must succeed, not {winners:?} ({endings:?})\nclients:\n{}\n{}", logs(), cluster.logs());
    let (winner, loser) = (winners[0], 1 - winners[0]);
    assert!(matches!(endings[loser], Ending::ServerError { .. }), "client {loser} failed without a TFTP error: {:?}\n{}", endings[loser], uploads[loser].log());
    let want = &sources[winner].1;
    let _ = wait_for("every backend to hold the winner's bytes", SETTLE.as_secs(), || problems(&all_roots(&cluster, name), want, true).is_empty().then_some(()));
    let wrong = problems(&all_roots(&cluster, name), want, true);
    let theirs: Vec<String> = sources.iter().enumerate().map(|(i, (_, sha))| format!("client {i}'s SHA-256 {sha}")).collect();
    assert!(
        wrong.is_empty(),
        "client {winner} won, client {loser} got {:?}, but:\n  {}\n({})\n{}",
        endings[loser],
        wrong.join("\n  "),
        theirs.join(", "),
        cluster.logs()
    );
    println!("client {winner} won; client {loser}: {:?}", endings[loser]);
    for (path, _) in &sources {
        let _ = std::fs::remove_file(path);
    }
}
