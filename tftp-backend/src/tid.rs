//! A standalone transfer's own socket: its TID (RFC 1350), a new port connected to the client.
//!
//! Registered with the event loop for readability only. A socket registered for writability
//! too gets an edge-triggered "writable" event each time the kernel frees a datagram it sent
//! (on loopback: at once, during the send), so every wait for an ACK cost two `epoll_wait`s,
//! the first returning that event for nobody. Sends here never wait for readiness: a transfer
//! has at most one window in flight, far below a socket's send buffer, so a full buffer is
//! rare; then the send is tried again after a millisecond.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, BorrowedFd},
    time::Duration,
};

use tokio::io::{Interest, unix::AsyncFd};

use crate::{batch::SendBatch, window::Link};

/// How long a send waits before trying a full send buffer again.
const FULL_BUFFER_RETRY: Duration = Duration::from_millis(1);

/// The path MTU (`IP_MTU`) toward the peer a UDP socket is connected to, if the kernel has
/// one: the route's MTU, or less once the path told otherwise.
pub fn path_mtu(socket: BorrowedFd<'_>) -> Option<usize> {
    use std::os::fd::AsRawFd as _;
    let mut mtu: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(size_of::<libc::c_int>()).ok()?;
    // SAFETY: getsockopt writes at most `len` bytes into `mtu`, an int, and updates `len`.
    let rc = unsafe { libc::getsockopt(socket.as_raw_fd(), libc::IPPROTO_IP, libc::IP_MTU, (&raw mut mtu).cast(), &raw mut len) };
    (rc == 0).then(|| usize::try_from(mtu).ok()).flatten()
}

pub struct TransferSocket {
    io: AsyncFd<std::net::UdpSocket>,
}

impl TransferSocket {
    /// A socket on a new port of `local_ip`, connected to `client`.
    pub fn bind(local_ip: IpAddr, client: SocketAddr) -> io::Result<Self> {
        let socket = std::net::UdpSocket::bind((local_ip, 0))?;
        socket.connect(client)?;
        socket.set_nonblocking(true)?;
        // SAFETY: the socket owns its file descriptor, which stays open and the same until the
        // `AsyncFd` that owns the socket is dropped.
        let io = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }?;
        Ok(Self { io })
    }

    /// The path MTU toward the client (`IP_MTU`), if the kernel has one.
    pub fn path_mtu(&self) -> Option<usize> {
        path_mtu(self.io.get_ref().as_fd())
    }

    /// The next datagram from the client (cut to `buf`'s length).
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.io.readable().await?;
            if let Ok(received) = ready.try_io(|io| io.get_ref().recv(buf)) {
                return received;
            }
        }
    }

    /// A datagram already queued, without waiting: before a timer-driven retransmission, an
    /// answer that arrived while this task waited for a CPU is no loss.
    pub fn try_recv(&self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        match self.io.get_ref().recv(buf) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => None,
            received => Some(received),
        }
    }

    /// Sends one datagram to the client.
    pub async fn send(&self, datagram: &[u8]) -> io::Result<usize> {
        self.send_with(|_| self.io.get_ref().send(datagram)).await
    }

    /// Runs `send`, a non-blocking send on the socket, until the kernel takes something.
    pub async fn send_with<T>(&self, mut send: impl FnMut(BorrowedFd<'_>) -> io::Result<T>) -> io::Result<T> {
        loop {
            match send(self.io.as_fd()) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => tokio::time::sleep(FULL_BUFFER_RETRY).await,
                done => return done,
            }
        }
    }
}

/// A transfer's DATA goes to its client on its own socket; a send buffer found full is tried
/// again shortly, and any other failure ends the transfer.
impl Link for TransferSocket {
    fn try_send<'a>(&self, batch: &mut SendBatch, segment: usize, datagrams: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone) -> io::Result<usize> {
        batch.send(self.io.as_fd(), segment, datagrams)
    }

    async fn ready(&self) -> io::Result<()> {
        tokio::time::sleep(FULL_BUFFER_RETRY).await;
        Ok(())
    }

    fn failed(&self, error: io::Error) -> io::Result<()> {
        Err(error)
    }
}

#[cfg(test)]
mod tests {
    use std::{io, net::Ipv4Addr, time::Duration};

    use super::{FULL_BUFFER_RETRY, TransferSocket};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn the_client_hears_from_the_new_port_and_only_its_datagrams_are_received() {
        runtime().block_on(async {
            let client = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let stranger = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let tid = TransferSocket::bind(Ipv4Addr::LOCALHOST.into(), client.local_addr().unwrap()).unwrap();
            let port = tid.io.get_ref().local_addr().unwrap();
            assert_eq!(tid.send(b"oack").await.unwrap(), 4);
            let mut buf = [0u8; 16];
            let (len, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..len], from), (&b"oack"[..], port));
            // A connected socket drops what another port sends it (RFC 1350: a wrong TID).
            stranger.send_to(b"intruder", port).unwrap();
            client.send_to(b"ack", port).unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), tid.recv(&mut buf)).await.expect("the client's datagram arrives").unwrap();
            assert_eq!(&buf[..got], b"ack");
        });
    }

    #[test]
    fn a_send_refused_by_a_full_buffer_is_tried_again_until_the_kernel_takes_it() {
        runtime().block_on(async {
            let client = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let tid = TransferSocket::bind(Ipv4Addr::LOCALHOST.into(), client.local_addr().unwrap()).unwrap();
            let mut refusals = 3;
            let started = tokio::time::Instant::now();
            let sent = tid
                .send_with(|_| {
                    if refusals > 0 {
                        refusals -= 1;
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Ok(7)
                })
                .await;
            assert_eq!((sent.unwrap(), refusals), (7, 0));
            assert!(started.elapsed() >= 3 * FULL_BUFFER_RETRY, "waited between tries");
            // Any other error ends the send.
            let failed = tid.send_with(|_| Err::<(), _>(io::ErrorKind::ConnectionRefused.into())).await;
            assert_eq!(failed.unwrap_err().kind(), io::ErrorKind::ConnectionRefused);
        });
    }
}
