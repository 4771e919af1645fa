//! Option negotiation (RFC 2347, 2348, 2349, 7440), as pure logic. Invalid values are declined
//! (left out of the OACK, the default applies), values beyond this server's limits are lowered
//! to them, unknown options were already dropped by the parser.
//!
//! Boot firmware checks the OACK strictly, and these rules keep each of them booting (each a
//! test below that names the client):
//! - only options the client asked for are echoed: EDK2 rejects an OACK with any other
//!   (ERROR 4 "Malformatted OACK"), PXELINUX aborts on one; unknown options are never echoed;
//! - blksize and windowsize are only ever lowered: EDK2 rejects larger ones than asked, U-Boot
//!   a larger blksize;
//! - `timeout` is echoed exactly as asked, or declined (left out): EDK2 and U-Boot reject any
//!   other value;
//! - tsize of a read is the real size, also beyond 4 GiB (see [`negotiate`]);
//! - the block size fits the path MTU ([`Limits::fit_path_mtu`]): DATA never fragments.

use crate::wire::{DATA_HEADER_LEN, Options};

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

/// IPv4 and UDP headers and the TFTP DATA header: what a block adds on the wire.
pub const DATA_OVERHEAD: usize = 20 + 8 + DATA_HEADER_LEN;

impl Limits {
    /// The limits with the block size lowered so that a DATA datagram, with `encapsulation`
    /// bytes before its TFTP packet (the steering header when steered, else none), fits a path
    /// MTU of `mtu` bytes: a block must not make the datagram fragment (RFC 2348), and the load
    /// balancer cannot steer IP fragments at all. Never below RFC 2348's smallest block.
    #[must_use]
    pub fn fit_path_mtu(self, mtu: usize, encapsulation: usize) -> Self {
        let fits = mtu.saturating_sub(DATA_OVERHEAD + encapsulation);
        let smallest = u16::try_from(BLKSIZE_MIN).unwrap_or(8);
        let fits = u16::try_from(fits).unwrap_or(u16::MAX).max(smallest);
        Self { max_blksize: self.max_blksize.min(fits), ..self }
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
///
/// A read's tsize is its real size, in full, also beyond 4 GiB − 1. EDK2's MTFTP driver
/// parses it into 32 bits (`Mtftp4ParseOption`), but only keeps it and compares it with
/// nothing; the PXE base code that asked for it reads the OACK's text with
/// `AsciiStrDecimalToUint64` (`PxeBcMtftp4GetFileSize`) and sizes its buffer by it. Declining
/// tsize would fail its size probe (`EFI_NOT_FOUND`: the boot stops), and a value cut to 32
/// bits would size the buffer too small (the download ends in ERROR 3 at the cut). Loaders
/// with 32-bit sizes (PXELINUX, GRUB on i386) cannot hold such a file in memory anyway.
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
    use crate::wire::{Packet, Repr};

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

    /// What `request` (an RRQ's bytes) gets as its OACK from a server with `limits`, for a
    /// file of `size` bytes, as the bytes on the wire.
    fn oack_for(request: &[u8], limits: Limits, size: u64) -> Vec<u8> {
        let Ok(Repr::Rrq { options, .. }) = Packet::parse(request) else { panic!("not an RRQ") };
        let n = negotiate(&options, limits, Some(size));
        let mut out = [0u8; 512];
        let len = Repr::Oack { options: n.oack }.emit(&mut out).unwrap();
        out[..len].to_vec()
    }

    /// PXELINUX aborts on any option it did not ask for, EDK2 rejects the OACK: each gets back
    /// exactly its own options, and an option this server does not know (here `multicast`, which
    /// EDK2 may ask, and a vendor's) is never echoed.
    #[test]
    fn pxelinux_and_edk2_get_back_only_the_options_they_asked_for() {
        let pxelinux = b"\x00\x01pxelinux.0\x00octet\x00tsize\x000\x00blksize\x001408\x00";
        assert_eq!(oack_for(pxelinux, Limits::default(), 42_000), b"\x00\x06blksize\x001408\x00tsize\x0042000\x00");
        let edk2_probe = b"\x00\x01grubx64.efi\x00octet\x00tsize\x000\x00blksize\x001468\x00windowsize\x004\x00";
        assert_eq!(oack_for(edk2_probe, Limits::default(), 9), b"\x00\x06blksize\x001468\x00tsize\x009\x00windowsize\x004\x00");
        let edk2_read = b"\x00\x01grubx64.efi\x00octet\x00blksize\x001468\x00windowsize\x004\x00";
        assert_eq!(oack_for(edk2_read, Limits::default(), 9), b"\x00\x06blksize\x001468\x00windowsize\x004\x00", "no tsize when not asked");
        let unknown = b"\x00\x01f\x00octet\x00multicast\x00\x00x-vendor\x001\x00";
        assert_eq!(oack_for(unknown, Limits::default(), 9), b"\x00\x06", "nothing to acknowledge: no option at all");
        let n = negotiate(&Options::default(), Limits::default(), Some(9));
        assert!(n.oack.is_empty(), "and then no OACK is sent (DATA 1 first)");
    }

    /// EDK2 rejects an OACK with a blksize or windowsize above what it asked, U-Boot one with
    /// a larger blksize: whatever the limits, a granted value is at most the one asked.
    #[test]
    fn edk2_and_uboot_never_get_more_blksize_or_windowsize_than_asked() {
        let uboot = Options { blksize: Some(1468), timeout: Some(5), ..Options::default() };
        let roomy = Limits { max_blksize: 65_464, max_windowsize: 1024 };
        assert_eq!(negotiate(&uboot, roomy, Some(1)).oack.blksize, Some(1468), "not raised to the limit");
        let edk2 = Options { blksize: Some(1468), windowsize: Some(4), tsize: Some(0), ..Options::default() };
        let n = negotiate(&edk2, roomy, Some(1));
        assert_eq!((n.oack.blksize, n.oack.windowsize, n.windowsize), (Some(1468), Some(4), 4));
        let big_board = Options { blksize: Some(16_352), ..Options::default() };
        assert_eq!(negotiate(&big_board, Limits::default(), Some(1)).oack.blksize, Some(1468), "lowered to the limit");
    }

    /// EDK2 and U-Boot (which asks `timeout 5`) reject an OACK whose timeout differs from the
    /// one asked: it is echoed exactly, or declined when outside RFC 2349's 1 to 255 seconds.
    #[test]
    fn uboot_and_edk2_get_their_timeout_echoed_exactly() {
        let uboot = Options { blksize: Some(1468), timeout: Some(5), ..Options::default() };
        let n = negotiate(&uboot, Limits::default(), Some(1));
        assert_eq!((n.oack.timeout, n.timeout), (Some(5), Some(5)));
        for declined in [0, 256, 100_000] {
            let n = negotiate(&Options { timeout: Some(declined), ..Options::default() }, Limits::default(), Some(1));
            assert_eq!((n.oack.timeout, n.timeout), (None, None), "timeout {declined}: left out, never replaced");
        }
    }

    /// EDK2 sizes its buffer by the tsize of its probe, read as 64 bits by the PXE base code:
    /// a file beyond 4 GiB − 1 gets its real size, never declined or cut to 32 bits.
    #[test]
    fn edk2_gets_the_real_tsize_of_a_file_beyond_4_gib() {
        let probe = b"\x00\x01big.img\x00octet\x00tsize\x000\x00blksize\x001468\x00";
        let size = 5 << 30;
        assert_eq!(oack_for(probe, Limits::default(), size), b"\x00\x06blksize\x001468\x00tsize\x005368709120\x00");
        assert_eq!(oack_for(probe, Limits::default(), u64::from(u32::MAX)), b"\x00\x06blksize\x001468\x00tsize\x004294967295\x00");
    }

    /// No DATA is ever fragmented: the balancer cannot steer fragments, and iPXE or U-Boot on
    /// a 1500-byte link ask blocks that only fit without the steering header.
    #[test]
    fn blocks_fit_the_path_mtu_with_the_steering_header() {
        let limits = Limits::default();
        assert_eq!(limits.fit_path_mtu(1500, 0).max_blksize, 1468, "standalone on Ethernet: 1500 - 32");
        assert_eq!(limits.fit_path_mtu(1500, 64).max_blksize, 1404, "steered: 64 bytes less");
        assert_eq!(limits.fit_path_mtu(1600, 64).max_blksize, 1468, "a larger MTU never raises the limit");
        assert_eq!(limits.fit_path_mtu(60, 64).max_blksize, 8, "never below RFC 2348's smallest block");
        let ipxe = Options { blksize: Some(1432), tsize: Some(0), ..Options::default() };
        assert_eq!(negotiate(&ipxe, limits.fit_path_mtu(1500, 64), Some(1)).oack.blksize, Some(1404));
    }

    proptest::proptest! {
        /// The rules above for any request and any limits: nothing echoed that was not asked,
        /// nothing granted above what was asked, a timeout echoed as asked or not at all.
        #[test]
        fn an_oack_never_exceeds_the_request(
            blksize in proptest::option::of(0u32..=70_000),
            windowsize in proptest::option::of(0u32..=70_000),
            timeout in proptest::option::of(0u32..=300),
            tsize in proptest::option::of(proptest::prelude::any::<u64>()),
            max_blksize in 8u16..=65_464,
            max_windowsize in 1u16..=u16::MAX,
            size in proptest::prelude::any::<u64>(),
        ) {
            let asked = Options { blksize, timeout, tsize, windowsize };
            let n = negotiate(&asked, Limits { max_blksize, max_windowsize }, Some(size));
            let o = n.oack;
            proptest::prop_assert!(o.blksize.is_none() || asked.blksize.is_some());
            proptest::prop_assert!(o.windowsize.is_none() || asked.windowsize.is_some());
            proptest::prop_assert!(o.timeout.is_none() || o.timeout == asked.timeout);
            proptest::prop_assert!(o.tsize.is_none() || o.tsize == Some(size) && asked.tsize.is_some());
            proptest::prop_assert!(o.blksize.zip(asked.blksize).is_none_or(|(granted, wanted)| granted <= wanted && granted <= u32::from(max_blksize)));
            proptest::prop_assert!(o.windowsize.zip(asked.windowsize).is_none_or(|(granted, wanted)| granted <= wanted));
            proptest::prop_assert_eq!(u32::from(n.blksize), o.blksize.unwrap_or(512));
            proptest::prop_assert_eq!(u32::from(n.windowsize), o.windowsize.unwrap_or(1));
        }
    }

    #[test]
    fn a_write_echoes_the_clients_tsize() {
        let n = negotiate(&Options { tsize: Some(777), ..Options::default() }, Limits::default(), None);
        assert_eq!(n.oack.tsize, Some(777));
    }
}
