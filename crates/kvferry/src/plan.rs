//! Ops, their validation, and the plan a transport carries out.
//!
//! Validation happens before anything moves: every local range inside one
//! local region (which it pins), every remote range inside one region of the
//! peer's segment, lengths non-zero, no overflow. Planning then coalesces ops
//! that are contiguous on both sides and cuts large ones into slices.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::memory::{Pin, RegionDesc, Registry};
use crate::segment::Segment;

/// Direction of an op, seen from the initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// Remote -> local.
    Read,
    /// Local -> remote.
    Write,
}

/// One transfer: absolute virtual addresses on both sides, as in Mooncake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub local: u64,
    pub remote: u64,
    pub len: u64,
}

/// A contiguous piece of work for a transport: part of one op, or several
/// ops merged because they are contiguous on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    pub local: u64,
    pub remote: u64,
    pub len: u64,
    /// The ops this slice carries bytes of: `first_op..=last_op`.
    pub first_op: u32,
    pub last_op: u32,
}

/// A validated batch, ready for a transport.
#[derive(Debug)]
pub struct Plan {
    pub opcode: Opcode,
    pub slices: Vec<Slice>,
    pub num_ops: usize,
    /// The ops as submitted (to plan the batch again after a peer restart).
    pub ops: Vec<Op>,
    /// Local regions the plan touches; held until the plan is finished.
    pub local_pins: Vec<Pin>,
}

/// Validates `ops` and builds their plan.
///
/// Fails on the first bad op with an error naming it; nothing is pinned or
/// moved then.
pub fn plan(
    opcode: Opcode,
    ops: &[Op],
    local: &Registry,
    remote: &Segment,
    slice_size: u64,
) -> Result<Plan> {
    if ops.is_empty() {
        return Err(Error::invalid("a batch needs at least one op"));
    }
    if ops.len() > u32::MAX as usize {
        return Err(Error::invalid("more than 2^32-1 ops in one batch"));
    }
    if slice_size == 0 {
        return Err(Error::invalid("slice size is zero"));
    }
    let mut local_pins: Vec<Pin> = Vec::new();
    // Per op: (local region start, remote region start), for coalescing.
    let mut owners: Vec<(u64, u64)> = Vec::with_capacity(ops.len());
    for (index, op) in ops.iter().enumerate() {
        if op.len == 0 {
            return Err(Error::ZeroLengthOp { index });
        }
        for addr in [op.local, op.remote] {
            if addr.checked_add(op.len).is_none() {
                return Err(Error::AddressOverflow {
                    index,
                    addr,
                    len: op.len,
                });
            }
        }
        // Consecutive ops mostly share a region: reuse the last pin.
        let local_region = match local_pins.last() {
            Some(p) if p.desc().contains(op.local, op.len) => p.desc(),
            _ => {
                let pin = local.pin(op.local, op.len).ok_or(Error::LocalOutOfRange {
                    index,
                    addr: op.local,
                    len: op.len,
                })?;
                let d = pin.desc();
                if !local_pins.iter().any(|p| Arc::ptr_eq(p, &pin)) {
                    local_pins.push(pin);
                }
                d
            }
        };
        let remote_region: &RegionDesc =
            remote
                .find(op.remote, op.len)
                .ok_or_else(|| Error::RemoteOutOfRange {
                    index,
                    peer: remote.name.clone(),
                    addr: op.remote,
                    len: op.len,
                })?;
        owners.push((local_region.addr, remote_region.addr));
    }
    Ok(Plan {
        opcode,
        slices: coalesce_and_slice(ops, &owners, slice_size),
        num_ops: ops.len(),
        ops: ops.to_vec(),
        local_pins,
    })
}

/// Merges consecutive ops that are contiguous on both sides and in the same
/// pair of regions, then cuts every run longer than `slice_size`.
fn coalesce_and_slice(ops: &[Op], owners: &[(u64, u64)], slice_size: u64) -> Vec<Slice> {
    let mut runs: Vec<Slice> = Vec::with_capacity(ops.len());
    for (i, (op, owner)) in ops.iter().zip(owners).enumerate() {
        let i = i as u32;
        if let Some(last) = runs.last_mut() {
            let same_regions = owners[last.last_op as usize] == *owner;
            if same_regions
                && last.local + last.len == op.local
                && last.remote + last.len == op.remote
            {
                last.len += op.len;
                last.last_op = i;
                continue;
            }
        }
        runs.push(Slice {
            local: op.local,
            remote: op.remote,
            len: op.len,
            first_op: i,
            last_op: i,
        });
    }
    if runs.iter().all(|r| r.len <= slice_size) {
        return runs;
    }
    let mut out = Vec::with_capacity(runs.len());
    for run in runs {
        let mut done = 0;
        while done < run.len {
            let len = (run.len - done).min(slice_size);
            // Ops covered by this piece: walk from the run's first op.
            let (first_op, last_op) = ops_covering(ops, &run, done, len);
            out.push(Slice {
                local: run.local + done,
                remote: run.remote + done,
                len,
                first_op,
                last_op,
            });
            done += len;
        }
    }
    out
}

/// Which ops of a merged `run` own the bytes `[offset, offset + len)` of it.
fn ops_covering(ops: &[Op], run: &Slice, offset: u64, len: u64) -> (u32, u32) {
    if run.first_op == run.last_op {
        return (run.first_op, run.last_op);
    }
    let mut start = 0u64;
    let (mut first, mut last) = (run.first_op, run.first_op);
    for i in run.first_op..=run.last_op {
        let l = ops[i as usize].len;
        if start + l <= offset {
            first = i + 1;
        }
        if start < offset + len {
            last = i;
        }
        start += l;
    }
    (first, last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Location;

    fn setup() -> (Registry, Segment) {
        let local = Registry::new();
        let host = |addr, len| RegionDesc {
            addr,
            len,
            location: Location::Host,
        };
        local
            .register(&[host(0x10000, 0x10000), host(0x20000, 0x10000)])
            .unwrap();
        let seg = Segment {
            name: "peer:1".into(),
            instance_id: 7,
            epoch: 1,
            host_id: "h".into(),
            pid: 1,
            regions: vec![host(0x90000, 0x10000), host(0xa0000, 0x10000)],
            exports: Default::default(),
        };
        (local, seg)
    }

    fn op(local: u64, remote: u64, len: u64) -> Op {
        Op { local, remote, len }
    }

    #[test]
    fn coalesces_only_when_contiguous_on_both_sides_and_in_one_region() {
        let (l, s) = setup();
        let ops = [
            op(0x10000, 0x90000, 0x100),
            op(0x10100, 0x90100, 0x100), // merges
            op(0x10200, 0x90300, 0x100), // remote gap
            op(0x10300, 0x90400, 0x100), // merges with previous
            // Contiguous in bytes but crossing into the next region: kept apart.
            op(0x1ff00, 0x9ff00, 0x100),
            op(0x20000, 0xa0000, 0x100),
        ];
        let p = plan(Opcode::Read, &ops, &l, &s, 1 << 20).unwrap();
        let got: Vec<_> = p
            .slices
            .iter()
            .map(|s| (s.local, s.len, s.first_op, s.last_op))
            .collect();
        assert_eq!(
            got,
            vec![
                (0x10000, 0x200, 0, 1),
                (0x10200, 0x200, 2, 3),
                (0x1ff00, 0x100, 4, 4),
                (0x20000, 0x100, 5, 5)
            ]
        );
        assert_eq!(p.local_pins.len(), 2);
    }

    #[test]
    fn slices_large_runs_and_tracks_ops() {
        let (l, s) = setup();
        let ops = [op(0x10000, 0x90000, 0x300), op(0x10300, 0x90300, 0x100)];
        let p = plan(Opcode::Write, &ops, &l, &s, 0x180).unwrap();
        let got: Vec<_> = p
            .slices
            .iter()
            .map(|s| (s.local, s.len, s.first_op, s.last_op))
            .collect();
        assert_eq!(
            got,
            vec![
                (0x10000, 0x180, 0, 0),
                (0x10180, 0x180, 0, 0),
                (0x10300, 0x100, 1, 1)
            ]
        );
        let total: u64 = p.slices.iter().map(|s| s.len).sum();
        assert_eq!(total, 0x400);
        // A slice straddling two merged ops names both.
        let p = plan(Opcode::Write, &ops, &l, &s, 0x200).unwrap();
        let got: Vec<_> = p.slices.iter().map(|s| (s.first_op, s.last_op)).collect();
        assert_eq!(got, vec![(0, 0), (0, 1)]);
    }

    #[test]
    fn rejects_bad_ops_naming_them() {
        let (l, s) = setup();
        let good = op(0x10000, 0x90000, 0x10);
        type Check = fn(&Error) -> bool;
        let cases: Vec<(Op, Check)> = vec![
            (op(0x10000, 0x90000, 0), |e| {
                matches!(e, Error::ZeroLengthOp { index: 1 })
            }),
            (op(u64::MAX - 4, 0x90000, 0x10), |e| {
                matches!(e, Error::AddressOverflow { index: 1, .. })
            }),
            (op(0x10000, u64::MAX, 0x10), |e| {
                matches!(e, Error::AddressOverflow { index: 1, .. })
            }),
            (op(0x5000, 0x90000, 0x10), |e| {
                matches!(e, Error::LocalOutOfRange { index: 1, .. })
            }),
            (op(0x1fff0, 0x90000, 0x20), |e| {
                matches!(e, Error::LocalOutOfRange { index: 1, .. })
            }),
            (op(0x10000, 0x9fff0, 0x20), |e| {
                matches!(e, Error::RemoteOutOfRange { index: 1, .. })
            }),
            (op(0x10000, 0xb0000, 0x1), |e| {
                matches!(e, Error::RemoteOutOfRange { index: 1, .. })
            }),
        ];
        for (bad, check) in cases {
            let e = plan(Opcode::Read, &[good, bad], &l, &s, 1 << 20).unwrap_err();
            assert!(check(&e), "{bad:?}: {e}");
        }
        assert!(plan(Opcode::Read, &[], &l, &s, 1).is_err());
    }
}
