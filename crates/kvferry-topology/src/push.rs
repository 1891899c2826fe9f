//! Which decode ranks a prefill rank writes to (the layerwise connector, where
//! prefill pushes each layer as soon as it is computed), COMPAT.md section 3.

use crate::error::{Result, TopologyError};
use crate::shape::{PdShape, rank_heads};

/// The ranks of a TP group of size `tp` that hold distinct copies of all
/// heads, as the layerwise connector groups them.
///
/// `step = tp / heads`; with `step == 0` (fewer ranks than heads) the whole
/// group is one replica; otherwise there are `step` groups and group `i` is
/// `{h * step + i : h < heads}` (one rank per head). Pass `heads = 1` for MLA.
/// Empty when `tp` or `heads` is zero.
pub fn replica_groups(tp: usize, heads: usize) -> Vec<Vec<usize>> {
    if tp == 0 || heads == 0 {
        return Vec::new();
    }
    let step = tp / heads;
    if step == 0 {
        return vec![(0..tp).collect()];
    }
    (0..step)
        .map(|i| (0..heads).map(|h| h * step + i).collect())
        .collect()
}

/// Where one prefill rank writes for one request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PushTarget {
    /// Decode ranks to write to, ascending; empty when this prefill rank is
    /// not in the request's active replica group.
    pub decode_ranks: Vec<usize>,
    /// Where inside the decode block the bytes go, in units of the prefill
    /// block length (see [`Self::offset_bytes`]).
    pub offset_index: u64,
}

impl PushTarget {
    /// The byte offset inside the decode block: `offset_index * block_len`,
    /// where `block_len` is the prefill side's block length for the cache.
    pub fn offset_bytes(&self, block_len: u64) -> Result<u64> {
        self.offset_index
            .checked_mul(block_len)
            .ok_or(TopologyError::Overflow {
                what: "push offset bytes",
            })
    }
}

/// The push mapping for one accepted shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushMapping {
    shape: PdShape,
    heads: usize,
    prefill_groups: Vec<Vec<usize>>,
    decode_groups: Vec<Vec<usize>>,
}

impl PushMapping {
    /// Accepts or rejects `shape` with the checks shared with the pull
    /// mapping (see [`PdShape`]). `prefill_pp` only has to be nonzero: a
    /// pipeline stage pushes the layers it owns with the same rank mapping.
    ///
    /// Sparse attention is treated as MLA here (one head, no offset): its
    /// cache is the single latent cache and the connectors compute the head
    /// ratios only for non-MLA models.
    pub fn new(shape: PdShape) -> Result<Self> {
        shape.validate_common()?;
        let heads = shape.layout_heads();
        Ok(PushMapping {
            shape,
            heads,
            prefill_groups: replica_groups(shape.prefill_tp, heads),
            decode_groups: replica_groups(shape.decode_tp, heads),
        })
    }

    /// The accepted shape.
    pub fn shape(&self) -> PdShape {
        self.shape
    }

    /// The prefill replica groups.
    pub fn prefill_groups(&self) -> &[Vec<usize>] {
        &self.prefill_groups
    }

    /// The decode replica groups.
    pub fn decode_groups(&self) -> &[Vec<usize>] {
        &self.decode_groups
    }

    /// The prefill replica groups that send for the request at position
    /// `request_index` of the step's batch; active group `m` feeds decode
    /// group `m`. Requests rotate over the prefill replicas so that every
    /// replica carries an equal share of the traffic.
    pub fn active_prefill_groups(&self, request_index: u64) -> &[Vec<usize>] {
        let (prefill, decode) = (self.prefill_groups.len(), self.decode_groups.len());
        let ratio = prefill.checked_div(decode).unwrap_or(0);
        if ratio == 0 {
            return &self.prefill_groups;
        }
        // ratio >= 1, and the remainder is below it, so the cast is exact.
        let start = (request_index % ratio as u64) as usize * decode;
        self.prefill_groups
            .get(start..start + decode)
            .unwrap_or(&self.prefill_groups)
    }

    /// The decode ranks `prefill_rank` (a TP rank) writes to for the request
    /// at `request_index`, and where inside the decode block.
    pub fn push_targets(&self, request_index: u64, prefill_rank: usize) -> Result<PushTarget> {
        let (p, d) = (self.shape.prefill_tp, self.shape.decode_tp);
        if prefill_rank >= p {
            return Err(TopologyError::RankOutOfRange {
                what: "prefill rank",
                rank: prefill_rank,
                limit: p,
            });
        }
        let own_heads = rank_heads(p, self.heads, prefill_rank).unwrap_or(0..0);
        let decode_ranks = self
            .active_prefill_groups(request_index)
            .iter()
            .position(|group| group.contains(&prefill_rank))
            .and_then(|m| self.decode_groups.get(m))
            .map(|group| {
                let mut ranks: Vec<usize> = group
                    .iter()
                    .copied()
                    .filter(|&rank| {
                        rank_heads(d, self.heads, rank).is_some_and(|heads| {
                            heads.start < own_heads.end && own_heads.start < heads.end
                        })
                    })
                    .collect();
                ranks.sort_unstable();
                ranks
            })
            .unwrap_or_default();
        Ok(PushTarget {
            decode_ranks,
            offset_index: self.offset_index(prefill_rank),
        })
    }

    /// The offset index of a prefill rank's bytes inside the decode block:
    /// 0 under MLA (and sparse) or equal TPs; else
    /// `(p / num_head_replica) % pd_head_ratio` with
    /// `num_head_replica = P / H if P >= H else 1` and
    /// `pd_head_ratio = min(P, H) / min(D, H)`.
    pub fn offset_index(&self, prefill_rank: usize) -> u64 {
        let (p, d, h) = (self.shape.prefill_tp, self.shape.decode_tp, self.heads);
        if self.shape.attention.is_latent() || p == d {
            return 0;
        }
        let replica = if p >= h { p / h } else { 1 };
        let ratio = (p.min(h) / d.min(h)).max(1);
        ((prefill_rank / replica.max(1)) % ratio) as u64
    }
}
