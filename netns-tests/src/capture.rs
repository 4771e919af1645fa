//! A machine's TFTP as its own card saw it: the packets between the machine and the VIP in a
//! pcap (what QEMU's `filter-dump` writes, [`crate::boot::Machine::start_capturing`]), read
//! with `pcap-file` and `etherparse`. What the firmware received is what counts for its
//! timings and for the ERRORs it reacts to, not what the balancers or backends think they sent.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path, time::Duration};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use pcap_file::pcap::PcapReader;

use crate::{Error, Result, io_error};

/// What may stand before the Ethernet header of a captured frame: nothing, or a virtio-net
/// header.
const VNET_HEADER_LENGTHS: [usize; 3] = [0, 10, 12];

/// A TFTP packet's meaning (RFC 1350, RFC 2347).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tftp {
    /// A read or write request for a file.
    Request { file: String },
    Data { block: u16 },
    Ack { block: u16 },
    Error { code: u16, message: String },
    Oack,
    /// Too short, or an opcode TFTP does not have.
    Other,
}

impl Tftp {
    #[must_use]
    pub fn parse(payload: &[u8]) -> Self {
        let Some((opcode, rest)) = payload.split_first_chunk::<2>().map(|(op, rest)| (u16::from_be_bytes(*op), rest)) else {
            return Self::Other;
        };
        let word = || rest.first_chunk::<2>().map(|w| u16::from_be_bytes(*w));
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
        match opcode {
            1 | 2 => Self::Request { file: text(rest) },
            3 => word().map_or(Self::Other, |block| Self::Data { block }),
            4 => word().map_or(Self::Other, |block| Self::Ack { block }),
            5 => word().map_or(Self::Other, |code| Self::Error { code, message: text(&rest[2..]) }),
            6 => Self::Oack,
            _ => Self::Other,
        }
    }
}

/// One TFTP packet on the machine's wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Since the capture's first packet.
    pub at: Duration,
    /// Sent by the machine (to the VIP), or received by it.
    pub from_client: bool,
    /// The machine's UDP port: one per transfer.
    pub client_port: u16,
    pub tftp: Tftp,
}

/// Every TFTP packet between a machine and the server's address, in the capture's order.
#[derive(Clone, Debug, Default)]
pub struct Capture {
    pub packets: Vec<Packet>,
}

/// One file's download as the machine saw it, over all its requests (a client that restarts a
/// download asks again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub requests: usize,
    /// The first and the last DATA the machine received for the file, since the capture began.
    pub first_data: Duration,
    pub last_data: Duration,
    /// The longest time from the first request to the last DATA with nothing from the server
    /// for this file: what the firmware waited at worst.
    pub longest_gap: Duration,
}

impl Transfer {
    /// First to last block.
    #[must_use]
    pub fn duration(&self) -> Duration {
        self.last_data.saturating_sub(self.first_data)
    }
}

impl Capture {
    pub fn read(path: &Path, server: Ipv4Addr) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(io_error(format!("read {}", path.display())))?;
        Self::parse(&bytes, server).map_err(|e| match e {
            Error::Io { what, source } => Error::Io { what: format!("{}: {what}", path.display()), source },
            other => other,
        })
    }

    /// The TFTP packets of a pcap of Ethernet frames. A capture cut short (the machine's QEMU
    /// stopped while it wrote) keeps the packets before the cut.
    pub fn parse(pcap: &[u8], server: Ipv4Addr) -> Result<Self> {
        let mut reader = PcapReader::new(pcap).map_err(|e| io_error("not a pcap")(std::io::Error::other(e.to_string())))?;
        let (mut packets, mut start) = (Vec::new(), None);
        while let Some(Ok(frame)) = reader.next_packet() {
            let start = *start.get_or_insert(frame.timestamp);
            // QEMU's filter-dump keeps the virtio-net header (10 bytes, 12 with mergeable
            // receive buffers) in front of a virtio card's frames; an e1000's come bare.
            let Some((from_client, client_port, tftp)) = VNET_HEADER_LENGTHS.iter().find_map(|&skip| Self::udp_with(frame.data.get(skip..)?, server)) else {
                continue;
            };
            packets.push(Packet { at: frame.timestamp.saturating_sub(start), from_client, client_port, tftp });
        }
        Ok(Self { packets })
    }

    /// An Ethernet frame's UDP datagram to or from `server`: (sent by the client, the client's
    /// port, the TFTP in it).
    fn udp_with(frame: &[u8], server: Ipv4Addr) -> Option<(bool, u16, Tftp)> {
        let sliced = SlicedPacket::from_ethernet(frame).ok()?;
        let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(udp))) = (&sliced.net, &sliced.transport) else { return None };
        let (source, destination) = (ip.header().source_addr(), ip.header().destination_addr());
        let (from_client, client_port) = if destination == server {
            (true, udp.source_port())
        } else if source == server {
            (false, udp.destination_port())
        } else {
            return None;
        };
        Some((from_client, client_port, Tftp::parse(udp.payload())))
    }

    /// ERROR packets by (sent by the machine, code, the file its port had asked for: empty if
    /// none), with how many of each.
    #[must_use]
    pub fn errors(&self) -> BTreeMap<(bool, u16, String), usize> {
        let (mut errors, mut port_file) = (BTreeMap::new(), BTreeMap::new());
        for packet in &self.packets {
            match &packet.tftp {
                Tftp::Request { file } if packet.from_client => {
                    port_file.insert(packet.client_port, file.trim_start_matches('/').to_owned());
                }
                Tftp::Error { code, .. } => {
                    let file = port_file.get(&packet.client_port).cloned().unwrap_or_default();
                    *errors.entry((packet.from_client, *code, file)).or_default() += 1;
                }
                _ => {}
            }
        }
        errors
    }

    /// `file`'s download: the packets on each client port from its request for `file` to that
    /// port's next request. `None` if no DATA of it arrived.
    #[must_use]
    pub fn transfer(&self, file: &str) -> Option<Transfer> {
        let mut port_file: BTreeMap<u16, bool> = BTreeMap::new();
        let (mut requests, mut first_request, mut first_data, mut last_data) = (0, None, None, None);
        let (mut last_heard, mut longest_gap) = (None::<Duration>, Duration::ZERO);
        for packet in &self.packets {
            if packet.from_client
                && let Tftp::Request { file: asked } = &packet.tftp
            {
                let ours = asked.trim_start_matches('/') == file;
                port_file.insert(packet.client_port, ours);
                if ours {
                    requests += 1;
                    first_request.get_or_insert(packet.at);
                    last_heard.get_or_insert(packet.at);
                }
                continue;
            }
            if packet.from_client || !port_file.get(&packet.client_port).copied().unwrap_or(false) {
                continue;
            }
            if let Some(heard) = last_heard {
                longest_gap = longest_gap.max(packet.at.saturating_sub(heard));
            }
            last_heard = Some(packet.at);
            if matches!(packet.tftp, Tftp::Data { .. }) {
                first_data.get_or_insert(packet.at);
                last_data = Some(packet.at);
            }
        }
        Some(Transfer { requests, first_data: first_data?, last_data: last_data?, longest_gap })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 100);

    /// A pcap of UDP frames: (ms since the start, from the client, client port, TFTP payload).
    fn pcap(frames: &[(u64, bool, u16, Vec<u8>)]) -> Vec<u8> {
        pcap_behind(frames, 0)
    }

    /// The same, each frame behind `header` bytes of zeros (a virtio-net header).
    fn pcap_behind(frames: &[(u64, bool, u16, Vec<u8>)], header: usize) -> Vec<u8> {
        let mut writer = pcap_file::pcap::PcapWriter::new(Vec::new()).expect("pcap header");
        for (ms, from_client, port, payload) in frames {
            let (src, dst, sport, dport) = if *from_client { (CLIENT, SERVER, *port, 69) } else { (SERVER, CLIENT, 40000, *port) };
            let builder = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src.octets(), dst.octets(), 64).udp(sport, dport);
            let mut frame = vec![0; header];
            builder.write(&mut frame, payload).expect("frame");
            let at = Duration::from_secs(1_700_000_000) + Duration::from_millis(*ms);
            writer.write_packet(&pcap_file::pcap::PcapPacket::new(at, u32::try_from(frame.len()).expect("small"), &frame)).expect("frame written");
        }
        writer.into_writer()
    }

    fn rrq(file: &str) -> Vec<u8> {
        [&[0, 1][..], file.as_bytes(), b"\0octet\0tsize\0\x30\0"].concat()
    }
    fn data(block: u16) -> Vec<u8> {
        [&[0, 3][..], &block.to_be_bytes(), &[0xaa; 16]].concat()
    }
    fn error(code: u16, message: &str) -> Vec<u8> {
        [&[0, 5][..], &code.to_be_bytes(), message.as_bytes(), b"\0"].concat()
    }

    #[test]
    fn edk2s_probe_abort_is_an_error_8_from_the_client() {
        let frames = [
            (0, true, 1001, rrq("grubx64.efi")),
            (5, false, 1001, vec![0, 6, b't', b's', b'i', b'z', b'e', 0, b'9', 0]),
            (6, true, 1001, error(8, "User aborted the transfer")),
            (10, true, 1002, rrq("grubx64.efi")),
            (12, false, 1002, data(1)),
        ];
        let capture = Capture::parse(&pcap(&frames), SERVER).expect("parsed");
        assert_eq!(capture.packets.len(), 5);
        assert_eq!(capture.packets[2].tftp, Tftp::Error { code: 8, message: "User aborted the transfer".into() });
        assert_eq!(capture.errors(), BTreeMap::from([((true, 8, "grubx64.efi".to_owned()), 1)]), "one abort, sent by the client");
    }

    #[test]
    fn a_files_transfer_runs_from_its_first_to_its_last_data_and_its_longest_gap_counts_from_the_request() {
        let frames = [
            (0, true, 2000, rrq("boot.ipxe")),
            (3, false, 2000, data(1)),
            (10, true, 2001, rrq("vmlinuz")),
            (30, false, 2001, data(1)),
            (31, true, 2001, vec![0, 4, 0, 1]),
            (32, false, 2001, data(2)),
            // Another file's packets in between do not count.
            (40, true, 2002, rrq("initrd.img")),
            (41, false, 2002, data(1)),
            (182, false, 2001, data(3)),
            (190, false, 2001, data(4)),
        ];
        let capture = Capture::parse(&pcap(&frames), SERVER).expect("parsed");
        let kernel = capture.transfer("vmlinuz").expect("the kernel's DATA");
        assert_eq!((kernel.requests, kernel.first_data, kernel.last_data), (1, Duration::from_millis(30), Duration::from_millis(190)));
        assert_eq!(kernel.duration(), Duration::from_millis(160));
        assert_eq!(kernel.longest_gap, Duration::from_millis(150), "DATA 2 to DATA 3, the other file's DATA aside");
        assert!(capture.errors().is_empty());
        assert_eq!(capture.transfer("grub.cfg"), None, "never asked");
    }

    #[test]
    fn a_virtio_cards_frames_are_read_behind_their_virtio_net_header() {
        let frames = [(0, true, 1001, rrq("vmlinuz-arm64")), (4, false, 1001, data(1)), (9, false, 1001, data(2))];
        for header in [10, 12] {
            let capture = Capture::parse(&pcap_behind(&frames, header), SERVER).expect("parsed");
            assert_eq!(capture.packets.len(), 3, "behind {header} bytes");
            assert_eq!(capture.transfer("vmlinuz-arm64").map(|t| t.duration()), Some(Duration::from_millis(5)));
        }
    }

    #[test]
    fn a_restarted_download_spans_both_requests_and_a_cut_capture_keeps_what_came_before() {
        let frames = [(0, true, 3000, rrq("/vmlinuz")), (2, false, 3000, data(1)), (5002, true, 3001, rrq("vmlinuz")), (5004, false, 3001, data(1)), (5010, false, 3001, data(2))];
        let mut bytes = pcap(&frames);
        bytes.truncate(bytes.len() - 7);
        let capture = Capture::parse(&bytes, SERVER).expect("parsed");
        let kernel = capture.transfer("vmlinuz").expect("the kernel's DATA");
        assert_eq!(kernel.requests, 2);
        assert_eq!((kernel.first_data, kernel.last_data), (Duration::from_millis(2), Duration::from_millis(5004)), "the last frame was cut");
        assert_eq!(kernel.longest_gap, Duration::from_millis(5002));
        assert_eq!(Tftp::parse(&[0]), Tftp::Other);
        assert_eq!(Tftp::parse(&[0, 5, 0, 0]), Tftp::Error { code: 0, message: String::new() });
    }
}
