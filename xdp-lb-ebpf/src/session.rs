//! Sessions in `LB_SESSIONS`: opened by a request, relearned from a backend's reply, kept on
//! the client's path, given the transfer context the backend reports, moved to another backend,
//! finished. Each change the peer balancer must hear about is announced here. Which of these
//! happens to a packet is `steer`'s decision.

use xdp_lb_common::{ClientKey, FrameHeaders, LbConfig, Session, SteeringHeader, steering::FLAG_HAS_CONTEXT};

use aya_ebpf::programs::XdpContext;

use crate::{
    backends, kept,
    maps::{LB_DATA_SCRATCH, LB_REQUEST_SCRATCH, LB_REQUESTS, LB_SCRATCH, LB_SESSIONS, LB_UPLOAD_DATA, announce, now_ns},
};

/// Creates the client's session on the least loaded usable backend, or restarts it when the
/// client sends a new request from the same port (it then keeps its backend; `steer` moves it
/// if that one is gone). `None` when no backend is usable or the table refuses the entry.
#[inline(always)]
pub fn open<'a>(ctx: &XdpContext, config: &LbConfig, key: &ClientKey, frame: &FrameHeaders) -> Option<&'a mut Session> {
    let session = match LB_SESSIONS.get_ptr_mut(key) {
        Some(session) => {
            // A new transfer from the same port: an earlier upload's DATA is none of its own.
            let _ = LB_UPLOAD_DATA.remove(key);
            session
        }
        None => {
            let backend = backends::least_loaded()?;
            // SAFETY: per-CPU slot, ours for the duration of the program.
            let fresh = unsafe { &mut *LB_SCRATCH.get_ptr_mut(0)? };
            fresh.backend = backend;
            fresh.last_ack = [0; 2];
            LB_SESSIONS.insert(key, &*fresh, 0).ok()?;
            backends::add_session(backend);
            announce(key);
            LB_SESSIONS.get_ptr_mut(key)?
        }
    };
    // SAFETY: map value pointer from a successful lookup.
    let session = unsafe { &mut *session };
    session.header.reset_for_client(key.ip, key.port, config.vip, key.tid());
    follow_client(ctx, session, frame);
    Some(session)
}

/// Keeps the request that just opened `key`'s session (the `len` bytes of TFTP payload at
/// `offset` in the packet), until the session learns its context: the agent resends it to
/// another backend should this one die before answering. Whether it was kept (a longer request
/// is not).
#[inline(always)]
pub fn keep_request(ctx: &XdpContext, key: &ClientKey, offset: usize, len: usize) -> bool {
    let Some(kept) = LB_REQUEST_SCRATCH.get_ptr_mut(0) else { return false };
    // SAFETY: per-CPU slot, ours for the duration of the program.
    let kept = unsafe { &mut *kept };
    kept::copy_request(ctx, kept, offset, len) && LB_REQUESTS.insert(key, &*kept, 0).is_ok()
}

/// Keeps the DATA an upload's client just sent (the `len` bytes of TFTP payload at `offset`),
/// over the one before, until the session ends: the agent hands it to the replica should the
/// backend die with it. Copied in place, between the two stamps `KeptData::data` checks.
/// Whether it was kept (a longer DATA is not).
#[inline(always)]
pub fn keep_data(ctx: &XdpContext, key: &ClientKey, offset: usize, len: usize) -> bool {
    if len == 0 || len > xdp_lb_common::maps::DATA_KEPT_MAX {
        return false;
    }
    let kept = match LB_UPLOAD_DATA.get_ptr_mut(key) {
        Some(kept) => kept,
        None => {
            let Some(empty) = LB_DATA_SCRATCH.get_ptr(0) else { return false };
            // SAFETY: per-CPU slot, never written: a zeroed (empty) entry.
            if LB_UPLOAD_DATA.insert(key, unsafe { &*empty }, 0).is_err() {
                return false;
            }
            let Some(kept) = LB_UPLOAD_DATA.get_ptr_mut(key) else { return false };
            kept
        }
    };
    // SAFETY: map value pointer from a successful lookup.
    let kept = unsafe { &mut *kept };
    let copy = kept.started.wrapping_add(1);
    // SAFETY: a field of the map value. Volatile: the stamps must not move across the copy.
    unsafe { core::ptr::write_volatile(&raw mut kept.started, copy) };
    let copied = kept::copy_payload(ctx, &mut kept.bytes, offset, len);
    kept.len = copied.unwrap_or(0);
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&raw mut kept.done, copy) };
    copied.is_some()
}

/// Replies go back the way the client's packets come: a session learned from the peer LB or
/// from a backend gets its route here, and follows the client if its path changes.
#[inline(always)]
pub fn follow_client(ctx: &XdpContext, session: &mut Session, frame: &FrameHeaders) {
    session.client_mac = frame.eth_src;
    session.lb_mac = frame.eth_dst;
    session.ifindex = ctx.ingress_ifindex() as u32;
    session.last_client_ns = now_ns();
}

/// A registered backend answers for a client this LB has no session for: it took over from
/// its peer, or the LRU evicted the entry. The backend's header names the client; the way to
/// the client comes from the routing table until the client's next packet shows it.
#[inline(always)]
pub fn relearn(config: &LbConfig, key: &ClientKey, backend: u32) -> Option<*mut Session> {
    // SAFETY: per-CPU slot, ours for the duration of the program.
    let fresh = unsafe { &mut *LB_SCRATCH.get_ptr_mut(0)? };
    fresh.header.reset_for_client(key.ip, key.port, config.vip, key.tid());
    fresh.backend = backend;
    fresh.ifindex = 0;
    fresh.client_mac = [0; 6];
    fresh.lb_mac = [0; 6];
    fresh.last_ack = [0; 2];
    fresh.last_client_ns = now_ns();
    LB_SESSIONS.insert(key, &*fresh, 0).ok()?;
    backends::add_session(backend);
    announce(key);
    LB_SESSIONS.get_ptr_mut(key)
}

/// Keeps the transfer context the backend reports, so another backend can resume from it. The
/// first context is announced at once: the file, digest and options are what a backup needs to
/// carry the transfer on (the block may lag until the next periodic sync, not the context).
#[inline(always)]
pub fn learn_context(key: &ClientKey, session: &mut Session, theirs: &SteeringHeader) {
    let ours = &mut session.header;
    let first_context = ours.flags & FLAG_HAS_CONTEXT == 0;
    let highest = ours.block().max(theirs.block());
    ours.flags |= FLAG_HAS_CONTEXT;
    ours.mode = theirs.mode;
    ours.options = theirs.options;
    ours.timeout = theirs.timeout;
    ours.blksize = theirs.blksize;
    ours.windowsize = theirs.windowsize;
    ours.path_hash = theirs.path_hash;
    ours.digest = theirs.digest;
    ours.file_size = theirs.file_size;
    ours.rtt = theirs.rtt;
    ours.set_block(highest);
    if first_context {
        // The backend answered: from now on the context, not the request, carries the transfer.
        let _ = LB_REQUESTS.remove(key);
        announce(key);
    }
}

/// Moves the session to backend `id` (the load follows; the peer hears of it).
#[inline(always)]
pub fn move_to(session: &mut Session, id: u32) {
    backends::remove_session(session.backend);
    backends::add_session(id);
    session.backend = id;
    announce(&ClientKey::new(session.header.client_ip, session.header.client_port));
}

/// Forgets the finished session of `key` on backend `id`.
#[inline(always)]
pub fn finish(key: &ClientKey, id: u32) {
    let _ = LB_SESSIONS.remove(key);
    let _ = LB_REQUESTS.remove(key);
    let _ = LB_UPLOAD_DATA.remove(key);
    backends::remove_session(id);
}
