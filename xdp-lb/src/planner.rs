//! The failover planner: which sessions move to which backend, and which backends get a nudge,
//! when a backend dies or this balancer takes over. Pure (views, sessions, the time and the
//! balancer's role in, a plan out), so its rules are unit-tested without root; the agent
//! writes the moves into `LB_SESSIONS` and sends the nudges.

use xdp_lb_common::{ClientKey, Session, maps::BACKEND_LIVE, steering::FLAG_HAS_CONTEXT};

use crate::{
    control::{self, BackendView},
    pair::Role,
};

/// Why sessions are being looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Occasion {
    /// The agent just declared this backend dead (or is still moving its sessions away).
    BackendDied(u32),
    /// The switch made this balancer active: every session's backend is nudged through it.
    TakeOver,
}

/// What to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Sessions to rewrite, their new backend set.
    pub moves: Vec<(ClientKey, Session)>,
    /// Sessions whose backend (the new one where they moved) is sent a nudge.
    pub nudges: Vec<Session>,
    /// Of the nudged, those that moved before their first answer (no context): the new backend
    /// holds nothing a nudge could make it resend, so it gets the request the kernel kept for
    /// the session instead (`LB_REQUESTS`; a nudge when none was kept).
    pub resends: Vec<ClientKey>,
    /// Of the nudged, uploads that moved to their replica: a DATA the client sent the dead
    /// backend may have died with it, so the replica gets the client's last DATA as the
    /// kernel kept it (`LB_UPLOAD_DATA`) with the nudge, if the client may still wait for its
    /// ACK (`control::hand_over_data`; a plain nudge otherwise).
    pub handovers: Vec<ClientKey>,
    /// Sessions of the dead backend left for the next tick (beyond the plan's limit).
    pub left: usize,
    /// Sessions that found no live backend.
    pub stranded: usize,
    /// Sessions looked at whose client has been quiet too long to nudge for (see
    /// `control::NUDGE_WITHIN`).
    pub quiet: usize,
    /// Sessions per backend once the moves are written.
    pub loads: Vec<u64>,
}

fn usable(view: Option<&BackendView>) -> bool {
    view.is_some_and(|v| v.state == BACKEND_LIVE && v.mac_known)
}

/// The usable backend an upload's header names as its replica: the one backend that holds
/// every block the client was acknowledged, so the upload can only carry on there.
fn replica_of(session: &Session, views: &[BackendView]) -> Option<u32> {
    let replica = session.header.replica()?;
    let id = views.iter().position(|v| v.address == replica && usable(Some(v)))?;
    u32::try_from(id).ok()
}

/// The plan for `occasion`, made by a balancer in `role`: a backup moves sessions but never
/// nudges (its nudge would turn the backend's replies toward it, while the clients send to the
/// active one). At most `limit` sessions move per plan, those whose client was heard most
/// recently first; the kernel moves any other on its client's next packet in any case.
#[must_use]
pub fn plan(occasion: Occasion, views: &[BackendView], mut sessions: Vec<(ClientKey, Session)>, now_ns: u64, role: Role, limit: usize) -> Plan {
    let nudging = role != Role::Backup;
    let mut loads: Vec<u64> = views.iter().map(|v| v.sessions).collect();
    let mut plan = Plan::default();
    if let Occasion::BackendDied(dead) = occasion {
        sessions.retain(|(_, s)| s.backend == dead);
        sessions.sort_unstable_by_key(|(_, s)| std::cmp::Reverse(s.last_client_ns));
        plan.left = sessions.len().saturating_sub(limit);
        sessions.truncate(limit);
    }
    for (key, mut session) in sessions {
        let moved = !usable(views.get(session.backend as usize));
        let mut to_replica = false;
        if moved {
            let replica = replica_of(&session, views);
            to_replica = replica.is_some();
            let Some(target) = replica.or_else(|| control::least_loaded(views, &loads)) else {
                plan.stranded += 1;
                continue;
            };
            if let Some(load) = usize::try_from(session.backend).ok().and_then(|from| loads.get_mut(from)) {
                *load = load.saturating_sub(1);
            }
            session.backend = target;
            loads[target as usize] += 1;
            plan.moves.push((key, session));
        }
        if !control::worth_nudging(now_ns, &session) {
            plan.quiet += 1;
        } else if nudging {
            if moved && session.header.flags & FLAG_HAS_CONTEXT == 0 {
                plan.resends.push(key);
            }
            if to_replica {
                plan.handovers.push(key);
            }
            plan.nudges.push(session);
        }
    }
    if let Occasion::BackendDied(dead) = occasion
        && let Some(load) = loads.get_mut(dead as usize)
    {
        *load = plan.left as u64;
    }
    plan.loads = loads;
    plan
}

#[cfg(test)]
mod tests {
    use xdp_lb_common::maps::BACKEND_DEAD;

    use super::*;

    const S: u64 = 1_000_000_000;

    fn live(sessions: u64) -> BackendView {
        BackendView { state: BACKEND_LIVE, mac_known: true, sessions, ..BackendView::default() }
    }

    fn dead(sessions: u64) -> BackendView {
        BackendView { state: BACKEND_DEAD, mac_known: true, sessions, ..BackendView::default() }
    }

    /// A session on `backend` whose client was last heard at `heard_s` seconds.
    fn session(port: u16, backend: u32, heard_s: u64) -> (ClientKey, Session) {
        let mut s: Session = bytemuck::Zeroable::zeroed();
        s.backend = backend;
        s.last_client_ns = heard_s * S;
        (ClientKey::new([10, 0, 0, 1], port.to_be_bytes()), s)
    }

    fn ports(moves: &[(ClientKey, Session)]) -> Vec<u16> {
        moves.iter().map(|(k, _)| u16::from_be_bytes(k.port)).collect()
    }

    #[test]
    fn a_dead_backends_sessions_move_to_the_least_loaded_and_recent_ones_are_nudged() {
        let views = [dead(3), live(5), live(0)];
        let sessions = vec![session(1, 0, 100), session(2, 0, 99), session(3, 0, 90), session(4, 1, 100)];
        let plan = plan(Occasion::BackendDied(0), &views, sessions, 100 * S, Role::Active, 100);
        assert_eq!(ports(&plan.moves), [1, 2, 3], "only the dead backend's sessions, most recent first");
        assert!(plan.moves.iter().all(|(_, s)| s.backend == 2), "to the least loaded live backend");
        assert_eq!(plan.nudges.len(), 2, "not the client quiet for 10 s (it waits on its own timer, or left)");
        assert!(plan.nudges.iter().all(|s| s.backend == 2), "the new backend is nudged");
        assert_eq!(plan.loads, [0, 5, 3]);
        assert_eq!((plan.left, plan.stranded), (0, 0));
    }

    #[test]
    fn an_upload_moves_to_its_replica_not_to_the_least_loaded() {
        let address = |i: u8| ([10, 77, 0, 11 + i], 6969u16.to_be_bytes());
        let views: Vec<BackendView> = [dead(1), live(9), live(0)].into_iter().enumerate().map(|(i, v)| BackendView { address: address(u8::try_from(i).unwrap()), ..v }).collect();
        let (key, mut upload) = session(1, 0, 100);
        upload.header.set_upload_replica(Some(address(1)));
        let (other, download) = session(2, 0, 100);
        let first = plan(Occasion::BackendDied(0), &views, vec![(key, upload), (other, download)], 100 * S, Role::Active, 100);
        let to: Vec<(u16, u32)> = first.moves.iter().map(|(k, s)| (u16::from_be_bytes(k.port), s.backend)).collect();
        assert_eq!(to, [(1, 1), (2, 2)], "the upload to its replica, though busier; the download to the least loaded");
        assert_eq!(first.handovers, [key], "the replica gets the upload's last DATA with its nudge; the download nothing of the kind");
        let (key, mut orphan) = session(3, 0, 100);
        orphan.header.set_upload_replica(Some(address(0)));
        let second = plan(Occasion::BackendDied(0), &views, vec![(key, orphan)], 100 * S, Role::Active, 100);
        assert_eq!(second.moves[0].1.backend, 2, "a replica that is dead too: the least loaded (which refuses it: nothing to resume)");
        assert!(second.handovers.is_empty(), "no DATA for a backend that holds none of the upload");
        let mut quiet = upload;
        quiet.last_client_ns = 90 * S;
        let third = plan(Occasion::BackendDied(0), &views, vec![(key, quiet)], 100 * S, Role::Active, 100);
        assert!(third.handovers.is_empty() && third.moves[0].1.backend == 1, "nor for a client quiet for seconds (it resends on its own timer, or left)");
        let backup = plan(Occasion::BackendDied(0), &views, vec![(key, upload)], 100 * S, Role::Backup, 100);
        assert!(backup.handovers.is_empty() && backup.moves.len() == 1, "a backup moves the upload but sends nothing");
    }

    #[test]
    fn a_backup_moves_but_never_nudges() {
        let views = [dead(1), live(0)];
        let plan = plan(Occasion::BackendDied(0), &views, vec![session(1, 0, 100)], 100 * S, Role::Backup, 100);
        assert_eq!(plan.moves.len(), 1);
        assert!(plan.nudges.is_empty());
    }

    #[test]
    fn at_most_a_batch_moves_per_tick_the_recent_clients_first() {
        let views = [dead(5), live(0), live(0)];
        let sessions = (0..5).map(|i| session(i, 0, 100 - u64::from(i))).collect();
        let plan = plan(Occasion::BackendDied(0), &views, sessions, 100 * S, Role::Active, 2);
        assert_eq!(ports(&plan.moves), [0, 1]);
        assert_eq!(plan.left, 3);
        assert_eq!(plan.loads, [3, 1, 1], "spread over the live backends; the rest still counted on the dead one");
    }

    #[test]
    fn with_no_live_backend_sessions_are_stranded_not_lost() {
        let views = [dead(2), dead(0)];
        let plan = plan(Occasion::BackendDied(0), &views, vec![session(1, 0, 100), session(2, 0, 100)], 100 * S, Role::Active, 100);
        assert!(plan.moves.is_empty() && plan.nudges.is_empty());
        assert_eq!(plan.stranded, 2);
    }

    #[test]
    fn a_takeover_nudges_every_recent_session_and_moves_those_on_dead_backends() {
        let views = [live(2), dead(1), live(0)];
        let sessions = vec![session(1, 0, 100), session(2, 1, 100), session(3, 0, 50), session(4, 7, 100)];
        let plan = plan(Occasion::TakeOver, &views, sessions, 100 * S, Role::Active, usize::MAX);
        assert_eq!(ports(&plan.moves), [2, 4], "off the dead backend, and off a slot that is not a backend");
        assert!(plan.moves.iter().all(|(_, s)| s.backend == 2));
        let nudged: Vec<u32> = plan.nudges.iter().map(|s| s.backend).collect();
        assert_eq!(nudged, [0, 2, 2], "every session heard within 2 s, at its (new) backend; not the stale one");
    }

    #[test]
    fn a_session_moved_before_its_first_answer_gets_its_request_resent() {
        let views = [dead(3), live(0)];
        let (early, first) = session(1, 0, 100);
        let (mid, mut second) = session(2, 0, 100);
        second.header.flags = FLAG_HAS_CONTEXT;
        let died = plan(Occasion::BackendDied(0), &views, vec![(early, first), (mid, second), session(3, 0, 50)], 100 * S, Role::Active, 100);
        assert_eq!(died.resends, [early], "only the moved session without context, not the one the backend answered, nor the quiet one");
        assert_eq!(died.nudges.len(), 2, "a resend falls back to a nudge when no request was kept");
        let backup = plan(Occasion::BackendDied(0), &views, vec![session(1, 0, 100)], 100 * S, Role::Backup, 100);
        assert!(backup.resends.is_empty(), "a backup sends nothing: the answer would come through it");
        let live_views = [live(1), live(0)];
        let takeover = plan(Occasion::TakeOver, &live_views, vec![session(1, 0, 100)], 100 * S, Role::Active, usize::MAX);
        assert!(takeover.resends.is_empty(), "a live backend holds the request it was steered: it gets the nudge");
    }
}
