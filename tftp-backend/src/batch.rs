//! Several datagrams in one system call: one sendmsg(2) with UDP segmentation offload
//! (UDP_SEGMENT) where the kernel and device take it, else sendmmsg(2). On a connected socket
//! (standalone transfers) UDP_SEGMENT is always tried; to an explicit destination (`send_to`,
//! the steered backend's one socket toward its load balancers) only when asked for.
//!
//! In this VM a `send` costs ~1.5 µs, most of a windowed transfer's CPU; a window of 16 blocks
//! pays for the system call once, and with UDP_SEGMENT the stack below UDP sees one packet.
//!
//! Why asked for toward a load balancer: its XDP program must see every datagram on its own.
//! A real NIC (or the kernel, for a device without UDP segmentation, such as a veth with its
//! tx offloads off) cuts the super-packet before the wire; a veth with its offloads on passes
//! it on whole, one packet with one visible steering header where there are sixteen (lost on
//! the way or dropped by the balancer as `drop_oversize`, never forwarded).

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// Most segments per UDP_SEGMENT send (the kernel's UDP_MAX_SEGMENTS, 64 before 6.9).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes per UDP_SEGMENT send: one IPv6 datagram's payload.
const GSO_MAX_BYTES: usize = 65_527 - 40;

/// The arguments of sendmsg(2) and sendmmsg(2) for up to `capacity` datagrams, each gathered
/// from a header and a payload. Allocated once (per transfer); `send` points them at the
/// slices it is given, and the kernel reads them during that call only.
pub struct SendBatch {
    msgs: Vec<libc::mmsghdr>,
    /// Two per datagram, contiguous: one UDP_SEGMENT send gathers all of them.
    iovs: Vec<[libc::iovec; 2]>,
    /// The control message of a UDP_SEGMENT send (`u64`s for the alignment of a cmsghdr).
    control: [u64; 4],
    /// The destination of `send_to`, which every message names.
    name: libc::sockaddr_storage,
    /// Cleared for good the first time the kernel refuses UDP_SEGMENT.
    gso: bool,
    /// Whether `send_to` may use UDP_SEGMENT (see the module's documentation).
    gso_to: bool,
}

// SAFETY: the raw pointers inside are written by `send` from slices it borrows, read by the
// kernel during that one system call, and never dereferenced afterwards (they may dangle between
// calls). Nothing ties the struct to a thread.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub fn new(capacity: usize) -> Self {
        let msgs = (0..capacity)
            .map(|_| {
                // SAFETY: mmsghdr is plain C data (pointers, lengths, flags); all zeroes is a
                // valid value: no name, no iovecs, no control data.
                let mut msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
                msg.msg_hdr.msg_iovlen = 2;
                msg
            })
            .collect();
        let empty = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
        // SAFETY: sockaddr_storage is plain C data; all zeroes is a valid (unspecified) address.
        let name = unsafe { std::mem::zeroed() };
        Self { msgs, iovs: vec![[empty; 2]; capacity], control: [0; 4], name, gso: true, gso_to: false }
    }

    /// Lets (or stops) `send_to` send a uniform batch as one UDP_SEGMENT super-packet: only
    /// where every link to the destination segments it before anything reads the datagrams one
    /// by one.
    pub const fn segment_send_to(&mut self, on: bool) {
        self.gso_to = on;
    }

    /// Sends each `(header, payload)` as one datagram to `to` on the socket `fd` (connected or
    /// not), the first `capacity` of them at most: as one UDP_SEGMENT send when allowed by
    /// [`Self::segment_send_to`] and every datagram but the last is as long as the first,
    /// else with one sendmmsg. Returns how many the kernel took (at least one; the caller sends
    /// the rest again), or the error of the first one: `WouldBlock` when the send buffer is
    /// full. Never blocks.
    pub fn send_to<'a>(&mut self, fd: BorrowedFd<'_>, to: SocketAddr, datagrams: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> io::Result<usize> {
        let mut datagrams = datagrams.into_iter().peekable();
        let segment = datagrams.peek().map_or(0, |(header, payload)| header.len() + payload.len());
        let (count, bytes, uniform) = self.gather(segment, datagrams);
        if count == 0 {
            return Ok(0);
        }
        let len = write_sockaddr(to, &mut self.name);
        if self.gso_to
            && let Some(sent) = self.try_gso(fd, (count, bytes, uniform), segment, len)
        {
            return sent;
        }
        let name = (&raw mut self.name).cast::<libc::c_void>();
        for msg in self.msgs.iter_mut().take(count) {
            msg.msg_hdr.msg_name = name;
            msg.msg_hdr.msg_namelen = len;
        }
        self.send_mmsg(fd, count)
    }

    /// Points the iovecs at the datagrams, the first `capacity` of them at most. Returns their
    /// count, their total length, and whether all but the last are `segment` bytes long and
    /// the last at most that.
    fn gather<'a>(&mut self, segment: usize, datagrams: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> (usize, usize, bool) {
        let (mut count, mut bytes, mut uniform) = (0usize, 0usize, true);
        for (iov, (header, payload)) in self.iovs.iter_mut().zip(datagrams) {
            // The kernel only reads through these pointers for a send (`cast_mut` is for the C
            // signature).
            iov[0] = libc::iovec { iov_base: header.as_ptr().cast_mut().cast(), iov_len: header.len() };
            iov[1] = libc::iovec { iov_base: payload.as_ptr().cast_mut().cast(), iov_len: payload.len() };
            let len = header.len() + payload.len();
            // Only the last may be shorter: a short one before it ends uniformity.
            uniform &= bytes == count * segment && len <= segment;
            (count, bytes) = (count + 1, bytes + len);
        }
        (count, bytes, uniform)
    }

    /// Sends each `(header, payload)` as one datagram on the connected socket `fd`, the first
    /// `capacity` of them at most. Returns how many the kernel took (at least one; the caller
    /// sends the rest again), or the error of the first one: `WouldBlock` when the send buffer
    /// is full. Never blocks.
    ///
    /// When every datagram but the last is `segment` bytes long and the last at most that, they
    /// go as one UDP_SEGMENT send, all or nothing; if the kernel or the device refuses it (EIO
    /// without checksum offload before Linux 6.11, EMSGSIZE or EINVAL for a segment over the
    /// MTU, ...), this and every later call use sendmmsg instead.
    pub fn send<'a>(&mut self, fd: BorrowedFd<'_>, segment: usize, datagrams: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> io::Result<usize> {
        let (count, bytes, uniform) = self.gather(segment, datagrams);
        if count == 0 {
            return Ok(0);
        }
        if let Some(sent) = self.try_gso(fd, (count, bytes, uniform), segment, 0) {
            return sent;
        }
        for msg in self.msgs.iter_mut().take(count) {
            msg.msg_hdr.msg_name = std::ptr::null_mut();
            msg.msg_hdr.msg_namelen = 0;
        }
        self.send_mmsg(fd, count)
    }

    /// The gathered batch (`count` datagrams, `bytes` long, `uniform` as `gather` says) as one
    /// UDP_SEGMENT send, if it qualifies and the kernel takes it: `None` to send it with
    /// sendmmsg instead. If the kernel or the device refuses it (EIO without checksum offload
    /// before Linux 6.11, EMSGSIZE or EINVAL for a segment over the MTU, ...), every later call
    /// uses sendmmsg.
    fn try_gso(&mut self, fd: BorrowedFd<'_>, (count, bytes, uniform): (usize, usize, bool), segment: usize, namelen: libc::socklen_t) -> Option<io::Result<usize>> {
        if !(self.gso && uniform && count > 1 && count <= GSO_MAX_SEGMENTS && bytes <= GSO_MAX_BYTES) {
            return None;
        }
        match self.send_gso(fd, count, segment, namelen) {
            Ok(()) => Some(Ok(count)),
            Err(error) if matches!(error.raw_os_error(), Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP | libc::EMSGSIZE)) => {
                tracing::debug!(%error, "UDP_SEGMENT refused; sending with sendmmsg");
                self.gso = false;
                None
            }
            Err(error) => Some(Err(error)),
        }
    }

    /// One sendmsg of the first `count` iovec pairs, cut by the kernel into `segment`-byte
    /// datagrams; to `name` (its first `namelen` bytes) unless `namelen` is 0.
    fn send_gso(&mut self, fd: BorrowedFd<'_>, count: usize, segment: usize, namelen: libc::socklen_t) -> io::Result<()> {
        let segment = u16::try_from(segment).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // The data: one u16.
        let data_len: libc::c_uint = 2;
        // SAFETY: CMSG_SPACE and CMSG_LEN only compute sizes.
        let (space, len) = unsafe { (libc::CMSG_SPACE(data_len) as usize, libc::CMSG_LEN(data_len) as usize) };
        debug_assert!(space <= std::mem::size_of_val(&self.control));
        // SAFETY: msghdr is plain C data; all zeroes is a valid value (no name, no flags).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = self.iovs.as_mut_ptr().cast();
        msg.msg_iovlen = (2 * count) as _;
        if namelen > 0 {
            msg.msg_name = (&raw mut self.name).cast();
            msg.msg_namelen = namelen;
        }
        msg.msg_control = self.control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg` points at `control`, 8-byte aligned and at least CMSG_SPACE(2) bytes
        // long (`space`), so the first header is inside it and has room for its two bytes of
        // data; CMSG_DATA points just past that header.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
            (*cmsg).cmsg_len = len as _;
            libc::CMSG_DATA(cmsg).cast::<u16>().write_unaligned(segment);
        }
        // SAFETY: `fd` is an open socket for the duration of the borrow; `msg` points at the
        // control message above, at the first `2 * count` iovecs of `iovs` (`[iovec; 2]` is
        // two contiguous iovecs), filled by `gather` from slices alive for this call, and at no
        // name or `name` (`namelen` bytes of it written by `send_to`).
        let sent = unsafe { libc::sendmsg(fd.as_raw_fd(), &raw const msg, libc::MSG_DONTWAIT) };
        if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// One sendmmsg of the first `count` iovec pairs, a datagram each (a sendmsg when alone).
    fn send_mmsg(&mut self, fd: BorrowedFd<'_>, count: usize) -> io::Result<usize> {
        for (msg, iov) in self.msgs.iter_mut().zip(&mut self.iovs).take(count) {
            msg.msg_hdr.msg_iov = iov.as_mut_ptr();
            msg.msg_len = 0;
        }
        if count == 1 {
            // One datagram: sendmsg, without sendmmsg's vector of results to fill.
            // SAFETY: as below, for the first entry alone.
            let sent = unsafe { libc::sendmsg(fd.as_raw_fd(), &raw const self.msgs[0].msg_hdr, libc::MSG_DONTWAIT) };
            return if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(1) };
        }
        // More than the kernel takes at once (UIO_MAXIOV) is cut: it sends fewer.
        let vlen = libc::c_uint::try_from(count).unwrap_or(libc::c_uint::MAX);
        // SAFETY: `fd` is an open socket for the duration of the borrow. The first `count`
        // entries of `msgs` each point at two iovecs of `iovs`, which point at slices alive for
        // this call (filled by `gather`), and name no address or `name` (set by the caller,
        // `msg_namelen` bytes of it); the kernel writes only `msg_len` of those entries.
        let sent = unsafe { libc::sendmmsg(fd.as_raw_fd(), self.msgs.as_mut_ptr(), vlen, libc::MSG_DONTWAIT) };
        match sent {
            ..0 => Err(io::Error::last_os_error()),
            0 => Err(io::ErrorKind::WriteZero.into()),
            // Positive and at most `count`.
            n => Ok(n.unsigned_abs() as usize),
        }
    }
}

/// Writes `addr` as a C socket address into `storage`; returns its length.
#[expect(clippy::cast_possible_truncation, reason = "address families and sizes of C addresses are small constants")]
fn write_sockaddr(addr: SocketAddr, storage: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for every socket address.
            unsafe { (&raw mut *storage).cast::<libc::sockaddr_in>().write(sin) };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for every socket address.
            unsafe { (&raw mut *storage).cast::<libc::sockaddr_in6>().write(sin6) };
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::UdpSocket,
        os::fd::{AsFd as _, AsRawFd as _},
        time::Duration,
    };

    use super::SendBatch;

    fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (a, b)
    }

    /// Receives `expected` datagrams on `b` and compares them.
    fn expect(b: &UdpSocket, expected: &[Vec<u8>]) {
        let mut buf = [0u8; 2048];
        for datagram in expected {
            let len = b.recv(&mut buf).unwrap();
            assert_eq!(&buf[..len], &datagram[..]);
        }
    }

    /// DATA headers of blocks 1..=3.
    const HEADERS: [[u8; 4]; 3] = [[0, 3, 0, 1], [0, 3, 0, 2], [0, 3, 0, 3]];

    /// Blocks 1..=3 of 1468 bytes of `payload`, the last empty.
    fn blocks(payload: &[u8]) -> [&[u8]; 3] {
        [&payload[..1468], &payload[1468..2936], &payload[2936..2936]]
    }

    fn packets(parts: [&[u8]; 3]) -> Vec<Vec<u8>> {
        HEADERS.iter().zip(parts).map(|(h, p)| [&h[..], p].concat()).collect()
    }

    #[test]
    fn sends_each_header_and_payload_as_one_datagram_with_or_without_gso() {
        let (a, b) = pair();
        let payload: Vec<u8> = (0..3000u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let (headers, parts) = (HEADERS, blocks(&payload));
        let packets = packets(parts);
        for gso in [true, false] {
            let mut batch = SendBatch::new(4);
            batch.gso = gso;
            let sent = batch.send(a.as_fd(), 1472, headers.iter().map(|h| &h[..]).zip(parts)).unwrap();
            assert_eq!(sent, 3);
            expect(&b, &packets);
            assert_eq!(batch.gso, gso, "loopback takes UDP_SEGMENT");
        }
    }

    #[test]
    fn datagrams_of_other_sizes_go_one_by_one() {
        let (a, b) = pair();
        let payload: Vec<u8> = (0..3000u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let (headers, mut parts) = (HEADERS, blocks(&payload));
        // A short block before a full one, as no window has: not one UDP_SEGMENT send.
        parts.swap(0, 2);
        let packets = packets(parts);
        let mut batch = SendBatch::new(4);
        assert_eq!(batch.send(a.as_fd(), 1472, headers.iter().map(|h| &h[..]).zip(parts)).unwrap(), 3);
        expect(&b, &packets);
        // A segment size no datagram has.
        assert_eq!(batch.send(a.as_fd(), 100, headers.iter().map(|h| &h[..]).zip(parts)).unwrap(), 3);
        expect(&b, &packets);
    }

    #[test]
    fn a_lone_datagram_goes_on_a_connected_socket_and_to_a_destination() {
        let (a, b) = pair();
        let mut batch = SendBatch::new(4);
        let (header, block) = (HEADERS[0], [7u8; 512]);
        let packet = [&header[..], &block[..]].concat();
        assert_eq!(batch.send(a.as_fd(), 516, [(&header[..], &block[..])]).unwrap(), 1);
        expect(&b, std::slice::from_ref(&packet));
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(batch.send_to(c.as_fd(), b.local_addr().unwrap(), [(&header[..], &block[..])]).unwrap(), 1);
        let mut buf = [0u8; 1024];
        let (len, from) = b.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..len], from), (&packet[..], c.local_addr().unwrap()));
    }

    #[test]
    fn sends_to_a_destination_from_an_unconnected_socket_without_gso() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let payload: Vec<u8> = (0..3000u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let (headers, parts) = (HEADERS, blocks(&payload));
        let packets = packets(parts);
        let mut batch = SendBatch::new(4);
        let sent = batch.send_to(a.as_fd(), b.local_addr().unwrap(), headers.iter().map(|h| &h[..]).zip(parts)).unwrap();
        assert_eq!(sent, 3);
        let mut buf = [0u8; 8192];
        for packet in &packets {
            let (len, from) = b.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..len], from), (&packet[..], a.local_addr().unwrap()), "one datagram each, not a GSO super-packet");
        }
        // The same batch then sends on a connected socket (no stale destination).
        let (c, d) = pair();
        assert_eq!(batch.send(c.as_fd(), 1472, headers.iter().map(|h| &h[..]).zip(parts)).unwrap(), 3);
        expect(&d, &packets);
        // And to an IPv6 destination, where the host has one.
        if let (Ok(e), Ok(f)) = (UdpSocket::bind("[::1]:0"), UdpSocket::bind("[::1]:0")) {
            f.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert_eq!(batch.send_to(e.as_fd(), f.local_addr().unwrap(), headers.iter().map(|h| &h[..]).zip(parts)).unwrap(), 3);
            expect(&f, &packets);
        }
    }

    /// With UDP_GRO a receiving socket takes a loopback super-packet whole, so what arrives
    /// shows how the batch was sent.
    #[test]
    fn sends_to_a_destination_as_one_super_packet_only_when_asked() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let on: libc::c_int = 1;
        // SAFETY: `b` is an open socket; the option value is a c_int of the size given.
        let set = unsafe { libc::setsockopt(b.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO, (&raw const on).cast(), libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap()) };
        assert_eq!(set, 0, "UDP_GRO: {}", std::io::Error::last_os_error());
        let payload: Vec<u8> = (0..3000u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let (headers, parts) = (HEADERS, blocks(&payload));
        let packets = packets(parts);
        let mut buf = [0u8; 8192];
        let mut batch = SendBatch::new(4);
        batch.segment_send_to(true);
        assert_eq!(batch.send_to(a.as_fd(), b.local_addr().unwrap(), headers.iter().map(|h| &h[..]).zip(parts)).unwrap(), 3);
        let len = b.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], &packets.concat()[..], "one UDP_SEGMENT send of the three");
        let mut batch = SendBatch::new(4);
        assert_eq!(batch.send_to(a.as_fd(), b.local_addr().unwrap(), headers.iter().map(|h| &h[..]).zip(parts)).unwrap(), 3);
        expect(&b, &packets);
    }

    #[test]
    fn takes_at_most_its_capacity_and_nothing_from_nothing() {
        let (a, b) = pair();
        let headers: Vec<[u8; 4]> = (0..5u8).map(|i| [0, 3, 0, i]).collect();
        for gso in [true, false] {
            let mut batch = SendBatch::new(2);
            batch.gso = gso;
            assert_eq!(batch.send(a.as_fd(), 5, headers.iter().map(|h| (&h[..], &b"x"[..]))).unwrap(), 2);
            assert_eq!(batch.send(a.as_fd(), 5, headers[2..].iter().map(|h| (&h[..], &b"y"[..]))).unwrap(), 2);
            assert_eq!(batch.send(a.as_fd(), 5, std::iter::empty()).unwrap(), 0);
            expect(&b, &[vec![0, 3, 0, 0, b'x'], vec![0, 3, 0, 1, b'x'], vec![0, 3, 0, 2, b'y'], vec![0, 3, 0, 3, b'y']]);
        }
    }
}
