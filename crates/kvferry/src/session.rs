//! Session ids (`"host:port"`) and the initiator's cached view of a peer.

use std::sync::Arc;

use parking_lot::RwLock;

use crate::error::{Error, Result};
use crate::segment::Segment;
use crate::transport::Transport;

/// A parsed session id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// Host name or IP address, without IPv6 brackets.
    pub host: String,
    pub port: u16,
}

/// Why `host` cannot be the host part of a session id (`None`: it can).
///
/// The one rule for both ends of a session id: an engine's configured
/// hostname (`EngineConfig::hostname`, `KVFERRY_HOSTNAME`) becomes its name
/// `"host:port"`, which peers parse with [`PeerAddr::parse`]; a host one
/// side accepts and the other refuses would give an engine nobody can
/// reach. Accepted: an IPv4 address, an IPv6 address (without brackets),
/// or a DNS name: dot-separated labels of 1 to 63 ASCII letters, digits,
/// `-` and `_` (container names such as `prefill_0` resolve), 253 bytes at
/// most, not all digits (`1.2.3` is no IPv4 address and no name either).
pub fn host_problem(host: &str) -> Option<&'static str> {
    use std::net::{Ipv4Addr, Ipv6Addr};
    if host.is_empty() {
        return Some("the host is empty");
    }
    if host.contains(':') {
        return match host.parse::<Ipv6Addr>() {
            Ok(_) => None,
            Err(_) => Some("a host with ':' must be an IPv6 address"),
        };
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return match host.parse::<Ipv4Addr>() {
            Ok(_) => None,
            Err(_) => Some("not an IPv4 address, and a host name is not all digits"),
        };
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Some(
            "the host has characters no host name or address has (letters, digits, '-', '_', '.')",
        );
    }
    if host.len() > 253 {
        return Some("a host name has at most 253 characters");
    }
    if host
        .split('.')
        .any(|label| label.is_empty() || label.len() > 63)
    {
        return Some("a host name's dot-separated labels have 1 to 63 characters");
    }
    None
}

impl PeerAddr {
    /// Parses `"host:port"`, `"1.2.3.4:port"` or `"[v6::addr]:port"`; the
    /// host must pass [`host_problem`].
    pub fn parse(session: &str) -> Result<PeerAddr> {
        let bad = |reason: &str| Error::BadSession {
            session: session.to_owned(),
            reason: reason.to_owned(),
        };
        let (host, port) = if let Some(rest) = session.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| bad("expected \"[ipv6]:port\""))?;
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad("not an IPv6 address inside the brackets"));
            }
            (h, p)
        } else {
            let (h, p) = session
                .rsplit_once(':')
                .ok_or_else(|| bad("expected \"host:port\""))?;
            if h.contains(':') {
                return Err(bad("IPv6 addresses go in brackets: \"[addr]:port\""));
            }
            (h, p)
        };
        if let Some(reason) = host_problem(host) {
            return Err(bad(reason));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| bad("the port is not a number in 1..=65535"))?;
        if port == 0 {
            return Err(bad("port 0 is not a peer's port"));
        }
        Ok(PeerAddr {
            host: host.to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The initiator's view of one peer: its segment and the transport to it.
#[derive(Debug)]
pub struct Session {
    pub name: String,
    segment: RwLock<Arc<Segment>>,
    transport: Arc<dyn Transport>,
}

impl Session {
    /// A session from a segment just fetched through `transport`'s peer.
    pub fn new(name: String, segment: Segment, transport: Arc<dyn Transport>) -> Session {
        Session {
            name,
            segment: RwLock::new(Arc::new(segment)),
            transport,
        }
    }

    pub fn segment(&self) -> Arc<Segment> {
        Arc::clone(&self.segment.read())
    }

    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// Fetches the peer's segment again after a miss. A different instance
    /// id means the peer restarted: `PeerRestarted`, and the caller builds
    /// a new session (the transport itself may be stale, e.g. cma's pid).
    pub fn refresh(&self) -> Result<Arc<Segment>> {
        let fresh = Arc::new(self.transport.fetch_segment()?);
        let old = self.segment().instance_id;
        if fresh.instance_id != old {
            return Err(Error::PeerRestarted {
                peer: self.name.clone(),
                detail: format!("instance {old:#x} was replaced by {:#x}", fresh.instance_id),
            });
        }
        *self.segment.write() = Arc::clone(&fresh);
        Ok(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids() {
        let ok = |s: &str, h: &str, p: u16| {
            assert_eq!(
                PeerAddr::parse(s).unwrap(),
                PeerAddr {
                    host: h.into(),
                    port: p
                },
                "{s}"
            );
        };
        ok("127.0.0.1:15000", "127.0.0.1", 15000);
        ok("node-7.cluster:80", "node-7.cluster", 80);
        ok("[::1]:16000", "::1", 16000);
        ok("[fe80::1:2]:1", "fe80::1:2", 1);
        ok("prefill_0:9", "prefill_0", 9);
        ok("a-1.B-2.example:9", "a-1.B-2.example", 9);
        for bad in [
            "",
            "host",
            ":80",
            "host:",
            "host:0",
            "host:65536",
            "host:-1",
            "::1:80",
            "[::1]80",
            "[nothost]:80",
            "a b:80",
            "host:80 ",
            "a..b:80",
            ".host:80",
            "1.2.3:80",
            "300.1.1.1:80",
            "h\u{e9}te:80",
            "h%t:80",
        ] {
            assert!(
                matches!(PeerAddr::parse(bad), Err(Error::BadSession { .. })),
                "{bad:?} accepted"
            );
        }
        assert_eq!(PeerAddr::parse("[::1]:5").unwrap().to_string(), "[::1]:5");
    }

    /// What an engine may be named is what a peer can parse back.
    #[test]
    fn accepted_hosts_round_trip_as_session_ids() {
        let long_label = "a".repeat(63);
        let longest = [long_label.as_str(); 4].join(".")[..253].to_owned();
        for host in [
            "127.0.0.1",
            "::1",
            "fe80::1:2",
            "localhost",
            "node-7.cluster",
            "prefill_0",
            long_label.as_str(),
            longest.as_str(),
        ] {
            assert_eq!(host_problem(host), None, "{host}");
            let name = PeerAddr {
                host: host.into(),
                port: 7,
            }
            .to_string();
            assert_eq!(PeerAddr::parse(&name).unwrap().host, host, "{name}");
        }
        let too_long_label = "a".repeat(64);
        let too_long = format!("{longest}a");
        for host in [
            "",
            "a b",
            "a:b",
            "[::1]",
            "fe80::1%eth0",
            "a..b",
            "host.",
            "1.2.3",
            "256.0.0.1",
            too_long_label.as_str(),
            too_long.as_str(),
            "h\u{e9}te",
        ] {
            assert!(host_problem(host).is_some(), "{host:?} accepted");
        }
    }
}
