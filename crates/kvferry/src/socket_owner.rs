//! Which process holds the other end of a TCP connection on this host.
//!
//! The cma transport copies with `process_vm_readv` / `writev` into the pid
//! a peer's segment names. That pid comes off the wire: a process that
//! answers on the peer's port (a stranger that took the port of a
//! restarted engine, say) could name any process this initiator may
//! ptrace, and have it read or write memory nobody registered. Before the
//! first copy the initiator therefore checks that the named process itself
//! holds the server end of a connection we opened to the peer: the socket
//! in `/proc/<pid>/net/tcp{,6}` whose local address is our peer address
//! and whose remote address is ours, and its inode among
//! `/proc/<pid>/fd`. Reading both needs the same ptrace access as the copy
//! itself, so a process we could not copy into fails the check too; so
//! does a target in another network or pid namespace (tcp carries those).
//!
//! The in-process copy makes the same check with our own pid: a segment
//! naming an engine of this process counts only when this process serves
//! the connection (engine.rs, `in_process_engine`).

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream};

/// Whether process `pid` holds the server end of `stream` (a connection
/// this process opened). `Ok(false)`: it does not, or the connection is
/// not visible from that process's network namespace.
pub fn holds_peer_end(pid: u32, stream: &TcpStream) -> io::Result<bool> {
    let ours = stream.local_addr()?;
    let theirs = stream.peer_addr()?;
    let mut inode = None;
    for table in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{table}");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // A kernel without IPv6 has no tcp6 table.
            Err(e) if e.kind() == io::ErrorKind::NotFound && table == "tcp6" => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{path}: {e}"))),
        };
        inode = text
            .lines()
            .skip(1)
            .find_map(|line| server_end_inode(line, theirs, ours));
        if inode.is_some() {
            break;
        }
    }
    let Some(inode) = inode else {
        return Ok(false);
    };
    let want = format!("socket:[{inode}]");
    let dir = format!("/proc/{pid}/fd");
    let entries =
        std::fs::read_dir(&dir).map_err(|e| io::Error::new(e.kind(), format!("{dir}: {e}")))?;
    for entry in entries.flatten() {
        // Descriptors closing meanwhile just do not match.
        if let Ok(target) = std::fs::read_link(entry.path())
            && target.as_os_str() == want.as_str()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The inode of a `/proc/net/tcp{,6}` line whose local address is `local`
/// and whose remote address is `remote`, if it is that line (inode 0, a
/// socket without a file, never matches).
fn server_end_inode(line: &str, local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    // "  sl  local_address rem_address   st tx_queue:rx_queue tr:tm->when retrnsmt   uid  timeout inode ..."
    let mut fields = line.split_whitespace();
    let _slot = fields.next()?;
    let l = parse_endpoint(fields.next()?)?;
    let r = parse_endpoint(fields.next()?)?;
    if !same_endpoint(l, local) || !same_endpoint(r, remote) {
        return None;
    }
    let inode: u64 = fields.nth(6)?.parse().ok()?;
    (inode != 0).then_some(inode)
}

/// Parses `ADDR:PORT` as the kernel prints it: the address as its 32-bit
/// words in network byte order, each printed as a native-endian hex
/// number (8 digits for IPv4, 32 for IPv6), the port as 4 hex digits.
fn parse_endpoint(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = [0u8; 16];
    let words = addr.len() / 8;
    if !(words == 1 || words == 4) || addr.len() % 8 != 0 {
        return None;
    }
    for w in 0..words {
        let word = u32::from_str_radix(addr.get(w * 8..w * 8 + 8)?, 16).ok()?;
        bytes[w * 4..w * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let ip = if words == 1 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(Ipv6Addr::from(bytes))
    };
    Some(SocketAddr::new(ip, port))
}

/// Equal endpoints, an IPv4 address and its IPv4-mapped IPv6 form alike
/// (a server listening on `[::]` sees IPv4 clients that way).
fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    a.port() == b.port() && canonical(a.ip()) == canonical(b.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    // The sample lines are as little-endian hosts print them.
    #[cfg(target_endian = "little")]
    #[test]
    fn parses_kernel_endpoints() {
        let v4 = parse_endpoint("0100007F:1F90").unwrap();
        assert_eq!(v4, "127.0.0.1:8080".parse().unwrap());
        // ::ffff:127.0.0.1
        let mapped = parse_endpoint("0000000000000000FFFF00000100007F:0050").unwrap();
        assert!(same_endpoint(mapped, "127.0.0.1:80".parse().unwrap()));
        let v6 = parse_endpoint("00000000000000000000000001000000:0016").unwrap();
        assert_eq!(v6, "[::1]:22".parse().unwrap());
        assert!(parse_endpoint("0100007F").is_none());
        assert!(parse_endpoint("0100007:0050").is_none());
        assert!(parse_endpoint("XYZ0007F:0050").is_none());
    }

    #[test]
    fn finds_the_process_holding_the_server_end() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server_end, _) = listener.accept().unwrap();
        assert!(holds_peer_end(std::process::id(), &client).unwrap());
        // A child of ours (whose tables we may read) holds no end of it.
        let mut other = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let held = holds_peer_end(other.id(), &client);
        other.kill().unwrap();
        other.wait().unwrap();
        assert!(!held.unwrap());
    }

    #[test]
    fn a_closed_server_end_is_held_by_nobody() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        drop(listener.accept().unwrap());
        assert!(!holds_peer_end(std::process::id(), &client).unwrap());
    }
}
