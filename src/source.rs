//! Where a peer connects from, as the relay counts it: its address cut to a prefix length
//! (an IPv4 address, an IPv6 /64 by default), so that one host with many addresses — every
//! IPv6 host has a /64 of them — counts as one source. The audit trail aggregates
//! unauthenticated refusals by source; ingest shares connections and buffered bytes by it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// How peers' addresses become [`Prefix`]es: IPv4 and IPv6 prefix lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefixes {
    pub ipv4: u8,
    pub ipv6: u8,
}

/// A peer's address cut to its prefix length, e.g. `2001:db8:1:2::/64`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefixes {
    /// The usual sources: one IPv4 address, one IPv6 /64.
    pub const DEFAULT: Prefixes = Prefixes { ipv4: 32, ipv6: 64 };

    /// `ip`'s prefix at these lengths; an IPv4-mapped IPv6 address counts as IPv4.
    pub fn of(self, ip: IpAddr) -> Prefix {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let len = self.ipv4.min(32);
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                Prefix { addr: Ipv4Addr::from(u32::from(v4) & mask).into(), len }
            }
            IpAddr::V6(v6) => {
                let len = self.ipv6.min(128);
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                Prefix { addr: Ipv6Addr::from(u128::from(v6) & mask).into(), len }
            }
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_cut_to_their_prefix() {
        let p = |ipv4, ipv6| Prefixes { ipv4, ipv6 };
        for (addr, prefixes, want) in [
            ("192.0.2.7", Prefixes::DEFAULT, "192.0.2.7/32"),
            ("192.0.2.7", p(24, 64), "192.0.2.0/24"),
            ("192.0.2.7", p(0, 64), "0.0.0.0/0"),
            ("192.0.2.7", p(99, 64), "192.0.2.7/32"),
            ("2001:db8:1:2:3:4:5:6", Prefixes::DEFAULT, "2001:db8:1:2::/64"),
            ("2001:db8:1:2:ffff::1", Prefixes::DEFAULT, "2001:db8:1:2::/64"),
            ("2001:db8:1:2:3:4:5:6", p(32, 48), "2001:db8:1::/48"),
            ("2001:db8::1", p(32, 128), "2001:db8::1/128"),
            ("::ffff:192.0.2.7", Prefixes::DEFAULT, "192.0.2.7/32"),
            ("::1", Prefixes::DEFAULT, "::/64"),
        ] {
            let ip: IpAddr = addr.parse().unwrap();
            assert_eq!(prefixes.of(ip).to_string(), want, "{addr}");
        }
    }
}
