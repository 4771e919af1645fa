//! What the steered backend does with a datagram, decided from its steering header, its TFTP
//! packet and what the session table knows of its key, without sockets, files or clocks (as
//! quinn-proto decides apart from quinn's I/O). The event loop (`mod.rs`) carries the
//! [`Action`] out.

use xdp_lb_common::{
    SteeringHeader,
    steering::{FLAG_CLIENT_SENT, FLAG_FROM_BACKEND, FLAG_HAS_CONTEXT, FLAG_HEARTBEAT, FLAG_NUDGE, expand_block},
};

use crate::{
    files::{Refusal, Root, path_hash},
    service::{Config, Context},
    transfer::ReadTransfer,
    wire::{self, ErrorCode, Mode, Options, Repr},
};

/// What the session table knows of a datagram's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The key's session here, if any.
    pub session: Option<Known>,
    /// Whether a download of the key ended here lately with the client's last ACK.
    pub completed: bool,
    /// Transfers this backend holds, the key's included.
    pub transfers: usize,
}

/// A session the table holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Known {
    /// A download: the highest block the client acknowledged, the file's path hash, and the
    /// options of the request that opened it here (None: resumed from a header).
    Read { acked: u32, path_hash: [u8; 8], requested: Option<Options> },
    /// An upload.
    Write,
    /// The copy of an upload another backend serves.
    Replica,
}

/// What to do with a datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// Not for this backend to answer (no magic, or a backend's own reply): dropped silently.
    Drop(&'static str),
    /// A balancer's heartbeat: echoed.
    Echo,
    /// The TFTP packet does not parse, and its key has no transfer here: refused as an illegal
    /// operation.
    Malformed(wire::Error),
    /// A packet that has no place in the key's live transfer (one that does not parse, an
    /// OACK from the client): dropped, answered only with `HEARD`. An ERROR would end a
    /// transfer that can go on, and U-Boot answers any ERROR but 1 and 2 by starting its
    /// whole download again.
    Ignored(&'static str),
    /// Refused with a TFTP ERROR, and the balancer told the transfer is over.
    Refuse(Refusal),
    /// A new request beyond `--max-transfers`: the key's old session is forgotten, the request
    /// refused as busy.
    Busy,
    /// An RRQ repeating the request of a read from the same client that has not progressed
    /// past its first answer (a second OACK from the same TID makes clients abort).
    RepeatedRequest { filename: &'a str },
    /// Such a repeat resent by a balancer whose session has no context (`NUDGE` without
    /// `CLIENT_SENT`): no answer of this read passed that balancer (it moved the session away
    /// and back before the first answer, whose reply it then dropped as stale), so the client
    /// still waits for its first answer, which goes again at once, as for an unanswered nudge.
    UnansweredRequest { filename: &'a str },
    /// A new download, replacing any session of the key.
    Read { filename: &'a str, mode: Mode, options: Options },
    /// A new upload, replacing any session of the key.
    Write { filename: &'a str, mode: Mode, options: Options },
    /// An ACK of a download served here.
    Ack(AckPlan),
    /// An ACK of a download this backend never saw, with its context in the header: resumed
    /// at the header's block, then the ACK is acted on.
    Resume { context: Context, ack: AckPlan },
    /// An ACK to an upload: nothing to send, though the session's balancer is the sender from
    /// now on; a nudge (a balancer took over, or moved the upload here) is answered with the
    /// upload's last acknowledgement, so the client sends what follows at once.
    AckToUpload { nudge: bool },
    /// A balancer sends this backend the client's packets of an upload it holds the copy of:
    /// the primary is gone, this backend serves the upload from now on (then the datagram is
    /// decided again).
    Promote,
    /// An ACK for a download that ended here (a late final ACK, or a nudge after it): the
    /// client has every block; the balancer is told the transfer is over.
    AlreadyFinished,
    /// A balancer that took over nudges every backend a session may concern: this one does
    /// not serve it, and the client is not waiting on it.
    NudgeElsewhere,
    /// DATA of an upload served here.
    Data { block: u16, data: &'a [u8] },
    /// DATA of an upload served here with a balancer's nudge: the upload just moved here (this
    /// backend held its copy), and the client's last DATA comes with it, kept by the balancer
    /// (the dead backend may have taken it along) or the client's own packet the kernel moved.
    /// Written if it is the next block, and the client acknowledged at once either way: a
    /// duplicate (this backend has the block) is not written twice but acknowledged again,
    /// and a DATA inside a window or beyond a gap gets the last block held.
    HandedData { block: u16, data: &'a [u8] },
    /// The client sent an ERROR: the session is forgotten, the balancer told it is over.
    ClientAborted { code: ErrorCode, message: &'a str },
}

/// Which block an ACK of a download acknowledges, in the transfer's 32-bit count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckPlan {
    pub block: AckBlock,
    /// The balancer asks to resend what follows now (the session just moved here).
    pub nudge: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckBlock {
    /// A nudge from a balancer that lacks the context knows nothing of the blocks either:
    /// this server's own state (the highest block acknowledged) says where to resend from.
    /// `client_sent`: the client sent to its TID (it holds the first answer); without it, no
    /// reply of the session ever passed the balancer, and the client may still wait for the
    /// first answer (`AckPlan::unanswered`).
    OwnState { client_sent: bool },
    /// The client's 16-bit ACK, widened against what was sent. `view`: the balancer's view of
    /// what was sent, when the header has one; it bounds the widening after a move (a transfer
    /// that moved away and back has a stale copy here, which catches up to it first).
    Wire { block: u16, view: Option<u32> },
}

impl AckPlan {
    fn of(header: &SteeringHeader, block: u16) -> Self {
        let nudge = header.has_flag(FLAG_NUDGE);
        let context = header.has_flag(FLAG_HAS_CONTEXT);
        let block = if nudge && !context {
            AckBlock::OwnState { client_sent: header.has_flag(FLAG_CLIENT_SENT) }
        } else {
            AckBlock::Wire { block, view: context.then(|| header.block()) }
        };
        Self { block, nudge }
    }

    /// A takeover's nudge of a session no reply of which passed the balancers: the first
    /// answer (an OACK, say) may have been lost with the failed one, and the client waits for it.
    #[must_use]
    pub const fn unanswered(&self) -> bool {
        matches!(self.block, AckBlock::OwnState { client_sent: false })
    }

    /// The acknowledged block in `transfer`'s count, after catching the transfer up to the
    /// balancer's view.
    pub fn block(&self, transfer: &mut ReadTransfer) -> u32 {
        match self.block {
            AckBlock::OwnState { .. } => transfer.acked(),
            AckBlock::Wire { block, view } => {
                if let Some(view) = view {
                    transfer.catch_up(view);
                }
                expand_block(block, transfer.sent())
            }
        }
    }
}

const UNEXPECTED_OACK: Refusal = Refusal { code: ErrorCode::IllegalOperation, message: "unexpected OACK" };
const UNKNOWN_TRANSFER: Refusal = Refusal { code: ErrorCode::UnknownTransferId, message: "unknown transfer" };
/// Beyond what this server would have negotiated: a forged or foreign header, not a transfer
/// to resume (it could make this server send huge windows).
const BEYOND_LIMITS: Refusal = Refusal { code: ErrorCode::OptionRefused, message: "options beyond this server's limits" };

/// What to do with a datagram of steering header `header` and TFTP packet `request`, given
/// what the table knows of its key (`seen`) and the server's limits (`config`).
pub fn decide<'a>(header: &SteeringHeader, request: Result<Repr<'a>, wire::Error>, seen: &Seen, config: &Config) -> Action<'a> {
    if !header.has_magic() {
        return Action::Drop("no steering magic");
    }
    if header.has_flag(FLAG_FROM_BACKEND) {
        return Action::Drop("a backend's reply");
    }
    if header.has_flag(FLAG_HEARTBEAT) {
        return Action::Echo;
    }
    let live = seen.session.is_some();
    let request = match request {
        Ok(request) => request,
        Err(_) if live => return Action::Ignored("malformed packet in a live transfer"),
        Err(error) => return Action::Malformed(error),
    };
    // A new request replaces the key's session, which then no longer counts.
    let busy = || seen.transfers.saturating_sub(usize::from(seen.session.is_some())) >= config.max_transfers;
    match request {
        Repr::Rrq { filename, options, .. } if repeats(seen, filename, &options) => {
            if header.has_flag(FLAG_NUDGE) && !header.has_flag(FLAG_CLIENT_SENT) && !header.has_flag(FLAG_HAS_CONTEXT) {
                Action::UnansweredRequest { filename }
            } else {
                Action::RepeatedRequest { filename }
            }
        }
        Repr::Rrq { .. } | Repr::Wrq { .. } if busy() => Action::Busy,
        Repr::Data { .. } | Repr::Ack { .. } if seen.session == Some(Known::Replica) => Action::Promote,
        Repr::Rrq { filename, mode, options } => Action::Read { filename, mode, options },
        Repr::Wrq { filename, mode, options } => Action::Write { filename, mode, options },
        Repr::Ack { block } => ack(header, block, seen, config),
        Repr::Data { block, data } => match seen.session {
            Some(Known::Write) if header.has_flag(FLAG_NUDGE) => Action::HandedData { block, data },
            Some(Known::Write) => Action::Data { block, data },
            _ => Action::Refuse(UNKNOWN_TRANSFER),
        },
        Repr::Error { code, message } => Action::ClientAborted { code, message },
        Repr::Oack { .. } if live => Action::Ignored("OACK from a client"),
        Repr::Oack { .. } => Action::Refuse(UNEXPECTED_OACK),
    }
}

/// Whether an RRQ for `filename` with `options` repeats the request of the key's read, which
/// has not progressed past its first answer. The same file with other options is a new
/// request: EDK2 probes a file's size (tsize, blksize, windowsize), aborts after the OACK, then
/// reads it without tsize, possibly from the same port; should its abort be lost, the read
/// must still get an OACK of its own options, not the probe's.
fn repeats(seen: &Seen, filename: &str, options: &Options) -> bool {
    let Some(Known::Read { acked, path_hash: hash, requested }) = seen.session else { return false };
    acked == 0 && requested.is_none_or(|requested| requested == *options) && Root::relative(filename).is_ok_and(|relative| path_hash(&relative) == hash)
}

fn ack(header: &SteeringHeader, block: u16, seen: &Seen, config: &Config) -> Action<'static> {
    let plan = AckPlan::of(header, block);
    match seen.session {
        Some(Known::Read { .. }) => Action::Ack(plan),
        Some(Known::Write) => Action::AckToUpload { nudge: plan.nudge },
        Some(Known::Replica) => Action::Promote,
        None if seen.completed => Action::AlreadyFinished,
        // Never seen here, and nothing to continue from.
        None if !header.has_flag(FLAG_HAS_CONTEXT) => {
            if plan.nudge {
                Action::NudgeElsewhere
            } else {
                Action::Refuse(UNKNOWN_TRANSFER)
            }
        }
        // Never seen here: continue from the header (the transfer moved to this backend).
        None => {
            let context = Context::from_header(header);
            let limits = config.limits;
            if context.negotiated.blksize > limits.max_blksize || context.negotiated.windowsize > limits.max_windowsize {
                return Action::Refuse(BEYOND_LIMITS);
            }
            Action::Resume { context, ack: plan }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use xdp_lb_common::{
        SteeringHeader,
        steering::{FLAG_CLIENT_SENT, FLAG_FROM_BACKEND, FLAG_HAS_CONTEXT, FLAG_HEARTBEAT, FLAG_NUDGE},
    };

    use super::{AckBlock, AckPlan, Action, BEYOND_LIMITS, Known, Seen, UNKNOWN_TRANSFER, decide};
    use crate::{
        files::{Refusal, path_hash},
        options::Limits,
        rto::{Pace, RttEstimate},
        service::{Config, Context},
        transfer::{ReadTransfer, Source},
        wire::{self, ErrorCode, Mode, Options, Repr},
    };

    fn config(max_transfers: usize) -> Config {
        Config {
            limits: Limits { max_blksize: 1468, max_windowsize: 64 },
            allow_upload: true,
            allow_overwrite: false,
            timeout: Duration::from_secs(1),
            rto_min: Duration::from_millis(2),
            retransmit_budget: 0,
            upload: crate::transfer::UploadLimits::default(),
            max_transfers,
        }
    }

    /// A balancer's header for a session, with `flags`.
    fn header(flags: u8) -> SteeringHeader {
        let mut header = SteeringHeader::for_client([10, 9, 8, 7], 40_000, [10, 9, 8, 1], 69);
        header.flags = flags;
        header
    }

    /// A header that carries a download's context and the balancer's view of what was sent.
    fn with_context(flags: u8, blksize: u16, windowsize: u16, sent: u32) -> SteeringHeader {
        let mut header = header(flags | FLAG_HAS_CONTEXT);
        let negotiated = crate::options::Negotiated { blksize, windowsize, timeout: None, oack: Options::default() };
        Context { mode: Mode::Octet, negotiated, path_hash: path_hash("f.bin"), digest: [7; 16], size: 1 << 20 }.write_into(&mut header);
        header.set_block(sent);
        header
    }

    const NOTHING: Seen = Seen { session: None, completed: false, transfers: 0 };

    fn reading(acked: u32, file: &str) -> Seen {
        Seen { session: Some(Known::Read { acked, path_hash: path_hash(file), requested: Some(Options::default()) }), completed: false, transfers: 1 }
    }

    const WRITING: Seen = Seen { session: Some(Known::Write), completed: false, transfers: 1 };

    #[expect(clippy::unnecessary_wraps, reason = "what `decide` takes: a parsed packet")]
    fn rrq(filename: &str) -> Result<Repr<'_>, wire::Error> {
        Ok(Repr::Rrq { filename, mode: Mode::Octet, options: Options::default() })
    }

    #[expect(clippy::unnecessary_wraps, reason = "what `decide` takes: a parsed packet")]
    const fn ack(block: u16) -> Result<Repr<'static>, wire::Error> {
        Ok(Repr::Ack { block })
    }

    #[test]
    fn a_header_without_magic_or_from_a_backend_is_dropped() {
        let mut foreign = header(0);
        foreign.magic = [0; 4];
        assert!(matches!(decide(&foreign, ack(1), &NOTHING, &config(10)), Action::Drop(_)));
        assert!(matches!(decide(&header(FLAG_FROM_BACKEND), ack(1), &NOTHING, &config(10)), Action::Drop(_)));
    }

    #[test]
    fn a_heartbeat_is_echoed_whatever_follows() {
        assert_eq!(decide(&header(FLAG_HEARTBEAT), Err(wire::Error::Truncated), &NOTHING, &config(10)), Action::Echo);
    }

    #[test]
    fn a_packet_that_does_not_parse_is_malformed() {
        assert_eq!(decide(&header(0), Err(wire::Error::Truncated), &NOTHING, &config(10)), Action::Malformed(wire::Error::Truncated));
    }

    #[test]
    fn a_request_for_an_unknown_key_starts_a_new_session() {
        let expected = Action::Read { filename: "f.bin", mode: Mode::Octet, options: Options::default() };
        assert_eq!(decide(&header(0), rrq("f.bin"), &NOTHING, &config(10)), expected);
        let wrq = Ok(Repr::Wrq { filename: "up.bin", mode: Mode::Octet, options: Options::default() });
        assert_eq!(decide(&header(0), wrq, &NOTHING, &config(10)), Action::Write { filename: "up.bin", mode: Mode::Octet, options: Options::default() });
    }

    #[test]
    fn a_request_a_balancer_resends_unanswered_gets_the_first_answer_again() {
        let resent = decide(&header(FLAG_NUDGE), rrq("f.bin"), &reading(0, "f.bin"), &config(10));
        assert_eq!(resent, Action::UnansweredRequest { filename: "f.bin" }, "no answer passed the balancer: the client waits for one");
        let client_sent = decide(&header(FLAG_NUDGE | FLAG_CLIENT_SENT), rrq("f.bin"), &reading(0, "f.bin"), &config(10));
        assert_eq!(client_sent, Action::RepeatedRequest { filename: "f.bin" }, "the client may hold the first answer: no second OACK");
        let fresh = decide(&header(FLAG_NUDGE), rrq("f.bin"), &Seen { session: None, completed: false, transfers: 0 }, &config(10));
        assert!(matches!(fresh, Action::Read { filename: "f.bin", .. }), "a backend that never saw it serves it fresh");
    }

    #[test]
    fn a_repeated_request_before_any_progress_is_a_duplicate() {
        assert_eq!(decide(&header(0), rrq("f.bin"), &reading(0, "f.bin"), &config(10)), Action::RepeatedRequest { filename: "f.bin" });
        // The same name spelled another way inside the root is the same file.
        assert_eq!(decide(&header(0), rrq("./f.bin"), &reading(0, "f.bin"), &config(10)), Action::RepeatedRequest { filename: "./f.bin" });
    }

    #[test]
    fn a_request_after_progress_or_for_another_file_starts_again() {
        for seen in [reading(1, "f.bin"), reading(0, "g.bin"), WRITING] {
            assert!(matches!(decide(&header(0), rrq("f.bin"), &seen, &config(10)), Action::Read { filename: "f.bin", .. }), "{seen:?}");
        }
    }

    #[test]
    fn a_new_request_beyond_max_transfers_is_busy_unless_it_replaces_its_own() {
        let full = Seen { transfers: 2, ..NOTHING };
        assert_eq!(decide(&header(0), rrq("f.bin"), &full, &config(2)), Action::Busy);
        let wrq = Ok(Repr::Wrq { filename: "up.bin", mode: Mode::Octet, options: Options::default() });
        assert_eq!(decide(&header(0), wrq, &full, &config(2)), Action::Busy);
        let own = Seen { transfers: 2, ..reading(5, "f.bin") };
        assert!(matches!(decide(&header(0), rrq("f.bin"), &own, &config(2)), Action::Read { .. }));
    }

    #[test]
    fn an_ack_of_a_read_here_is_widened_against_the_balancers_view() {
        let plan = AckPlan { block: AckBlock::Wire { block: 9, view: Some(300) }, nudge: false };
        assert_eq!(decide(&with_context(0, 512, 16, 300), ack(9), &reading(4, "f.bin"), &config(10)), Action::Ack(plan));
        let plan = AckPlan { block: AckBlock::Wire { block: 9, view: None }, nudge: false };
        assert_eq!(decide(&header(0), ack(9), &reading(4, "f.bin"), &config(10)), Action::Ack(plan));
    }

    #[test]
    fn a_nudge_without_context_resends_from_this_servers_own_state() {
        let plan = AckPlan { block: AckBlock::OwnState { client_sent: false }, nudge: true };
        assert_eq!(decide(&header(FLAG_NUDGE), ack(9), &reading(4, "f.bin"), &config(10)), Action::Ack(plan));
        let plan = AckPlan { block: AckBlock::Wire { block: 9, view: Some(30) }, nudge: true };
        assert_eq!(decide(&with_context(FLAG_NUDGE, 512, 16, 30), ack(9), &reading(4, "f.bin"), &config(10)), Action::Ack(plan));
    }

    /// A takeover's nudge of a session without context names a transfer no reply of which
    /// passed the balancers: its first answer may be lost (GRUB waits for the server). A nudge
    /// about a client that sent to its TID (`CLIENT_SENT`), or one with the context, does not.
    #[test]
    fn only_a_nudge_without_context_nor_word_from_the_client_is_unanswered() {
        assert!(AckPlan::of(&header(FLAG_NUDGE), 0).unanswered());
        assert!(!AckPlan::of(&header(FLAG_NUDGE | FLAG_CLIENT_SENT), 0).unanswered(), "the client sent to its TID");
        assert!(!AckPlan::of(&with_context(FLAG_NUDGE, 512, 16, 0), 0).unanswered(), "the OACK passed a balancer");
        assert!(!AckPlan::of(&header(0), 0).unanswered(), "the client's own ACK");
        let plan = AckPlan { block: AckBlock::OwnState { client_sent: true }, nudge: true };
        assert_eq!(decide(&header(FLAG_NUDGE | FLAG_CLIENT_SENT), ack(0), &reading(0, "f.bin"), &config(10)), Action::Ack(plan));
    }

    #[test]
    fn an_ack_with_context_for_an_unknown_key_resumes_at_the_headers_offset() {
        let header = with_context(0, 1468, 16, 4_000);
        let Action::Resume { context, ack: plan } = decide(&header, ack(3_990), &NOTHING, &config(10)) else { panic!("not resumed") };
        assert_eq!(context, Context::from_header(&header));
        assert_eq!(plan, AckPlan { block: AckBlock::Wire { block: 3_990, view: Some(4_000) }, nudge: false });
    }

    #[test]
    fn a_header_beyond_this_servers_limits_is_not_resumed() {
        assert_eq!(decide(&with_context(0, 9000, 16, 10), ack(5), &NOTHING, &config(10)), Action::Refuse(BEYOND_LIMITS));
        assert_eq!(decide(&with_context(0, 1468, 65, 10), ack(5), &NOTHING, &config(10)), Action::Refuse(BEYOND_LIMITS));
    }

    #[test]
    fn a_transfer_moving_here_is_resumed_even_when_busy() {
        let full = Seen { transfers: 2, ..NOTHING };
        assert!(matches!(decide(&with_context(0, 1468, 16, 10), ack(5), &full, &config(2)), Action::Resume { .. }));
    }

    #[test]
    fn an_unknown_session_without_context_is_refused_or_left_to_others() {
        assert_eq!(decide(&header(0), ack(5), &NOTHING, &config(10)), Action::Refuse(UNKNOWN_TRANSFER));
        assert_eq!(decide(&header(FLAG_NUDGE), ack(5), &NOTHING, &config(10)), Action::NudgeElsewhere);
        let data = Ok(Repr::Data { block: 1, data: b"x" });
        assert_eq!(decide(&header(0), data, &NOTHING, &config(10)), Action::Refuse(UNKNOWN_TRANSFER));
        assert_eq!(decide(&header(0), data, &reading(0, "f.bin"), &config(10)), Action::Refuse(UNKNOWN_TRANSFER), "DATA to a download");
    }

    #[test]
    fn the_final_ack_of_a_download_that_ended_here_finishes_it_again() {
        let done = Seen { completed: true, ..NOTHING };
        for header in [header(0), header(FLAG_NUDGE), with_context(0, 512, 16, 10)] {
            assert_eq!(decide(&header, ack(10), &done, &config(10)), Action::AlreadyFinished);
        }
    }

    #[test]
    fn data_and_acks_of_an_upload() {
        let data = Ok(Repr::Data { block: 1, data: b"x" });
        assert_eq!(decide(&header(0), data, &WRITING, &config(10)), Action::Data { block: 1, data: b"x" });
        assert_eq!(decide(&header(0), ack(1), &WRITING, &config(10)), Action::AckToUpload { nudge: false });
        let mut nudge = header(0);
        nudge.flags |= FLAG_NUDGE;
        assert_eq!(decide(&nudge, ack(0), &WRITING, &config(10)), Action::AckToUpload { nudge: true }, "re-acknowledged: the client sends on");
    }

    /// A balancer sends the client's packets of an upload to the backend holding its copy only
    /// when the primary died: the copy becomes the upload (issue 17), whatever came first, the
    /// client's next DATA or the balancer's nudge. A new request replaces the copy as any.
    #[test]
    fn the_replica_of_an_upload_takes_it_over_on_the_clients_packets() {
        const COPY: Seen = Seen { session: Some(Known::Replica), completed: false, transfers: 1 };
        let data = Ok(Repr::Data { block: 9, data: b"x" });
        assert_eq!(decide(&header(0), data, &COPY, &config(10)), Action::Promote);
        let mut nudge = header(0);
        nudge.flags |= FLAG_NUDGE | FLAG_HAS_CONTEXT;
        assert_eq!(decide(&nudge, ack(0), &COPY, &config(10)), Action::Promote);
        let wrq = Ok(Repr::Wrq { filename: "up.bin", mode: Mode::Octet, options: Options::default() });
        assert_eq!(decide(&header(0), wrq, &COPY, &config(10)), Action::Write { filename: "up.bin", mode: Mode::Octet, options: Options::default() });
    }

    /// A balancer that moves an upload to its replica hands it the client's last DATA with the
    /// nudge (the dead primary may have taken it along; tftp-hpa waits for that block's ACK).
    /// The copy is promoted on it, then the same datagram, decided again, is the client's DATA
    /// to write if new and to acknowledge at once; without the nudge, a DATA is the client's
    /// own, acknowledged by the window's rules.
    #[test]
    fn a_handed_over_data_promotes_the_copy_then_is_written_and_acknowledged_at_once() {
        const COPY: Seen = Seen { session: Some(Known::Replica), completed: false, transfers: 1 };
        let mut nudge = header(0);
        nudge.flags |= FLAG_NUDGE | FLAG_HAS_CONTEXT;
        nudge.set_upload_replica(Some(([10, 77, 0, 12], 6969u16.to_be_bytes())));
        let data = Ok(Repr::Data { block: 7, data: b"block seven" });
        assert_eq!(decide(&nudge, data, &COPY, &config(10)), Action::Promote);
        assert_eq!(decide(&nudge, data, &WRITING, &config(10)), Action::HandedData { block: 7, data: b"block seven" }, "after the promotion");
        assert_eq!(decide(&header(FLAG_HAS_CONTEXT), data, &WRITING, &config(10)), Action::Data { block: 7, data: b"block seven" });
        assert_eq!(decide(&nudge, data, &NOTHING, &config(10)), Action::Refuse(UNKNOWN_TRANSFER), "a backend that holds no copy writes nothing");
    }

    #[test]
    fn a_client_error_aborts_and_an_oack_is_refused() {
        let error = Ok(Repr::Error { code: ErrorCode::DiskFull, message: "full" });
        assert_eq!(decide(&header(0), error, &reading(3, "f.bin"), &config(10)), Action::ClientAborted { code: ErrorCode::DiskFull, message: "full" });
        let oack = Ok(Repr::Oack { options: Options::default() });
        assert_eq!(decide(&header(0), oack, &NOTHING, &config(10)), Action::Refuse(Refusal { code: ErrorCode::IllegalOperation, message: "unexpected OACK" }));
    }

    /// EDK2 asks each file twice: a size probe it aborts with ERROR 8 once the OACK came, then
    /// the read. The abort frees the session (nothing logged above debug), so the read, from
    /// the same port or another, opens a transfer of its own; and should the abort be lost,
    /// the read still does, having other options than the probe. Only an exact copy of the
    /// request is a duplicate.
    #[test]
    fn edk2s_size_probe_is_freed_on_its_abort_and_its_read_served_fresh() {
        let probe = Options { tsize: Some(0), blksize: Some(1468), windowsize: Some(4), ..Options::default() };
        let read = Options { blksize: Some(1468), windowsize: Some(4), ..Options::default() };
        let probing = Seen { session: Some(Known::Read { acked: 0, path_hash: path_hash("grubx64.efi"), requested: Some(probe) }), completed: false, transfers: 1 };
        let abort = Ok(Repr::Error { code: ErrorCode::OptionRefused, message: "User aborted the transfer" });
        assert_eq!(decide(&header(0), abort, &probing, &config(10)), Action::ClientAborted { code: ErrorCode::OptionRefused, message: "User aborted the transfer" });
        let rrq = |options| Ok(Repr::Rrq { filename: "grubx64.efi", mode: Mode::Octet, options });
        assert_eq!(decide(&header(0), rrq(read), &NOTHING, &config(10)), Action::Read { filename: "grubx64.efi", mode: Mode::Octet, options: read }, "after the abort");
        assert_eq!(decide(&header(0), rrq(read), &probing, &config(10)), Action::Read { filename: "grubx64.efi", mode: Mode::Octet, options: read }, "the abort lost");
        assert_eq!(decide(&header(0), rrq(probe), &probing, &config(10)), Action::RepeatedRequest { filename: "grubx64.efi" }, "a copy of the probe");
        // A session resumed from a header does not know its request: any repeat is a copy.
        let resumed = Seen { session: Some(Known::Read { acked: 0, path_hash: path_hash("grubx64.efi"), requested: None }), completed: false, transfers: 1 };
        assert_eq!(decide(&header(0), rrq(read), &resumed, &config(10)), Action::RepeatedRequest { filename: "grubx64.efi" });
    }

    /// U-Boot starts its whole download again on any ERROR but 1 and 2: a packet that has no
    /// place in a live transfer (one that does not parse, a client's OACK) is dropped, and the
    /// transfer goes on. Only a key without a transfer here gets an ERROR for it.
    #[test]
    fn uboot_gets_no_error_for_a_stray_packet_in_a_live_transfer() {
        for seen in [reading(0, "u-boot.itb"), reading(300, "u-boot.itb"), WRITING] {
            assert!(matches!(decide(&header(0), Err(wire::Error::Truncated), &seen, &config(10)), Action::Ignored(_)), "{seen:?}");
            let oack = Ok(Repr::Oack { options: Options::default() });
            assert!(matches!(decide(&header(0), oack, &seen, &config(10)), Action::Ignored(_)), "{seen:?}");
        }
        assert_eq!(decide(&header(0), Err(wire::Error::Truncated), &NOTHING, &config(10)), Action::Malformed(wire::Error::Truncated));
    }

    /// A download of `blocks` blocks of 8 bytes, resumed as if `sent` went out.
    fn download(blocks: u32, sent: u32) -> ReadTransfer {
        let data = vec![1u8; blocks as usize * 8];
        let pace = Pace { floor: Duration::from_millis(2), timeout: Duration::from_secs(1), negotiated: false };
        ReadTransfer::resume(Source::Memory(data), 8, 16, sent, pace, RttEstimate::from_wire([0; 4])).unwrap()
    }

    #[test]
    fn a_stale_ack_is_widened_below_what_was_sent() {
        // Blocks up to 0x1_0004 went out; the client's ACK of 0xfffe is from before the rollover.
        let mut transfer = download(0x2_0000, 0x1_0004);
        let plan = AckPlan { block: AckBlock::Wire { block: 0xfffe, view: None }, nudge: false };
        assert_eq!(plan.block(&mut transfer), 0xfffe);
        let plan = AckPlan { block: AckBlock::Wire { block: 3, view: Some(0x1_0000) }, nudge: false };
        assert_eq!(plan.block(&mut transfer), 0x1_0003, "a view behind this server's count changes nothing");
    }

    #[test]
    fn an_ack_ahead_of_a_lagging_copy_is_widened_against_the_balancers_view() {
        // This server's copy stopped at 0xfff0 (the transfer moved away and back); the balancer
        // saw 0x1_0010 go out, and the client acknowledges 0x1_0008.
        let mut transfer = download(0x2_0000, 0xfff0);
        let plan = AckPlan { block: AckBlock::Wire { block: 0x0008, view: Some(0x1_0010) }, nudge: false };
        assert_eq!(plan.block(&mut transfer), 0x1_0008);
        assert_eq!(transfer.sent(), 0x1_0010, "caught up");
        // Without the view, the stale count would have read it as block 8.
        let mut stale = download(0x2_0000, 0xfff0);
        let plan = AckPlan { block: AckBlock::Wire { block: 0x0008, view: None }, nudge: false };
        assert_eq!(plan.block(&mut stale), 0x0008);
    }

    #[test]
    fn a_nudge_from_own_state_resends_after_the_last_ack() {
        let mut transfer = download(100, 40);
        assert_eq!(AckPlan { block: AckBlock::OwnState { client_sent: false }, nudge: true }.block(&mut transfer), transfer.acked());
    }
}
