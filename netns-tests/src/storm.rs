//! Clients that misbehave, for the failure detector's tests: a lock-step download that, at one
//! block, sends a storm of packets that ask for nothing (a broken or hostile client), and a
//! flood of requests from spoofed addresses. They send only to the addresses given, which the
//! tests take from namespaces they created; they run in the caller's network namespace (use
//! [`crate::Netns::enter`]).

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use crate::{Error, Result, io_error};

const OPCODE_RRQ: u16 = 1;
const OPCODE_DATA: u16 = 3;
const OPCODE_ACK: u16 = 4;
const OPCODE_ERROR: u16 = 5;
const OPCODE_OACK: u16 = 6;

/// What the client sends, over and over, once it has acknowledged the storm's block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storm {
    /// Copies of the ACK it just sent.
    DuplicateAck,
    /// ACK 0, long after the transfer began.
    StaleAck,
    /// ACKs of a block beyond the end of the file.
    BeyondEnd,
    /// ACKs of blocks the server has not sent yet.
    NeverSent,
    /// ERRORs to another transfer's port on the server (its TID), not to its own.
    ErrorsTo(u16),
}

/// A storm: which packets, after which block, how many, how far apart.
#[derive(Clone, Copy, Debug)]
pub struct StormPlan {
    pub storm: Storm,
    pub at_block: u32,
    pub copies: u32,
    pub spacing: Duration,
}

/// A finished download and how its storm went.
#[derive(Debug)]
pub struct StormReport {
    pub data: Vec<u8>,
    /// How long sending the storm took (its packets were `spacing` apart at best).
    pub storm_took: Duration,
}

fn packet(opcode: u16, rest: &[u8]) -> Vec<u8> {
    [&opcode.to_be_bytes()[..], rest].concat()
}

fn ack(block: u16) -> Vec<u8> {
    packet(OPCODE_ACK, &block.to_be_bytes())
}

/// Downloads `file` (octet, lock-step, `blksize`) from `server:69`, retransmitting its last
/// packet after a second of silence as stock clients do, and sends `plan`'s storm once it has
/// acknowledged block `plan.at_block`; then finishes the download as usual.
pub fn lock_step_download(server: Ipv4Addr, file: &str, blksize: u16, plan: &StormPlan, timeout: Duration) -> Result<StormReport> {
    let what = |w: &str| format!("{w} ({file} from {server})");
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(io_error("client socket"))?;
    socket.set_read_timeout(Some(Duration::from_secs(1))).map_err(io_error("client socket"))?;
    let mut request = Vec::new();
    for field in [file, "octet", "blksize", &blksize.to_string()] {
        request.extend_from_slice(field.as_bytes());
        request.push(0);
    }
    let mut last_sent = packet(OPCODE_RRQ, &request);
    let mut to = SocketAddr::from((server, 69));
    socket.send_to(&last_sent, to).map_err(io_error(what("request")))?;
    let (mut tid, mut data, mut next, mut storm_took) = (None::<SocketAddr>, Vec::new(), 1u32, Duration::ZERO);
    let started = Instant::now();
    let mut buf = vec![0u8; usize::from(blksize) + 4];
    loop {
        if started.elapsed() > timeout {
            return Err(Error::Timeout { what: what("a lock-step download"), seconds: timeout.as_secs() });
        }
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(received) => received,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                socket.send_to(&last_sent, to).map_err(io_error(what("retransmission")))?;
                continue;
            }
            Err(e) => return Err(io_error(what("receive"))(e)),
        };
        // The first reply names the transfer's port; anything from elsewhere is not ours.
        if *tid.get_or_insert(from) != from || n < 4 {
            continue;
        }
        to = from;
        let opcode = u16::from_be_bytes([buf[0], buf[1]]);
        let block = u16::from_be_bytes([buf[2], buf[3]]);
        let acked = match opcode {
            OPCODE_OACK if next == 1 => 0,
            OPCODE_DATA if block == (next & 0xffff) as u16 => {
                data.extend_from_slice(&buf[4..n]);
                next += 1;
                next - 1
            }
            // A duplicate (our ACK was lost or late): acknowledge it again.
            OPCODE_DATA => next - 1,
            OPCODE_ERROR => {
                let message = String::from_utf8_lossy(&buf[4..n]).trim_end_matches('\0').to_owned();
                return Err(io_error(what("download"))(std::io::Error::other(format!("ERROR {block}: {message}"))));
            }
            _ => continue,
        };
        last_sent = ack((acked & 0xffff) as u16);
        socket.send_to(&last_sent, to).map_err(io_error(what("ACK")))?;
        if opcode == OPCODE_DATA && n - 4 < usize::from(blksize) && acked + 1 == next {
            return Ok(StormReport { data, storm_took });
        }
        if acked == plan.at_block && opcode == OPCODE_DATA && block == (acked & 0xffff) as u16 {
            storm_took = storm(&socket, server, to, &last_sent, acked, plan)?;
        }
    }
}

/// Sends the storm's packets; returns how long it took.
fn storm(socket: &UdpSocket, server: Ipv4Addr, tid: SocketAddr, last_ack: &[u8], acked: u32, plan: &StormPlan) -> Result<Duration> {
    let started = Instant::now();
    let (datagram, to) = match plan.storm {
        Storm::DuplicateAck => (last_ack.to_vec(), tid),
        Storm::StaleAck => (ack(0), tid),
        Storm::BeyondEnd => (ack(0xfff0), tid),
        Storm::NeverSent => (ack(((acked + 100) & 0xffff) as u16), tid),
        Storm::ErrorsTo(port) => (packet(OPCODE_ERROR, b"\x00\x00not yours\x00"), SocketAddr::from((server, port))),
    };
    for _ in 0..plan.copies {
        socket.send_to(&datagram, to).map_err(io_error("storm"))?;
        std::thread::sleep(plan.spacing);
    }
    Ok(started.elapsed())
}

/// Sends `count` RRQs for `file` to `vip:69` within about `within`, from `sources` spoofed
/// addresses starting at `first_source` (consecutive), each with its own source ports. Raw
/// IPv4 (IP_HDRINCL): the replies go to hosts that do not exist. Returns how many were sent.
pub fn spoofed_requests(vip: Ipv4Addr, file: &str, first_source: Ipv4Addr, sources: u32, count: u32, within: Duration) -> Result<u32> {
    // SAFETY: plain socket(2); the descriptor is owned by `raw` below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io_error("raw socket (needs root)")(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let raw = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut payload = OPCODE_RRQ.to_be_bytes().to_vec();
    for field in [file, "octet"] {
        payload.extend_from_slice(field.as_bytes());
        payload.push(0);
    }
    let started = Instant::now();
    let per_burst = 100;
    for i in 0..count {
        let source = Ipv4Addr::from(u32::from(first_source) + i % sources.max(1));
        let port = 1024 + u16::try_from(i / sources.max(1) % 60_000).unwrap_or(0);
        let frame = ipv4_udp(source, port, vip, 69, &payload);
        let to = libc::sockaddr_in {
            sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2),
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from(vip).to_be() },
            sin_zero: [0; 8],
        };
        // SAFETY: sendto with a valid buffer and a sockaddr_in of the right length.
        let sent = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&raw),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const to).cast(),
                u32::try_from(size_of::<libc::sockaddr_in>()).unwrap_or(16),
            )
        };
        if sent < 0 {
            return Err(io_error("spoofed request")(std::io::Error::last_os_error()));
        }
        // Spread over `within`: a burst, then a pause until the burst's share of time is up.
        if (i + 1) % per_burst == 0 {
            let due = within.mul_f64(f64::from(i + 1) / f64::from(count.max(1)));
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok(count)
}

/// An IPv4 header (no options) and a UDP header with both checksums, then `payload`.
fn ipv4_udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = u16::try_from(8 + payload.len()).unwrap_or(u16::MAX);
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&(udp_len + 20).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let ip_check = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&ip_check.to_be_bytes());
    let mut udp = Vec::with_capacity(8 + payload.len());
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let pseudo = [&src.octets()[..], &dst.octets(), &[0, 17], &udp_len.to_be_bytes()].concat();
    let udp_check = match checksum(&[&pseudo, &udp]) {
        0 => 0xffff,
        sum => sum,
    };
    udp[6..8].copy_from_slice(&udp_check.to_be_bytes());
    [ip, udp].concat()
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts` (each of even length,
/// but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u32 = bytes.chunks(2).map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spoofed_datagram_has_valid_checksums() {
        let frame = ipv4_udp(Ipv4Addr::new(10, 79, 0, 1), 1024, Ipv4Addr::new(10, 77, 9, 100), 69, b"\x00\x01f\x00octet\x00");
        assert_eq!(checksum(&[&frame[..20]]), 0, "IPv4 header sums to zero with its checksum");
        let udp = &frame[20..];
        let pseudo = [&frame[12..20], &[0, 17], &udp[4..6]].concat();
        assert_eq!(checksum(&[&pseudo, udp]), 0, "UDP with its pseudo-header sums to zero");
        assert_eq!(u16::from_be_bytes([frame[2], frame[3]]) as usize, frame.len());
    }
}
