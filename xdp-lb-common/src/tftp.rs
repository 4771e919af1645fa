//! The TFTP wire facts the kernel programs act on (RFC 1350, RFC 2347): the service port, the
//! opcodes and the fixed fields in front of a packet. The full wire format lives in
//! tftp-backend's `wire` module; the balancer only tells requests from the rest and reads an
//! ACK's block.

/// The well-known TFTP service port (RFC 1350).
pub const TFTP_PORT: u16 = 69;

/// Read request.
pub const OPCODE_RRQ: u16 = 1;
/// Write request.
pub const OPCODE_WRQ: u16 = 2;
pub const OPCODE_DATA: u16 = 3;
pub const OPCODE_ACK: u16 = 4;
pub const OPCODE_ERROR: u16 = 5;
/// Option acknowledgment (RFC 2347).
pub const OPCODE_OACK: u16 = 6;

/// Length of the opcode in front of every TFTP packet.
pub const OPCODE_LEN: usize = 2;
/// Length of the block number after a DATA's or an ACK's opcode.
pub const BLOCK_LEN: usize = 2;
/// Opcode and block: the header of a DATA packet, the whole of an ACK.
pub const DATA_HEADER_LEN: usize = OPCODE_LEN + BLOCK_LEN;
/// The block size before any is negotiated (RFC 1350).
pub const DEFAULT_BLKSIZE: u16 = 512;
