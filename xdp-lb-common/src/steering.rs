//! The steering header: 64 bytes the load balancer inserts between the UDP header and the TFTP
//! payload on the LB <-> backend hop, and that backends copy (updated) into every reply.
//!
//! ```text
//!  0               1               2               3
//!  0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7
//! +---------------+---------------+---------------+---------------+
//! |                   magic "XLB" + version 1                     |  0
//! +---------------+---------------+---------------+---------------+
//! |     flags     |     mode      |    options    |    timeout    |  4
//! +---------------+---------------+---------------+---------------+
//! |                     client IPv4 address                       |  8
//! +-------------------------------+-------------------------------+
//! |          client port          |       VIP port (the TID)      | 12
//! +-------------------------------+-------------------------------+
//! |                       VIP IPv4 address                        | 16
//! +---------------------------------------------------------------+
//! |                 block: full 32-bit block counter              | 20
//! +-------------------------------+-------------------------------+
//! |            blksize            |          windowsize           | 24
//! +-------------------------------+-------------------------------+
//! |              path hash (8 bytes, SHA-256 prefix)              | 28
//! +---------------------------------------------------------------+
//! |          content digest (16 bytes, SHA-256 prefix)            | 36
//! +---------------------------------------------------------------+
//! |                    file size in bytes (8)                     | 52
//! +---------------------------------------------------------------+
//! |        SRTT (50 µs units)     |      RTTVAR (50 µs units)     | 60
//! +-------------------------------+-------------------------------+
//!                                                                   64
//! ```
//!
//! Every multi-byte field is in network byte order and stored as a byte array, so the struct has
//! alignment 1 and can be read at any packet offset, in the kernel and in userspace alike.
//!
//! Meaning of `block`:
//! - backend -> LB, DATA: the 32-bit number of this DATA block (the wire carries its low 16 bits);
//! - backend -> LB, OACK: 0;
//! - LB -> backend, ACK: the highest block the LB has seen the backend send for this session, so
//!   the backend can widen the client's 16-bit ACK with [`expand_block`].
//!
//! `path_hash` is the first 8 bytes of SHA-256 over the file's path relative to the backend root
//! (UTF-8, `/`-separated, no leading `/`); `digest` the first 16 bytes of SHA-256 over the file's
//! content. A backend whose copy has another digest answers a TFTP error instead of data.
//!
//! An upload (`MODE_UPLOAD` in `mode`) has no digest yet: its `digest` field names the upload's replica,
//! the backend that holds a second copy of every block the client has been acknowledged
//! (IPv4 address, then steering port, then zeros; all zero while there is none). The balancers
//! keep it with the session, so whichever of them is active moves the upload to the replica
//! when its serving backend dies.

use bytemuck::{Pod, Zeroable};

use crate::tftp::{DATA_HEADER_LEN, DEFAULT_BLKSIZE};

/// First four bytes of every steering header: "XLB" and the format version.
pub const STEERING_MAGIC: [u8; 4] = *b"XLB\x01";

/// Set by a backend on every packet it sends.
pub const FLAG_FROM_BACKEND: u8 = 0x01;
/// LB -> backend: resend what is outstanding after the carried ACK now, without waiting for a
/// timer (used after a session moved to this backend or to a new LB).
pub const FLAG_NUDGE: u8 = 0x02;
/// The transfer-context fields (mode, options, block, blksize, windowsize, path hash, digest,
/// size) are valid. Clear on a request the backend has not answered yet.
pub const FLAG_HAS_CONTEXT: u8 = 0x04;
/// Health probe without TFTP payload; a live backend echoes it with `FLAG_FROM_BACKEND` set.
pub const FLAG_HEARTBEAT: u8 = 0x08;

/// Backend -> LB, header only: the transfer is over (final ACK received, error sent or
/// received); the LB forgets the session.
pub const FLAG_FINISHED: u8 = 0x10;
/// Backend -> LB, header only: the datagram was read and asks for nothing now (a duplicate or
/// stale ACK, a repeated request, an upload's stray ACK, a request whose file is being hashed).
/// The LB counts it as the backend's answer and drops it. With it, every steered datagram a
/// live backend reads gets a reply, so the watchdog's unanswered count is exact whatever the
/// client sends.
pub const FLAG_HEARD: u8 = 0x20;
/// LB -> backend, on a nudge without context: the client sent to its TID while this balancer
/// had no session for it, so the client holds the transfer's first answer (a balancer's
/// takeover nudge without this flag and without context names a session no reply of which
/// ever passed it: the client may still wait for its first answer).
pub const FLAG_CLIENT_SENT: u8 = 0x40;

/// Backend <-> backend, never through a balancer: a datagram of an upload's replication (the
/// upload's request, its DATA and the replica's ACKs and ERRORs).
pub const FLAG_REPLICA: u8 = 0x80;

/// Transfer mode of the session (`mode` field).
pub const MODE_UNKNOWN: u8 = 0;
pub const MODE_OCTET: u8 = 1;
pub const MODE_NETASCII: u8 = 2;
/// Bit of `mode`: the transfer is an upload (the client writes), and `digest` names its replica
/// ([`SteeringHeader::replica`]). The balancers keep `mode` with the rest of the context.
pub const MODE_UPLOAD: u8 = 0x80;

/// Bits of the `options` field: which RFC 2347 options were acknowledged in the OACK.
pub const OPTION_BLKSIZE: u8 = 0x01;
pub const OPTION_TSIZE: u8 = 0x02;
pub const OPTION_TIMEOUT: u8 = 0x04;
pub const OPTION_WINDOWSIZE: u8 = 0x08;

/// The steering header (see the module documentation for the layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SteeringHeader {
    pub magic: [u8; 4],
    pub flags: u8,
    pub mode: u8,
    pub options: u8,
    /// Negotiated retransmission timeout in seconds, 0 for the server's default.
    pub timeout: u8,
    pub client_ip: [u8; 4],
    pub client_port: [u8; 2],
    pub vip_port: [u8; 2],
    pub vip_ip: [u8; 4],
    pub block: [u8; 4],
    pub blksize: [u8; 2],
    pub windowsize: [u8; 2],
    pub path_hash: [u8; 8],
    pub digest: [u8; 16],
    pub file_size: [u8; 8],
    /// The serving backend's round-trip estimate toward the client (0: none), kept by the
    /// balancer with the session so that a backend taking the transfer over retransmits on
    /// the same schedule.
    pub rtt: [u8; 4],
}

impl SteeringHeader {
    /// Size on the wire.
    pub const LEN: usize = 64;

    /// A header for a client, with no transfer context yet.
    #[must_use]
    pub fn for_client(client_ip: [u8; 4], client_port: u16, vip_ip: [u8; 4], vip_port: u16) -> Self {
        Self {
            magic: STEERING_MAGIC,
            client_ip,
            client_port: client_port.to_be_bytes(),
            vip_ip,
            vip_port: vip_port.to_be_bytes(),
            ..Self::zeroed()
        }
    }

    /// Resets the header in place to [`Self::for_client`]'s value (no 64-byte temporary on the
    /// BPF stack).
    #[inline(always)]
    pub fn reset_for_client(&mut self, client_ip: [u8; 4], client_port: [u8; 2], vip_ip: [u8; 4], vip_port: u16) {
        *self = Self::zeroed();
        self.magic = STEERING_MAGIC;
        self.client_ip = client_ip;
        self.client_port = client_port;
        self.vip_ip = vip_ip;
        self.vip_port = vip_port.to_be_bytes();
    }

    #[must_use]
    pub fn has_magic(&self) -> bool {
        self.magic == STEERING_MAGIC
    }

    #[must_use]
    pub fn has_flag(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    #[must_use]
    pub fn client_port(&self) -> u16 {
        u16::from_be_bytes(self.client_port)
    }

    #[must_use]
    pub fn vip_port(&self) -> u16 {
        u16::from_be_bytes(self.vip_port)
    }

    #[must_use]
    pub fn block(&self) -> u32 {
        u32::from_be_bytes(self.block)
    }

    pub fn set_block(&mut self, block: u32) {
        self.block = block.to_be_bytes();
    }

    #[must_use]
    pub fn blksize(&self) -> u16 {
        u16::from_be_bytes(self.blksize)
    }

    /// The longest TFTP packet a backend may send under this header: a DATA of the negotiated
    /// block size (512 before any is negotiated; OACK and ERROR packets are shorter).
    #[must_use]
    pub fn longest_reply(&self) -> usize {
        DATA_HEADER_LEN + usize::from(self.blksize().max(DEFAULT_BLKSIZE))
    }

    #[must_use]
    pub fn windowsize(&self) -> u16 {
        u16::from_be_bytes(self.windowsize)
    }

    #[must_use]
    pub fn path_hash(&self) -> u64 {
        u64::from_be_bytes(self.path_hash)
    }

    #[must_use]
    pub fn file_size(&self) -> u64 {
        u64::from_be_bytes(self.file_size)
    }

    /// Whether the header is an upload's.
    #[must_use]
    pub const fn is_upload(&self) -> bool {
        self.mode & MODE_UPLOAD != 0
    }

    /// An upload's replica: its IPv4 address and steering port (network byte order), if the
    /// header is an upload's and names one.
    #[must_use]
    pub fn replica(&self) -> Option<([u8; 4], [u8; 2])> {
        let d = &self.digest;
        let (ip, port) = ([d[0], d[1], d[2], d[3]], [d[4], d[5]]);
        (self.is_upload() && ip != [0; 4] && port != [0; 2]).then_some((ip, port))
    }

    /// Marks the header an upload's, with `replica` (None: no replica now).
    pub fn set_upload_replica(&mut self, replica: Option<([u8; 4], [u8; 2])>) {
        self.mode |= MODE_UPLOAD;
        self.digest = [0; 16];
        if let Some((ip, port)) = replica {
            self.digest[..4].copy_from_slice(&ip);
            self.digest[4..6].copy_from_slice(&port);
        }
    }
}

/// Widens a 16-bit TFTP block number to the 32-bit counter, given the highest 32-bit block sent
/// so far (`sent`). The result is the largest value `<= sent` whose low 16 bits are `wire`; when
/// no such value exists (the peer acknowledges beyond what was sent), the value within the next
/// 64 Ki blocks is returned, and the caller treats it as out of window.
#[must_use]
pub fn expand_block(wire: u16, sent: u32) -> u32 {
    let candidate = (sent & !0xffff) | u32::from(wire);
    if candidate <= sent {
        candidate
    } else if let Some(previous) = candidate.checked_sub(0x1_0000) {
        previous
    } else {
        candidate
    }
}

#[cfg(test)]
mod tests {
    use super::{SteeringHeader, expand_block};

    #[test]
    fn header_is_64_bytes_with_alignment_one() {
        assert_eq!(size_of::<SteeringHeader>(), SteeringHeader::LEN);
        assert_eq!(align_of::<SteeringHeader>(), 1);
    }

    #[test]
    fn the_longest_reply_is_one_data_packet_of_the_block_size() {
        let mut h = SteeringHeader::for_client([10, 0, 0, 1], 1000, [10, 0, 0, 100], 2000);
        assert_eq!(h.longest_reply(), 516, "512-byte blocks before a blksize is negotiated");
        h.blksize = 8u16.to_be_bytes();
        assert_eq!(h.longest_reply(), 516, "OACK and ERROR may still exceed a tiny block");
        h.blksize = 1468u16.to_be_bytes();
        assert_eq!(h.longest_reply(), 1472);
        h.blksize = 65_464u16.to_be_bytes();
        assert_eq!(h.longest_reply(), 65_468);
    }

    #[test]
    fn an_upload_names_its_replica_in_the_digest_field_and_a_download_names_none() {
        let mut h = SteeringHeader::for_client([10, 0, 0, 1], 1000, [10, 0, 0, 100], 2000);
        h.digest = [9; 16];
        assert_eq!(h.replica(), None, "a download's digest is no replica");
        h.set_upload_replica(Some(([10, 77, 0, 12], 6969u16.to_be_bytes())));
        assert_eq!(h.replica(), Some(([10, 77, 0, 12], 6969u16.to_be_bytes())));
        assert_eq!(&h.digest[6..], &[0; 10]);
        h.set_upload_replica(None);
        assert_eq!(h.replica(), None);
        assert!(h.is_upload());
    }

    #[test]
    fn expand_block_handles_rollover() {
        assert_eq!(expand_block(0, 0), 0);
        assert_eq!(expand_block(5, 7), 5);
        assert_eq!(expand_block(7, 7), 7);
        // The client acknowledges block 65535 just after the sender rolled over to 65537.
        assert_eq!(expand_block(0xffff, 0x1_0001), 0xffff);
        assert_eq!(expand_block(1, 0x1_0001), 0x1_0001);
        assert_eq!(expand_block(0, 0x1_0000), 0x1_0000);
        // Beyond what was sent: the next value up, which the caller rejects.
        assert_eq!(expand_block(9, 7), 9);
    }
}
