//! The side-channel ports the connectors derive from `kv_port`.
//!
//! Every rank of every DP replica needs its own listening port, so the
//! connectors lay them out densely: one block of `tp * pp` ports per DP rank,
//! one port per (stage, TP rank) inside it. Overflowing 65535 would make two
//! ranks collide or bind nonsense, so every helper checks.

use crate::error::{Result, TopologyError};

fn add_port(what: &'static str, base: u16, offset: u64) -> Result<u16> {
    u64::from(base)
        .checked_add(offset)
        .and_then(|port| u16::try_from(port).ok())
        .ok_or(TopologyError::PortOverflow { what, base, offset })
}

fn mul(what: &'static str, base: u16, a: usize, b: usize) -> Result<u64> {
    (a as u64)
        .checked_mul(b as u64)
        .ok_or(TopologyError::PortOverflow {
            what,
            base,
            offset: u64::MAX,
        })
}

/// `kv_port + dp_rank * tp * pp`: the first port of a DP replica.
pub fn side_channel_port(kv_port: u16, dp_rank: usize, tp: usize, pp: usize) -> Result<u16> {
    const WHAT: &str = "side channel port";
    let per_replica = mul(WHAT, kv_port, tp, pp)?;
    let offset = per_replica
        .checked_mul(dp_rank as u64)
        .ok_or(TopologyError::PortOverflow {
            what: WHAT,
            base: kv_port,
            offset: u64::MAX,
        })?;
    add_port(WHAT, kv_port, offset)
}

/// `side_channel_port + pp_rank * tp + tp_rank`: where one prefill worker
/// listens.
pub fn prefill_worker_port(
    side_channel_port: u16,
    pp_rank: usize,
    tp: usize,
    tp_rank: usize,
) -> Result<u16> {
    const WHAT: &str = "prefill worker port";
    let offset = mul(WHAT, side_channel_port, pp_rank, tp)?
        .checked_add(tp_rank as u64)
        .ok_or(TopologyError::PortOverflow {
            what: WHAT,
            base: side_channel_port,
            offset: u64::MAX,
        })?;
    add_port(WHAT, side_channel_port, offset)
}

/// `remote_port + rank`: where a decode rank reaches global prefill rank
/// `rank` (`stage * P + tp_rank`, as in a pull list), which is the same port
/// as [`prefill_worker_port`] when `remote_port` is the prefill side-channel
/// port.
pub fn decode_pull_port(remote_port: u16, prefill_rank: usize) -> Result<u16> {
    add_port("decode pull port", remote_port, prefill_rank as u64)
}
