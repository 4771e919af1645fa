//! The DATA packets each client receives, counted by nftables in the client's namespace. A
//! block that arrives twice (a window resent after a failover) then shows per transfer; the
//! balancers' counters only give the total of all transfers.

use anyhow::Context as _;
use netns_tests::{Netns, pair_topology::VIP};

const TABLE: &str = "xldemo";

/// Starts counting, in `ns`, the TFTP DATA packets from the VIP: UDP from a transfer port (not
/// 69) whose payload starts with opcode 3.
pub fn count_data(ns: &Netns) -> anyhow::Result<()> {
    ns.exec("nft", &["add", "table", "ip", TABLE])?;
    ns.exec("nft", &["add", "chain", "ip", TABLE, "data_in", "{ type filter hook input priority 0 ; policy accept ; }"])?;
    ns.exec("nft", &["add", "rule", "ip", TABLE, "data_in", "ip", "saddr", VIP, "udp", "sport", "!=", "69", "@th,64,16", "3", "counter"])
        .context("nft: counting DATA packets")?;
    Ok(())
}

/// DATA packets counted in `ns` since [`count_data`].
pub fn data_packets(ns: &Netns) -> anyhow::Result<u64> {
    let listing = ns.exec("nft", &["list", "table", "ip", TABLE])?;
    packets_in(&listing).with_context(|| format!("no counter in the nft listing:\n{listing}"))
}

/// The packets of the first `counter packets N bytes M` in an `nft list` output.
fn packets_in(listing: &str) -> Option<u64> {
    let after = listing.split_once("counter packets ")?.1;
    after.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::packets_in;

    #[test]
    fn reads_the_counter_of_an_nft_listing() {
        let listing = "table ip xldemo {\n\tchain data_in {\n\t\ttype filter hook input priority filter; policy accept;\n\t\t\
                       ip saddr 10.77.9.100 udp sport != 69 @th,64,16 0x3 counter packets 45721 bytes 68581500\n\t}\n}\n";
        assert_eq!(packets_in(listing), Some(45_721));
        assert_eq!(packets_in("table ip xldemo {\n}\n"), None);
    }
}
