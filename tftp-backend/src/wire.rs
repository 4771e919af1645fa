//! TFTP wire format (RFC 1350, 2347, 2348, 2349, 7440): a typed view over a buffer
//! ([`Packet`]) and owned messages ([`Repr`]), in the manner of smoltcp's `wire` module.
//!
//! No-panic contract: nothing in this module panics, allocates or loops without bound on any
//! input. Parsing holds no state: block arithmetic, rollover and retransmission live in
//! `transfer`. `Repr::parse(emit(r)) == r` for every valid `Repr` (property-tested).

use core::fmt;

use xdp_lb_common::tftp;

/// Largest TFTP packet we build or accept: opcode, block and the largest RFC 2348 block.
pub const MAX_PACKET: usize = DATA_HEADER_LEN + 65_464;

/// Opcode and block number: the bytes before a DATA packet's block, all that
/// `Repr::Data { block, data: &[] }` emits (a sender that gathers each block from its own
/// buffer writes only these). The numbers the balancer also reads come from `xdp_lb_common`.
pub const DATA_HEADER_LEN: usize = tftp::DATA_HEADER_LEN;

/// Why a packet could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Shorter than its opcode requires.
    Truncated,
    /// Opcode outside 1..=6.
    UnknownOpcode(u16),
    /// A string field without its terminating NUL.
    Unterminated,
    /// A string field that is not valid UTF-8 (filenames and option names must be).
    NotUtf8,
    /// Mode other than octet, netascii (or mail, which nobody serves).
    BadMode,
    /// An option without a value, or a value a number was expected in.
    BadOption,
    /// Larger than [`MAX_PACKET`].
    TooLong,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("truncated packet"),
            Self::UnknownOpcode(op) => write!(f, "unknown opcode {op}"),
            Self::Unterminated => f.write_str("string without NUL terminator"),
            Self::NotUtf8 => f.write_str("string is not UTF-8"),
            Self::BadMode => f.write_str("unsupported transfer mode"),
            Self::BadOption => f.write_str("malformed option"),
            Self::TooLong => f.write_str("packet too long"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = core::result::Result<T, Error>;

/// TFTP opcodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Opcode {
    Rrq = tftp::OPCODE_RRQ,
    Wrq = tftp::OPCODE_WRQ,
    Data = tftp::OPCODE_DATA,
    Ack = tftp::OPCODE_ACK,
    Error = tftp::OPCODE_ERROR,
    Oack = tftp::OPCODE_OACK,
}

impl Opcode {
    fn from_u16(value: u16) -> Result<Self> {
        Ok(match value {
            tftp::OPCODE_RRQ => Self::Rrq,
            tftp::OPCODE_WRQ => Self::Wrq,
            tftp::OPCODE_DATA => Self::Data,
            tftp::OPCODE_ACK => Self::Ack,
            tftp::OPCODE_ERROR => Self::Error,
            tftp::OPCODE_OACK => Self::Oack,
            other => return Err(Error::UnknownOpcode(other)),
        })
    }
}

/// Transfer mode of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Octet,
    Netascii,
}

impl Mode {
    fn parse(text: &str) -> Result<Self> {
        if text.eq_ignore_ascii_case("octet") {
            Ok(Self::Octet)
        } else if text.eq_ignore_ascii_case("netascii") {
            Ok(Self::Netascii)
        } else {
            Err(Error::BadMode)
        }
    }

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Octet => "octet",
            Self::Netascii => "netascii",
        }
    }
}

/// TFTP error codes (RFC 1350, RFC 2347).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    NotDefined = 0,
    FileNotFound = 1,
    AccessViolation = 2,
    DiskFull = 3,
    IllegalOperation = 4,
    UnknownTransferId = 5,
    FileExists = 6,
    NoSuchUser = 7,
    OptionRefused = 8,
}

impl ErrorCode {
    #[must_use]
    pub fn from_u16(value: u16) -> Self {
        match value {
            1 => Self::FileNotFound,
            2 => Self::AccessViolation,
            3 => Self::DiskFull,
            4 => Self::IllegalOperation,
            5 => Self::UnknownTransferId,
            6 => Self::FileExists,
            7 => Self::NoSuchUser,
            8 => Self::OptionRefused,
            _ => Self::NotDefined,
        }
    }
}

/// The options this server understands (RFC 2348, 2349, 7440). Unknown options are skipped
/// when parsing, as RFC 2347 requires; values are kept as sent, validated by negotiation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub blksize: Option<u32>,
    pub timeout: Option<u32>,
    pub tsize: Option<u64>,
    pub windowsize: Option<u32>,
}

impl Options {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Parses `name\0value\0` pairs.
    fn parse(mut rest: &[u8]) -> Result<Self> {
        let mut options = Self::default();
        while !rest.is_empty() {
            let (name, after_name) = take_str(rest)?;
            let (value, after_value) = take_str(after_name).map_err(|_| Error::BadOption)?;
            rest = after_value;
            let number = || value.parse::<u64>().map_err(|_| Error::BadOption);
            let small = || u32::try_from(number()?).map_err(|_| Error::BadOption);
            if name.eq_ignore_ascii_case("blksize") {
                options.blksize = Some(small()?);
            } else if name.eq_ignore_ascii_case("timeout") {
                options.timeout = Some(small()?);
            } else if name.eq_ignore_ascii_case("tsize") {
                options.tsize = Some(number()?);
            } else if name.eq_ignore_ascii_case("windowsize") {
                options.windowsize = Some(small()?);
            }
            // Anything else: ignored (RFC 2347).
        }
        Ok(options)
    }

    /// Calls `f(name, value)` for each present option, in a fixed order.
    fn for_each(&self, mut f: impl FnMut(&str, u64)) {
        if let Some(v) = self.blksize {
            f("blksize", u64::from(v));
        }
        if let Some(v) = self.timeout {
            f("timeout", u64::from(v));
        }
        if let Some(v) = self.tsize {
            f("tsize", v);
        }
        if let Some(v) = self.windowsize {
            f("windowsize", u64::from(v));
        }
    }

    fn buffer_len(&self) -> usize {
        let mut len = 0;
        self.for_each(|name, value| len += name.len() + 1 + decimal_len(value) + 1);
        len
    }

    fn emit(&self, out: &mut [u8]) -> usize {
        let mut at = 0;
        self.for_each(|name, value| {
            at += put_str(&mut out[at..], name);
            let mut digits = [0u8; 20];
            let text = format_decimal(value, &mut digits);
            at += put_str(&mut out[at..], text);
        });
        at
    }
}

/// A TFTP message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repr<'a> {
    Rrq { filename: &'a str, mode: Mode, options: Options },
    Wrq { filename: &'a str, mode: Mode, options: Options },
    Data { block: u16, data: &'a [u8] },
    Ack { block: u16 },
    Error { code: ErrorCode, message: &'a str },
    Oack { options: Options },
}

impl<'a> Repr<'a> {
    /// Parses an untrusted packet.
    pub fn parse(packet: &Packet<&'a [u8]>) -> Result<Self> {
        let body: &'a [u8] = packet.buffer.get(field::BODY).unwrap_or_default();
        Ok(match packet.opcode()? {
            Opcode::Rrq | Opcode::Wrq => {
                let (filename, rest) = take_str(body)?;
                let (mode, rest) = take_str(rest)?;
                let (mode, options) = (Mode::parse(mode)?, Options::parse(rest)?);
                if packet.opcode()? == Opcode::Rrq {
                    Self::Rrq { filename, mode, options }
                } else {
                    Self::Wrq { filename, mode, options }
                }
            }
            Opcode::Data => Self::Data { block: packet.block()?, data: body.get(2..).unwrap_or_default() },
            Opcode::Ack => Self::Ack { block: packet.block()? },
            Opcode::Error => {
                let code = ErrorCode::from_u16(packet.block()?);
                // Some clients omit the NUL after the message; accept it. A message that is not
                // UTF-8 (another charset) is kept up to its first invalid byte: an ERROR ends the
                // transfer whatever it says, and read as malformed it would leave the server
                // retransmitting to a client that has gone.
                let text = body.get(2..).unwrap_or_default();
                let text = text.split(|&b| b == 0).next().unwrap_or_default();
                let valid = core::str::from_utf8(text).map_or_else(|e| text.get(..e.valid_up_to()).unwrap_or_default(), str::as_bytes);
                Self::Error { code, message: core::str::from_utf8(valid).unwrap_or_default() }
            }
            Opcode::Oack => Self::Oack { options: Options::parse(body)? },
        })
    }

    /// Bytes [`Self::emit`] writes.
    #[must_use]
    pub fn buffer_len(&self) -> usize {
        2 + match self {
            Self::Rrq { filename, mode, options } | Self::Wrq { filename, mode, options } => {
                filename.len() + 1 + mode.as_str().len() + 1 + options.buffer_len()
            }
            Self::Data { data, .. } => 2 + data.len(),
            Self::Ack { .. } => 2,
            Self::Error { message, .. } => 2 + message.len() + 1,
            Self::Oack { options } => options.buffer_len(),
        }
    }

    /// Writes the message into `out`, which must hold [`Self::buffer_len`] bytes; returns the
    /// length written, or `None` if `out` is too small or the message would be longer than
    /// [`MAX_PACKET`] (which [`Packet::parse`] refuses: an ERROR parsed without its NUL at the
    /// size limit grows by one byte when emitted).
    pub fn emit(&self, out: &mut [u8]) -> Option<usize> {
        let len = self.buffer_len();
        if len > MAX_PACKET {
            return None;
        }
        let out = out.get_mut(..len)?;
        let (opcode, rest) = out.split_at_mut(2);
        let code = match self {
            Self::Rrq { .. } => Opcode::Rrq,
            Self::Wrq { .. } => Opcode::Wrq,
            Self::Data { .. } => Opcode::Data,
            Self::Ack { .. } => Opcode::Ack,
            Self::Error { .. } => Opcode::Error,
            Self::Oack { .. } => Opcode::Oack,
        };
        opcode.copy_from_slice(&(code as u16).to_be_bytes());
        match self {
            Self::Rrq { filename, mode, options } | Self::Wrq { filename, mode, options } => {
                let mut at = put_str(rest, filename);
                at += put_str(&mut rest[at..], mode.as_str());
                options.emit(&mut rest[at..]);
            }
            Self::Data { block, data } => {
                rest[..2].copy_from_slice(&block.to_be_bytes());
                rest[2..].copy_from_slice(data);
            }
            Self::Ack { block } => rest.copy_from_slice(&block.to_be_bytes()),
            Self::Error { code, message } => {
                rest[..2].copy_from_slice(&(*code as u16).to_be_bytes());
                put_str(&mut rest[2..], message);
            }
            Self::Oack { options } => {
                options.emit(rest);
            }
        }
        Some(len)
    }
}

/// A read-only typed view of a TFTP packet in a buffer.
#[derive(Debug)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

mod field {
    use core::ops::{Range, RangeFrom};
    pub const OPCODE: Range<usize> = 0..2;
    pub const BLOCK: Range<usize> = 2..4;
    pub const BODY: RangeFrom<usize> = 2..;
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps untrusted bytes, checking the length every accessor relies on.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let len = buffer.as_ref().len();
        if len < field::OPCODE.end {
            return Err(Error::Truncated);
        }
        if len > MAX_PACKET {
            return Err(Error::TooLong);
        }
        Ok(Self { buffer })
    }

    pub fn opcode(&self) -> Result<Opcode> {
        let b = self.buffer.as_ref();
        Opcode::from_u16(u16::from_be_bytes([b[field::OPCODE.start], b[field::OPCODE.start + 1]]))
    }

    /// Block number of DATA and ACK, error code of ERROR.
    pub fn block(&self) -> Result<u16> {
        let b = self.buffer.as_ref().get(field::BLOCK).ok_or(Error::Truncated)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

}

impl<'a> Packet<&'a [u8]> {
    /// Parses in one step.
    pub fn parse(bytes: &'a [u8]) -> Result<Repr<'a>> {
        Repr::parse(&Packet::new_checked(bytes)?)
    }
}

/// Splits a NUL-terminated UTF-8 string off the front.
fn take_str(bytes: &[u8]) -> Result<(&str, &[u8])> {
    let end = bytes.iter().position(|&b| b == 0).ok_or(Error::Unterminated)?;
    let text = core::str::from_utf8(&bytes[..end]).map_err(|_| Error::NotUtf8)?;
    Ok((text, &bytes[end + 1..]))
}

fn put_str(out: &mut [u8], text: &str) -> usize {
    out[..text.len()].copy_from_slice(text.as_bytes());
    out[text.len()] = 0;
    text.len() + 1
}

fn decimal_len(mut value: u64) -> usize {
    let mut len = 1;
    while value >= 10 {
        value /= 10;
        len += 1;
    }
    len
}

fn format_decimal(mut value: u64, digits: &mut [u8; 20]) -> &str {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + u8::try_from(value % 10).unwrap_or(0);
        value /= 10;
        if value == 0 {
            break;
        }
    }
    core::str::from_utf8(&digits[at..]).unwrap_or("0")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn roundtrip(repr: &Repr<'_>) {
        let mut buf = vec![0u8; repr.buffer_len()];
        assert_eq!(repr.emit(&mut buf), Some(buf.len()));
        assert_eq!(Packet::parse(&buf).as_ref(), Ok(repr));
    }

    #[test]
    fn fixtures_parse() {
        let rrq = b"\x00\x01boot/pxe.0\x00OcTeT\x00blksize\x001468\x00tsize\x000\x00x-vendor\x00y\x00windowsize\x0016\x00";
        assert_eq!(
            Packet::parse(rrq),
            Ok(Repr::Rrq {
                filename: "boot/pxe.0",
                mode: Mode::Octet,
                options: Options { blksize: Some(1468), tsize: Some(0), windowsize: Some(16), timeout: None },
            })
        );
        assert_eq!(Packet::parse(b"\x00\x04\xff\xfe"), Ok(Repr::Ack { block: 0xfffe }));
        assert_eq!(Packet::parse(b"\x00\x03\x00\x01abc"), Ok(Repr::Data { block: 1, data: b"abc" }));
        assert_eq!(
            Packet::parse(b"\x00\x05\x00\x01nope\x00"),
            Ok(Repr::Error { code: ErrorCode::FileNotFound, message: "nope" })
        );
        assert_eq!(Packet::parse(b"\x00\x06blksize\x00512\x00"), Ok(Repr::Oack { options: Options { blksize: Some(512), ..Options::default() } }));
    }

    #[test]
    fn emitted_fixtures_match_the_rfc_layout() {
        let mut buf = [0u8; 64];
        let n = Repr::Ack { block: 258 }.emit(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"\x00\x04\x01\x02");
        let n = Repr::Oack { options: Options { tsize: Some(1_048_576), ..Options::default() } }.emit(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"\x00\x06tsize\x001048576\x00");
        assert_eq!(Repr::Ack { block: 1 }.emit(&mut buf[..3]), None, "too small a buffer is refused");
    }

    #[test]
    fn malformed_packets_are_errors() {
        for (bytes, error) in [
            (&b""[..], Error::Truncated),
            (b"\x00", Error::Truncated),
            (b"\x00\x09", Error::UnknownOpcode(9)),
            (b"\x00\x01file", Error::Unterminated),
            (b"\x00\x01file\x00octet", Error::Unterminated),
            (b"\x00\x01file\x00mail\x00", Error::BadMode),
            (b"\x00\x01file\x00octet\x00blksize\x00", Error::BadOption),
            (b"\x00\x01file\x00octet\x00blksize\x00big\x00", Error::BadOption),
            (b"\x00\x01fi\xffle\x00octet\x00", Error::NotUtf8),
            (b"\x00\x04\x00", Error::Truncated),
        ] {
            assert_eq!(Packet::parse(bytes), Err(error), "{bytes:?}");
        }
        assert_eq!(Packet::parse(&vec![0u8; MAX_PACKET + 1]), Err(Error::TooLong));
    }

    #[test]
    fn an_error_in_another_charset_is_still_an_error() {
        let latin1 = b"\x00\x05\x00\x08Abbruch durch Benutzer: \xfcbertragung\x00";
        assert_eq!(Packet::parse(latin1), Ok(Repr::Error { code: ErrorCode::OptionRefused, message: "Abbruch durch Benutzer: " }));
    }

    /// Found by fuzzing (fuzz/corpus replay): an ERROR of MAX_PACKET bytes without its NUL
    /// parses, but its emission would be one byte longer than any parser accepts.
    #[test]
    fn nothing_longer_than_max_packet_is_emitted() {
        let mut error = vec![b'e'; MAX_PACKET];
        error[..4].copy_from_slice(b"\x00\x05\x00\x01");
        let repr = Packet::parse(&error).expect("accepted without the NUL");
        assert_eq!(repr.buffer_len(), MAX_PACKET + 1);
        assert_eq!(repr.emit(&mut vec![0u8; MAX_PACKET + 1]), None);
        let largest = Repr::Data { block: 1, data: &error[4..] };
        assert_eq!(largest.emit(&mut vec![0u8; MAX_PACKET]), Some(MAX_PACKET));
    }

    fn options() -> impl Strategy<Value = Options> {
        (
            proptest::option::of(8u32..=65_464),
            proptest::option::of(1u32..=255),
            proptest::option::of(any::<u64>()),
            proptest::option::of(1u32..=65_535),
        )
            .prop_map(|(blksize, timeout, tsize, windowsize)| Options { blksize, timeout, tsize, windowsize })
    }

    proptest! {
        #[test]
        fn parse_inverts_emit_for_requests(name in "[a-zA-Z0-9/._-]{1,64}", netascii: bool, wrq: bool, options in options()) {
            let mode = if netascii { Mode::Netascii } else { Mode::Octet };
            let repr = if wrq { Repr::Wrq { filename: &name, mode, options } } else { Repr::Rrq { filename: &name, mode, options } };
            roundtrip(&repr);
        }

        #[test]
        fn parse_inverts_emit_for_the_rest(block: u16, data in proptest::collection::vec(any::<u8>(), 0..1500), message in "[ -~]{0,80}", options in options()) {
            roundtrip(&Repr::Data { block, data: &data });
            roundtrip(&Repr::Ack { block });
            roundtrip(&Repr::Error { code: ErrorCode::from_u16(block % 9), message: &message });
            roundtrip(&Repr::Oack { options });
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Packet::parse(&bytes);
        }
    }
}
