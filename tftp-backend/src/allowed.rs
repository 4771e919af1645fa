//! Who may steer this backend: the load balancers named by `--lb`. A steering header is a
//! capability (it resumes any file whose path hash and digest it names, toward whoever sent
//! it), so anything from another address is dropped before the header is even read, counted,
//! and logged at most once per [`LOG_EVERY`] with the count since the last line.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

/// Shortest time between two log lines about dropped senders: a flood must not become a log
/// flood.
pub const LOG_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct AllowedBalancers {
    addresses: Vec<IpAddr>,
    /// Datagrams dropped since the start.
    dropped: u64,
    /// Dropped since the last log line, and when that line was written.
    unlogged: u64,
    logged_at: Option<Instant>,
}

/// What to log about a drop: the datagrams dropped since the last line, the latest sender.
#[derive(Debug, PartialEq, Eq)]
pub struct DropReport {
    pub since_last: u64,
    pub total: u64,
    pub from: SocketAddr,
}

impl AllowedBalancers {
    #[must_use]
    pub fn new(addresses: Vec<IpAddr>) -> Self {
        Self { addresses, dropped: 0, unlogged: 0, logged_at: None }
    }

    /// Whether a datagram from `from` may be read; for one that may not, `Err` carries a
    /// report when it is time to log one.
    pub fn check(&mut self, from: SocketAddr, now: Instant) -> Result<(), Option<DropReport>> {
        // A balancer reached over IPv6 sockets may show as an IPv4-mapped address.
        let ip = from.ip().to_canonical();
        if self.addresses.iter().any(|a| a.to_canonical() == ip) {
            return Ok(());
        }
        self.dropped += 1;
        self.unlogged += 1;
        if self.logged_at.is_some_and(|at| now.duration_since(at) < LOG_EVERY) {
            return Err(None);
        }
        self.logged_at = Some(now);
        let report = DropReport { since_last: std::mem::take(&mut self.unlogged), total: self.dropped, from };
        Err(Some(report))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{AllowedBalancers, DropReport, LOG_EVERY};

    #[test]
    fn only_named_balancers_pass_and_drops_are_logged_at_a_rate_limit() {
        let mut allowed = AllowedBalancers::new(vec!["10.0.1.1".parse().unwrap(), "10.0.1.2".parse().unwrap()]);
        let t0 = Instant::now();
        assert_eq!(allowed.check("10.0.1.1:40000".parse().unwrap(), t0), Ok(()));
        assert_eq!(allowed.check("10.0.1.2:1".parse().unwrap(), t0), Ok(()), "any port of a balancer");
        assert_eq!(allowed.check("[::ffff:10.0.1.2]:7".parse().unwrap(), t0), Ok(()), "IPv4-mapped");
        let attacker = "10.0.1.66:40000".parse().unwrap();
        assert_eq!(allowed.check(attacker, t0), Err(Some(DropReport { since_last: 1, total: 1, from: attacker })));
        for i in 1..1000u64 {
            assert_eq!(allowed.check(attacker, t0 + Duration::from_micros(i)), Err(None), "no line within a second");
        }
        let later = t0 + LOG_EVERY;
        assert_eq!(allowed.check(attacker, later), Err(Some(DropReport { since_last: 1000, total: 1001, from: attacker })));
        assert_eq!(allowed.check("10.0.1.1:40000".parse().unwrap(), later), Ok(()), "the balancers still pass");
    }
}
