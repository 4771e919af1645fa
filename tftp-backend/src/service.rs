//! What both modes share: the configuration, opening a read or a write from a request, and
//! building packets into reused buffers.
//!
//! # The ERRORs this server sends
//!
//! U-Boot answers any ERROR but 1 (file not found) and 2 (access violation) by starting its
//! whole download again, and stops for good on those two; EDK2, GRUB and PXELINUX give the
//! file up on any. So an ERROR goes out only where the transfer cannot go on, and a refusal
//! that another server could get past says 0, never 1 or 2:
//! - to a request, before any transfer: 0 "server busy" beyond `--max-transfers` ([`BUSY`]);
//!   4 to a request that does not parse (steered: any packet that does not parse, of a key
//!   with no transfer here); what opening the file says (1 not found, 2 outside the root, not
//!   a regular file or unreadable, 0 more blocks than 32 bits count, 2 too large for
//!   netascii); for uploads 2 when disabled, 6 when the name exists, 3 when the announced
//!   tsize exceeds `--max-upload-bytes`;
//! - during an upload (never resumed): 3 beyond the size limit or the free-space floor, 6 when
//!   the name appeared meanwhile, 0 or 2 when the file cannot be written or moved in place;
//! - steered, during a download: 0 "read error" when the file can no longer be read here;
//!   when a transfer moved here cannot be resumed ([`resume_read`]: file missing, another
//!   version, unreadable), always 0, so that U-Boot requests the file again and the balancer
//!   may place it where it can be served; 8 when the header's options exceed this server's
//!   limits (forged, or a backend configured otherwise);
//! - steered, to a key with no transfer here: 5 for an ACK without context that is no nudge,
//!   or DATA for no upload (nothing to resume from), 4 for an OACK.
//!
//! Never: on a retransmission timeout (the transfer is dropped silently), in answer to a
//! client's ERROR (EDK2's size probe ends with ERROR 8 after the OACK: the transfer is freed at
//! once and nothing is logged above debug), to a duplicate, stale or beyond-the-end ACK, to a
//! nudge for a transfer held elsewhere, or to a packet that does not parse or has no place in a
//! live transfer (standalone ignores it, steered answers the balancer `HEARD`).

use std::time::Duration;

use xdp_lb_common::{
    SteeringHeader,
    steering::{MODE_NETASCII, MODE_OCTET, MODE_UPLOAD, OPTION_BLKSIZE, OPTION_TIMEOUT, OPTION_TSIZE, OPTION_WINDOWSIZE},
};

use crate::{
    files::{Refusal, Root, path_hash},
    options::{Limits, Negotiated, negotiate},
    rto::{Pace, RttEstimate},
    transfer::{ReadTransfer, Source, TOO_LARGE, UploadLimits, WriteSetup, WriteTransfer},
    wire::{ErrorCode, Mode, Options, Repr},
};

/// Largest file served in netascii (converted in memory).
const NETASCII_LIMIT: u64 = 64 << 20;

/// Server-wide settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub limits: Limits,
    pub allow_upload: bool,
    pub allow_overwrite: bool,
    /// Retransmission timeout when the client asks for none.
    pub timeout: Duration,
    /// Shortest wait before a retransmission (`--rto-min-ms`).
    pub rto_min: Duration,
    /// Timer-driven retransmissions per second, all transfers together (`--retransmit-budget`).
    pub retransmit_budget: u32,
    /// What one upload may put on disk (`--max-upload-bytes`, `--min-free-mib`).
    pub upload: UploadLimits,
    /// Most transfers at once; new requests beyond it are refused (`--max-transfers`).
    pub max_transfers: usize,
}

/// The answer to a request beyond `--max-transfers`: not an error of the request, so code 0
/// (clients that restart on any other error than 1 and 2, like U-Boot, simply retry).
pub const BUSY: Refusal = Refusal { code: ErrorCode::NotDefined, message: "server busy, try again later" };

impl Config {
    /// The retransmission bounds of a transfer that negotiated `timeout` seconds (RFC 2349).
    #[must_use]
    pub fn pace(&self, negotiated: Option<u8>) -> Pace {
        let timeout = negotiated.map_or(self.timeout, |s| Duration::from_secs(u64::from(s)));
        Pace { floor: self.rto_min, timeout, negotiated: negotiated.is_some() }
    }
}

/// Identity and options of a read, as the steering header carries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub mode: Mode,
    pub negotiated: Negotiated,
    pub path_hash: [u8; 8],
    pub digest: [u8; 16],
    pub size: u64,
}

impl Context {
    /// Fills the context fields of a steering header.
    pub fn write_into(&self, header: &mut SteeringHeader) {
        header.mode = match self.mode {
            Mode::Octet => MODE_OCTET,
            Mode::Netascii => MODE_NETASCII,
        };
        let o = &self.negotiated.oack;
        header.options = [
            (o.blksize.is_some(), OPTION_BLKSIZE),
            (o.tsize.is_some(), OPTION_TSIZE),
            (o.timeout.is_some(), OPTION_TIMEOUT),
            (o.windowsize.is_some(), OPTION_WINDOWSIZE),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |bits, (_, bit)| bits | bit);
        header.timeout = self.negotiated.timeout.unwrap_or(0);
        header.blksize = self.negotiated.blksize.to_be_bytes();
        header.windowsize = self.negotiated.windowsize.to_be_bytes();
        header.path_hash = self.path_hash;
        header.digest = self.digest;
        header.file_size = self.size.to_be_bytes();
    }

    /// Reads the context back from a header (a transfer this backend never saw).
    #[must_use]
    pub fn from_header(header: &SteeringHeader) -> Self {
        let mode = if header.mode & !MODE_UPLOAD == MODE_NETASCII { Mode::Netascii } else { Mode::Octet };
        let timeout = (header.timeout != 0).then_some(header.timeout);
        Self {
            mode,
            negotiated: Negotiated { blksize: header.blksize().max(8), windowsize: header.windowsize().max(1), timeout, oack: Options::default() },
            path_hash: header.path_hash,
            digest: header.digest,
            size: header.file_size(),
        }
    }
}

/// Opens a standalone read request: file and negotiated options. No digest: nothing carries
/// a standalone transfer on elsewhere, and hashing a file of several GiB before the first
/// answer would keep the client waiting into its retransmissions.
pub fn open_read(root: &mut Root, config: &Config, filename: &str, mode: Mode, options: &Options) -> Result<(ReadTransfer, Negotiated), Refusal> {
    let relative = Root::relative(filename)?;
    let (file, _) = root.open_read(&relative)?;
    let (transfer, negotiated, _) = start_read(file, config, mode, options)?;
    Ok((transfer, negotiated))
}

/// Opens a read request whose context travels in the steering header, so that another backend
/// can carry it on: with the file's content digest (cached by file identity; the steered loop
/// has it computed off the loop before it gets here).
pub fn open_read_with_context(root: &mut Root, config: &Config, filename: &str, mode: Mode, options: &Options) -> Result<(ReadTransfer, Context), Refusal> {
    let relative = Root::relative(filename)?;
    let (file, _) = root.open_read(&relative)?;
    let digest = root.digest(&file).map_err(|_| refusal(ErrorCode::AccessViolation, "cannot read file"))?;
    let (transfer, negotiated, size) = start_read(file, config, mode, options)?;
    Ok((transfer, Context { mode, negotiated, path_hash: path_hash(&relative), digest, size }))
}

/// The transfer of an opened file, its options and the file's size.
fn start_read(file: std::fs::File, config: &Config, mode: Mode, options: &Options) -> Result<(ReadTransfer, Negotiated, u64), Refusal> {
    let size = file.metadata().map_or(0, |m| m.len());
    let source = source_for(file, mode)?;
    let served = source.len().unwrap_or(size);
    let negotiated = negotiate(options, config.limits, Some(served));
    let transfer = ReadTransfer::new(source, negotiated.blksize, negotiated.windowsize, !negotiated.oack.is_empty(), config.pace(negotiated.timeout))
        .map_err(|_| refusal(ErrorCode::NotDefined, "file too large"))?;
    Ok((transfer, negotiated, size))
}

/// Reopens a read from its context alone, checking the file is the same version; `rtt` is the
/// round trip the previous server measured (carried in the steering header). Refused with
/// ERROR 0 whatever the cause: U-Boot starts again on it (through the balancer, which may
/// place the new request on a server that has the file), where 1 or 2 would stop it for good.
pub fn resume_read(root: &mut Root, config: &Config, context: &Context, sent: u32, rtt: RttEstimate) -> Result<ReadTransfer, Refusal> {
    reopen(root, config, context, sent, rtt).map_err(|refused| refusal(ErrorCode::NotDefined, refused.message))
}

fn reopen(root: &mut Root, config: &Config, context: &Context, sent: u32, rtt: RttEstimate) -> Result<ReadTransfer, Refusal> {
    let relative = root.find_by_hash(context.path_hash).ok_or(refusal(ErrorCode::FileNotFound, "file not found on this server"))?;
    let (file, _) = root.open_read(&relative)?;
    let digest = root.digest(&file).map_err(|_| refusal(ErrorCode::AccessViolation, "cannot read file"))?;
    if digest != context.digest {
        return Err(refusal(ErrorCode::NotDefined, "this server has another version of the file"));
    }
    let source = source_for(file, context.mode)?;
    let pace = config.pace(context.negotiated.timeout);
    ReadTransfer::resume(source, context.negotiated.blksize, context.negotiated.windowsize, sent, pace, rtt)
        .map_err(|_| refusal(ErrorCode::NotDefined, "file too large"))
}

fn source_for(file: std::fs::File, mode: Mode) -> Result<Source, Refusal> {
    match mode {
        Mode::Octet => Ok(Source::File(file)),
        Mode::Netascii => Source::netascii(&file, NETASCII_LIMIT).map_err(|_| refusal(ErrorCode::AccessViolation, "file too large for netascii")),
    }
}

/// Opens a write request.
pub fn open_write(root: &Root, config: &Config, filename: &str, mode: Mode, options: &Options) -> Result<(WriteTransfer, Negotiated), Refusal> {
    if !config.allow_upload {
        return Err(refusal(ErrorCode::AccessViolation, "uploads are disabled on this server"));
    }
    let relative = Root::relative(filename)?;
    let target = root.write_target(&relative)?;
    if !config.allow_overwrite && target.exists() {
        return Err(refusal(ErrorCode::FileExists, "file already exists"));
    }
    // A client that announces its size (tsize, RFC 2349) learns of the limit before it sends.
    if options.tsize.is_some_and(|size| !config.upload.fits(0, size)) {
        return Err(refusal(ErrorCode::DiskFull, TOO_LARGE));
    }
    let negotiated = negotiate(options, config.limits, None);
    let setup = WriteSetup {
        blksize: negotiated.blksize,
        windowsize: negotiated.windowsize,
        netascii: mode == Mode::Netascii,
        overwrite: config.allow_overwrite,
        oack: !negotiated.oack.is_empty(),
        pace: config.pace(negotiated.timeout),
        limits: config.upload,
    };
    let transfer = WriteTransfer::new(target, setup).map_err(|_| refusal(ErrorCode::AccessViolation, "cannot create the file"))?;
    Ok((transfer, negotiated))
}

const fn refusal(code: ErrorCode, message: &'static str) -> Refusal {
    Refusal { code, message }
}

/// Emits `repr` at `out[at..]`; returns the end offset (0 if it did not fit: never for the
/// buffers this crate sizes).
pub fn emit_at(repr: &Repr<'_>, out: &mut [u8], at: usize) -> usize {
    out.get_mut(at..).and_then(|rest| repr.emit(rest)).map_or(0, |n| at + n)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Config, open_read, open_read_with_context, resume_read};
    use crate::{
        files::{Root, path_hash},
        options::Limits,
        rto::RttEstimate,
        wire::{ErrorCode, Mode, Options},
    };

    fn config() -> Config {
        Config { limits: Limits::default(), allow_upload: false, allow_overwrite: false, timeout: Duration::from_secs(1), rto_min: Duration::from_millis(2), retransmit_budget: 0, upload: crate::transfer::UploadLimits::default(), max_transfers: 10 }
    }

    /// A transfer moved to a server that cannot resume it (the file is missing there, or is
    /// another version) is refused with ERROR 0, never 1 or 2: U-Boot then requests the file
    /// again, where 1 or 2 would stop its boot for good.
    #[test]
    fn uboot_is_refused_a_resume_with_error_0_so_that_it_asks_again() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.bin"), vec![7u8; 10_000]).unwrap();
        let mut root = Root::new(dir.path()).unwrap();
        let (_, mut context) = open_read_with_context(&mut root, &config(), "f.bin", Mode::Octet, &Options::default()).unwrap();
        assert!(resume_read(&mut root, &config(), &context, 3, RttEstimate::default()).is_ok());
        let mut other_version = context;
        other_version.digest[0] ^= 1;
        context.path_hash = path_hash("missing.bin");
        for refused in [context, other_version] {
            let refusal = resume_read(&mut root, &config(), &refused, 3, RttEstimate::default()).err().expect("refused");
            assert_eq!(refusal.code, ErrorCode::NotDefined, "{}", refusal.message);
        }
    }

    #[test]
    fn only_a_read_whose_context_travels_hashes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.bin"), vec![7u8; 100_000]).unwrap();
        let config = config();
        let mut root = Root::new(dir.path()).unwrap();
        let file = std::fs::File::open(dir.path().join("f.bin")).unwrap();
        let (transfer, _) = open_read(&mut root, &config, "f.bin", Mode::Octet, &Options::default()).unwrap();
        assert_eq!(transfer.size(), 100_000);
        assert_eq!(root.cached_digest(&file), None, "a standalone read answers before hashing anything");
        let (_, context) = open_read_with_context(&mut root, &config, "f.bin", Mode::Octet, &Options::default()).unwrap();
        assert_eq!(root.cached_digest(&file), Some(context.digest));
        assert_eq!(context.size, 100_000);
    }
}
