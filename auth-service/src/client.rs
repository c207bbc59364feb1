//! Who is calling, as the per-client limits count it: an address the service verified, never a
//! string the caller chose.
//!
//! With `TRUSTED_PROXY_HOPS = n > 0`, the gateway in front appends the address it saw to
//! `x-forwarded-for`; the entry `n` places from the right is the one the outermost trusted proxy
//! wrote, and everything left of it may be forged by the caller. Every `x-forwarded-for` header
//! counts, in order (HTTP lets a list be split over several headers). The entry must parse as an
//! IP address (a port is tolerated); anything else falls back to the TCP peer.
//!
//! IPv6 clients are counted per /64: one subscriber usually gets a whole /64, so counting single
//! addresses would give an attacker 2⁶⁴ identities for free.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A client as the limits count it. Its [`ClientId::key`] is built only from parsed addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientId {
    V4(Ipv4Addr),
    /// The /64 network: the first four groups of the address.
    V6Net([u16; 4]),
    /// No address at all (not a TCP connection). All such callers share one identity, which
    /// errs towards refusing.
    Unknown,
}

impl ClientId {
    /// The client of a request that arrived from `peer` with these `x-forwarded-for` header
    /// values (in order), behind `trusted_proxy_hops` proxies.
    pub fn from_request<'a>(
        peer: Option<SocketAddr>,
        forwarded_for: impl IntoIterator<Item = &'a str>,
        trusted_proxy_hops: usize,
    ) -> Self {
        if trusted_proxy_hops > 0 {
            let entries: Vec<&str> = forwarded_for
                .into_iter()
                .flat_map(|header| header.split(','))
                .map(str::trim)
                .filter(|entry| !entry.is_empty())
                .collect();
            if !entries.is_empty() {
                // Fewer entries than hops: the request entered behind the outer proxies, and
                // the leftmost entry is the address the first proxy saw.
                let index = entries.len().saturating_sub(trusted_proxy_hops);
                if let Some(ip) = parse_entry(entries[index]) {
                    return Self::from_ip(ip);
                }
            }
        }
        peer.map_or(Self::Unknown, |addr| Self::from_ip(addr.ip()))
    }

    pub fn from_ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4),
                None => {
                    let s = v6.segments();
                    Self::V6Net([s[0], s[1], s[2], s[3]])
                }
            },
        }
    }

    /// The form used in Redis keys: `4:203.0.113.7`, `6:2001:db8:1:2::/64`, `none`.
    pub fn key(&self) -> String {
        match self {
            Self::V4(v4) => format!("4:{v4}"),
            Self::V6Net([a, b, c, d]) => {
                format!("6:{}/64", Ipv6Addr::new(*a, *b, *c, *d, 0, 0, 0, 0))
            }
            Self::Unknown => "none".to_owned(),
        }
    }
}

/// Logs show the network, not the host: `203.0.113.x`, `2001:db8:1:2::/64`.
impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(v4) => {
                let [a, b, c, _] = v4.octets();
                write!(f, "{a}.{b}.{c}.x")
            }
            Self::V6Net([a, b, c, d]) => {
                write!(f, "{}/64", Ipv6Addr::new(*a, *b, *c, *d, 0, 0, 0, 0))
            }
            Self::Unknown => f.write_str("unknown"),
        }
    }
}

/// An `x-forwarded-for` entry: an IP address, optionally with a port (`203.0.113.7:5555`,
/// `[2001:db8::1]:443`), as some proxies write it.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|addr| addr.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> Option<SocketAddr> {
        Some("10.0.0.9:5555".parse().unwrap())
    }

    fn client(headers: &[&str], hops: usize) -> String {
        ClientId::from_request(peer(), headers.iter().copied(), hops).key()
    }

    #[test]
    fn the_client_is_the_peer_unless_proxies_are_trusted() {
        let header = ["203.0.113.7, 10.0.0.1"];
        assert_eq!(client(&header, 0), "4:10.0.0.9");
        assert_eq!(client(&header, 1), "4:10.0.0.1");
        assert_eq!(client(&header, 2), "4:203.0.113.7");
        assert_eq!(client(&header, 5), "4:203.0.113.7");
        assert_eq!(client(&[], 1), "4:10.0.0.9");
    }

    #[test]
    fn every_header_counts_in_order() {
        // A caller-set header first, the gateway's own appended as a second header.
        assert_eq!(client(&["198.51.100.1", "203.0.113.7"], 1), "4:203.0.113.7");
        assert_eq!(
            client(&["198.51.100.1", "203.0.113.7"], 2),
            "4:198.51.100.1"
        );
    }

    #[test]
    fn junk_in_the_trusted_entry_falls_back_to_the_peer() {
        for junk in [
            "not-an-ip",
            "{evil}:key",
            "999.1.1.1",
            "203.0.113.7 OR 1=1",
            "unknown",
            "",
            "   ",
        ] {
            assert_eq!(client(&[junk], 1), "4:10.0.0.9", "{junk:?}");
        }
        // Forged entries left of the trusted one do not matter.
        assert_eq!(client(&["garbage, 203.0.113.7"], 1), "4:203.0.113.7");
    }

    #[test]
    fn ports_are_tolerated() {
        assert_eq!(client(&["203.0.113.7:4242"], 1), "4:203.0.113.7");
        assert_eq!(client(&["[2001:db8:1:2::1]:443"], 1), "6:2001:db8:1:2::/64");
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_is_v4() {
        let a = client(&["2001:db8:1:2:aaaa::1"], 1);
        let b = client(&["2001:db8:1:2:ffff:ffff:ffff:ffff"], 1);
        let c = client(&["2001:db8:1:3::1"], 1);
        assert_eq!(a, "6:2001:db8:1:2::/64");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(client(&["::ffff:203.0.113.7"], 1), "4:203.0.113.7");
    }

    #[test]
    fn no_address_at_all_is_one_shared_identity() {
        let id = ClientId::from_request(None, ["junk"], 1);
        assert_eq!(id, ClientId::Unknown);
        assert_eq!(id.key(), "none");
    }

    #[test]
    fn logs_show_the_network_only() {
        let v4 = ClientId::from_ip("203.0.113.7".parse().unwrap());
        assert_eq!(v4.to_string(), "203.0.113.x");
        let v6 = ClientId::from_ip("2001:db8:1:2::77".parse().unwrap());
        assert_eq!(v6.to_string(), "2001:db8:1:2::/64");
    }
}
