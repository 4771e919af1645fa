//! Option negotiation (RFC 2347, 2348, 2349, 7440), as pure logic. Invalid values are declined
//! (left out of the OACK, the default applies), values beyond this server's limits are lowered
//! to them, unknown options were already dropped by the parser.

use crate::wire::Options;

/// Smallest and largest block sizes RFC 2348 allows.
pub const BLKSIZE_MIN: u32 = 8;
pub const BLKSIZE_MAX: u32 = 65_464;
/// Block size without options (RFC 1350).
pub const DEFAULT_BLKSIZE: u16 = 512;

/// What this server accepts at most.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest block size offered (a UDP datagram must fit the path MTU: 1468 for 1500).
    pub max_blksize: u16,
    /// Largest window (RFC 7440) accepted.
    pub max_windowsize: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_blksize: 1468, max_windowsize: 64 }
    }
}

/// The outcome: what the transfer uses, and what the OACK acknowledges (empty: no OACK).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    pub windowsize: u16,
    /// Retransmission timeout in seconds asked for by the client (None: server default).
    pub timeout: Option<u8>,
    pub oack: Options,
}

/// Negotiates a request's options. `size` is the file's size for a read (answered in tsize),
/// `None` for a write (the client's tsize is echoed).
#[must_use]
pub fn negotiate(requested: &Options, limits: Limits, size: Option<u64>) -> Negotiated {
    let mut oack = Options::default();
    let blksize = match requested.blksize {
        Some(b) if (BLKSIZE_MIN..=BLKSIZE_MAX).contains(&b) => {
            let chosen = b.min(u32::from(limits.max_blksize)).max(BLKSIZE_MIN);
            oack.blksize = Some(chosen);
            u16::try_from(chosen).unwrap_or(DEFAULT_BLKSIZE)
        }
        _ => DEFAULT_BLKSIZE,
    };
    let windowsize = match requested.windowsize {
        Some(w) if (1..=65_535).contains(&w) => {
            let chosen = w.min(u32::from(limits.max_windowsize.max(1)));
            oack.windowsize = Some(chosen);
            u16::try_from(chosen).unwrap_or(1)
        }
        _ => 1,
    };
    let timeout = match requested.timeout {
        Some(t @ 1..=255) => {
            oack.timeout = Some(t);
            u8::try_from(t).ok()
        }
        _ => None,
    };
    if let Some(t) = requested.tsize {
        oack.tsize = Some(size.unwrap_or(t));
    }
    Negotiated { blksize, windowsize, timeout, oack }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_options_means_no_oack_and_rfc1350_defaults() {
        let n = negotiate(&Options::default(), Limits::default(), Some(100));
        assert_eq!((n.blksize, n.windowsize, n.timeout), (512, 1, None));
        assert!(n.oack.is_empty());
    }

    #[test]
    fn values_are_accepted_clamped_or_declined() {
        let asked = Options { blksize: Some(9000), windowsize: Some(1000), timeout: Some(3), tsize: Some(0) };
        let n = negotiate(&asked, Limits::default(), Some(123_456));
        assert_eq!((n.blksize, n.windowsize, n.timeout), (1468, 64, Some(3)));
        assert_eq!(n.oack, Options { blksize: Some(1468), windowsize: Some(64), timeout: Some(3), tsize: Some(123_456) });

        let invalid = Options { blksize: Some(7), windowsize: Some(0), timeout: Some(0), tsize: None };
        let n = negotiate(&invalid, Limits::default(), Some(1));
        assert_eq!((n.blksize, n.windowsize, n.timeout), (512, 1, None));
        assert!(n.oack.is_empty(), "invalid values are declined, not acknowledged");
    }

    #[test]
    fn a_write_echoes_the_clients_tsize() {
        let n = negotiate(&Options { tsize: Some(777), ..Options::default() }, Limits::default(), None);
        assert_eq!(n.oack.tsize, Some(777));
    }
}
