//! Block planning: from two sides' KV layouts and paired block ids, the list
//! of (local address, remote address, length) copies, COMPAT.md section 2.
//!
//! The connectors build these lists in a Python loop over layers, caches and
//! blocks for every request. Doing it here is faster, and every address is
//! computed with checked arithmetic against a layout whose regions were
//! validated once, so a bad id or layout is an error instead of a transfer into
//! someone else's memory.
//!
//! Units: `block_len` and `stride` describe one *kernel* block (what the
//! cache tensor's first dimension indexes, `tensor.stride(0) * element_size`);
//! block ids are *logical* (what the scheduler hands out). Logical block `b`
//! is kernel blocks `b*scale .. b*scale + scale`. With `scale == 1` the two
//! coincide, which is the connectors' usual case.

use std::ops::Range;

use crate::error::{Result, Side, TopologyError};

/// Where one cache (K or V; nope or rope under MLA) of one layer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheLayout {
    /// Address of kernel block 0.
    pub base: u64,
    /// Bytes of one kernel block.
    pub block_len: u64,
    /// Bytes from one kernel block to the next (at least `block_len`; larger
    /// when blocks are padded or interleaved with other data).
    pub stride: u64,
    /// Kernel blocks per logical block (at least 1).
    pub scale: u64,
}

impl CacheLayout {
    /// A densely packed cache: `stride == block_len`, `scale == 1`.
    pub fn dense(base: u64, block_len: u64) -> Self {
        CacheLayout {
            base,
            block_len,
            stride: block_len,
            scale: 1,
        }
    }

    fn is_byte_contiguous(&self) -> bool {
        self.stride == self.block_len
    }
}

/// One side's KV layout: for every layer, its caches, all with `num_blocks`
/// logical blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideLayout {
    num_blocks: u64,
    layers: Vec<Vec<CacheLayout>>,
    /// `layers` flattened, layer by layer: what planning walks.
    flat: Vec<CacheLayout>,
}

impl SideLayout {
    /// Validates and stores a layout.
    ///
    /// Each cache needs `block_len >= 1`, `scale >= 1`, `stride >= block_len`
    /// (overlapping blocks cannot be copied independently), and a region
    /// `base .. base + stride * scale * num_blocks` that fits in 64 bits; the
    /// planner then keeps every copy inside that region.
    pub fn new(num_blocks: u64, layers: Vec<Vec<CacheLayout>>) -> Result<Self> {
        for (layer, caches) in layers.iter().enumerate() {
            for (cache, c) in caches.iter().enumerate() {
                let invalid = |reason: String| TopologyError::InvalidLayout {
                    layer,
                    cache,
                    reason,
                };
                if c.block_len == 0 {
                    return Err(invalid("block_len is 0".into()));
                }
                if c.scale == 0 {
                    return Err(invalid("scale is 0".into()));
                }
                if c.stride < c.block_len {
                    return Err(invalid(format!(
                        "stride {} is below block_len {}: blocks would overlap",
                        c.stride, c.block_len
                    )));
                }
                if region_end(c, num_blocks).is_none() {
                    return Err(invalid(format!(
                        "region {:#x} + {} * {} * {} blocks overflows 64 bits",
                        c.base, c.stride, c.scale, num_blocks
                    )));
                }
            }
        }
        let flat = layers.iter().flatten().copied().collect();
        Ok(SideLayout {
            num_blocks,
            layers,
            flat,
        })
    }

    /// Logical blocks per cache.
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    /// The caches of every layer.
    pub fn layers(&self) -> &[Vec<CacheLayout>] {
        &self.layers
    }

    /// The bytes one cache may be read or written at:
    /// `base .. base + stride * scale * num_blocks`.
    pub fn region(&self, layer: usize, cache: usize) -> Option<Range<u64>> {
        let c = self.layers.get(layer)?.get(cache)?;
        Some(c.base..region_end(c, self.num_blocks)?)
    }
}

fn region_end(c: &CacheLayout, num_blocks: u64) -> Option<u64> {
    c.stride
        .checked_mul(c.scale)?
        .checked_mul(num_blocks)?
        .checked_add(c.base)
}

/// Which side's block is cut into `pulls` slices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SplitSide {
    /// The local block holds `pulls` remote blocks side by side: a decode
    /// rank pulling from `n` prefill ranks (the v1 connector).
    #[default]
    Local,
    /// The remote block holds `pulls` local blocks: a prefill rank pushing
    /// its slice into a larger decode block (the layerwise connector).
    Remote,
}

/// What the local side already holds, so only the rest is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PrefixHit {
    /// Nothing: the id lists pair one to one and must have equal lengths.
    #[default]
    None,
    /// The local side already computed the first `computed_tokens` tokens
    /// (a local prefix-cache hit; vLLM only reuses whole blocks, so this must
    /// be a multiple of `tokens_per_block`). The remote list covers the whole
    /// prompt, the local list only the blocks still missing: the first
    /// `computed_tokens / tokens_per_block` remote ids are skipped and the
    /// rest must pair one to one with the local ids.
    ComputedTokens {
        /// Tokens the local side already holds.
        computed_tokens: u64,
        /// Tokens per logical block.
        tokens_per_block: u64,
    },
    /// The connectors' own rule when they do not pass the count: a local
    /// list shorter than the remote one pairs with the remote list's tail
    /// (`remote_ids[-len(local_ids):]`). A longer local list is an error.
    TrimRemoteHead,
}

/// One planned request's inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlanRequest<'a> {
    /// Local logical block ids.
    pub local_ids: &'a [u64],
    /// Remote logical block ids.
    pub remote_ids: &'a [u64],
    /// What the local side already holds.
    pub prefix: PrefixHit,
    /// `n`, pulls per decode rank (1 when the two sides hold the same heads).
    pub pulls: u64,
    /// `o`, which `1/n` slice of the split side's block this transfer fills.
    pub offset_index: u64,
    /// Which side's block is cut into slices.
    pub split: SplitSide,
}

impl<'a> PlanRequest<'a> {
    /// A one-to-one copy: no prefix hit, one pull, offset 0.
    pub fn new(local_ids: &'a [u64], remote_ids: &'a [u64]) -> Self {
        PlanRequest {
            local_ids,
            remote_ids,
            prefix: PrefixHit::None,
            pulls: 1,
            offset_index: 0,
            split: SplitSide::Local,
        }
    }

    /// Sets `n` and `o` (see the field docs).
    pub fn with_pulls(mut self, pulls: u64, offset_index: u64) -> Self {
        self.pulls = pulls;
        self.offset_index = offset_index;
        self
    }

    /// Sets the prefix hit.
    pub fn with_prefix(mut self, prefix: PrefixHit) -> Self {
        self.prefix = prefix;
        self
    }

    /// Sets the split side.
    pub fn with_split(mut self, split: SplitSide) -> Self {
        self.split = split;
        self
    }
}

/// One copy: `len` bytes between `local` and `remote`, both absolute
/// addresses (direction is the caller's: a pull reads remote into local).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlannedOp {
    /// Local address.
    pub local: u64,
    /// Remote address.
    pub remote: u64,
    /// Bytes.
    pub len: u64,
}

/// Per-cache constants of one plan.
#[derive(Debug)]
struct CachePlan {
    local: CacheLayout,
    remote: CacheLayout,
    /// Bytes each side contributes per kernel block (`ib`).
    slice: u64,
    local_offset: u64,
    remote_offset: u64,
    /// Whether a run of consecutive ids is one run of consecutive bytes.
    coalesce: bool,
}

/// Plans the copies for one request; see [`plan_blocks_into`].
pub fn plan_blocks(
    local: &SideLayout,
    remote: &SideLayout,
    request: &PlanRequest<'_>,
) -> Result<Vec<PlannedOp>> {
    let prepared = PreparedPlan::new(local, remote, request)?;
    let mut ops = Vec::new();
    // Only an optimisation: a plan too large to reserve up front grows as
    // any Vec does.
    let _ = ops.try_reserve_exact(prepared.op_count());
    prepared.for_each(|op| ops.push(op))?;
    Ok(ops)
}

/// Appends the copies for one request to `ops`, in the connectors' order:
/// for each layer, each cache, each run.
///
/// Rules (COMPAT.md section 2), with `ib = block_len / n` of the split side:
/// - ids pair one to one after the prefix hit is skipped;
/// - with `n == 1`, consecutive pairs where both ids step by +1 form a run,
///   copied as one op when both sides' kernel blocks are back to back
///   (`stride == block_len`), else one op per kernel block; with `n > 1`
///   every kernel block is its own op;
/// - the split side's address is `base + kernel_id * stride + o * ib`, the
///   other side's `base + kernel_id * stride`; the length `ib * kernel blocks`.
///
/// Rejected before anything is appended: `n == 0` or `o >= n`; layer or cache
/// counts that differ; id lists that do not pair; ids beyond `num_blocks`;
/// different scales on the two sides (a kernel block would hold different
/// tokens on each); a split block not divisible by `n`, or an unsplit block
/// that is not exactly `ib` (a copy would spill into the next block).
/// Duplicate ids are copied as often as they appear, like the connectors do.
pub fn plan_blocks_into(
    local: &SideLayout,
    remote: &SideLayout,
    request: &PlanRequest<'_>,
    ops: &mut Vec<PlannedOp>,
) -> Result<()> {
    let prepared = PreparedPlan::new(local, remote, request)?;
    let start_len = ops.len();
    let result = prepared.for_each(|op| ops.push(op));
    if result.is_err() {
        ops.truncate(start_len);
    }
    result
}

/// Hands every op of the plan to `sink`, in [`plan_blocks_into`]'s order,
/// without collecting them: for callers that store ops in their own format
/// (three address arrays, engine ops). To size buffers first, use
/// [`PreparedPlan`] (validates once, then counts and emits).
///
/// The whole request is validated before `sink` first runs, so a rejection
/// means `sink` saw nothing. After validation every address lies inside a
/// checked region, so emission cannot fail; its arithmetic stays checked as
/// a defence, and were a check ever to fire, `sink` would have seen only a
/// prefix of the plan.
pub fn plan_blocks_each(
    local: &SideLayout,
    remote: &SideLayout,
    request: &PlanRequest<'_>,
    sink: impl FnMut(PlannedOp),
) -> Result<()> {
    PreparedPlan::new(local, remote, request)?.for_each(sink)
}

/// How many ops [`plan_blocks_into`] would append for `request`, computed
/// without building them, with the same validation (an `Err` here is the
/// error planning would give).
///
/// Lets a caller size its buffers exactly, or refuse a plan too large to
/// hold, before any op is allocated: a layout with a huge `scale` and
/// padded blocks can ask for far more ops than it has block ids.
pub fn plan_op_count(
    local: &SideLayout,
    remote: &SideLayout,
    request: &PlanRequest<'_>,
) -> Result<usize> {
    Ok(PreparedPlan::new(local, remote, request)?.op_count())
}

/// A validated request: its op count is known, its ops not built yet.
///
/// For callers that size their own buffers: [`PreparedPlan::new`] checks
/// the request once (everything [`plan_blocks_into`] rejects, it rejects),
/// [`PreparedPlan::op_count`] says how many ops there will be, and
/// [`PreparedPlan::for_each`] hands them out, without validating again.
#[derive(Debug)]
pub struct PreparedPlan<'a> {
    local: &'a SideLayout,
    remote: &'a SideLayout,
    pulls: u64,
    offset_index: u64,
    split: SplitSide,
    /// `(local start, remote start, logical blocks)`.
    runs: Vec<(u64, u64, u64)>,
    op_count: usize,
}

impl<'a> PreparedPlan<'a> {
    /// Validates `request` against the two layouts and counts its ops.
    pub fn new(
        local: &'a SideLayout,
        remote: &'a SideLayout,
        request: &PlanRequest<'_>,
    ) -> Result<Self> {
        let (pulls, offset_index) = (request.pulls, request.offset_index);
        if pulls == 0 || offset_index >= pulls {
            return Err(TopologyError::OffsetOutOfRange {
                offset_index,
                pulls,
            });
        }
        if local.layers.len() != remote.layers.len() {
            return Err(TopologyError::LayerCountMismatch {
                local: local.layers.len(),
                remote: remote.layers.len(),
            });
        }
        let local_ids = request.local_ids;
        let remote_ids = pair_remote_ids(local_ids, request.remote_ids, request.prefix)?;
        // One pass finds the runs and whether any id is out of range; the
        // error, naming the first such id, only then.
        let (runs, in_range) = runs(
            local_ids,
            remote_ids,
            pulls,
            local.num_blocks,
            remote.num_blocks,
        );
        if !in_range {
            check_ids(Side::Local, local_ids, local.num_blocks)?;
            check_ids(Side::Remote, remote_ids, remote.num_blocks)?;
        }
        let mut plan = PreparedPlan {
            local,
            remote,
            pulls,
            offset_index,
            split: request.split,
            runs,
            op_count: 0,
        };

        // Every cache checked (and its ops counted) before any op exists:
        // ops: one per run where both sides are contiguous, else one per
        // kernel block.
        let overflow = || TopologyError::Overflow { what: "op count" };
        let blocks: u64 = plan.runs.iter().map(|r| r.2).sum();
        let run_count = u64::try_from(plan.runs.len()).map_err(|_| overflow())?;
        let mut count: u64 = 0;
        for (layer, (local_caches, remote_caches)) in
            local.layers.iter().zip(&remote.layers).enumerate()
        {
            if local_caches.len() != remote_caches.len() {
                return Err(TopologyError::CacheCountMismatch {
                    layer,
                    local: local_caches.len(),
                    remote: remote_caches.len(),
                });
            }
            for (cache, (l, r)) in local_caches.iter().zip(remote_caches).enumerate() {
                check_cache(layer, cache, l, r, pulls, request.split)?;
                let coalesce = pulls == 1 && l.is_byte_contiguous() && r.is_byte_contiguous();
                let per_cache = if coalesce {
                    run_count
                } else {
                    blocks.checked_mul(l.scale).ok_or_else(overflow)?
                };
                count = count.checked_add(per_cache).ok_or_else(overflow)?;
            }
        }
        plan.op_count = usize::try_from(count).map_err(|_| overflow())?;
        Ok(plan)
    }

    /// How many ops [`PreparedPlan::for_each`] hands out.
    pub fn op_count(&self) -> usize {
        self.op_count
    }

    /// Hands every op to `sink`, in [`plan_blocks_into`]'s order (exactly
    /// [`PreparedPlan::op_count`] of them unless an internal check fires,
    /// see [`plan_blocks_each`]).
    pub fn for_each(&self, mut sink: impl FnMut(PlannedOp)) -> Result<()> {
        // Every pair passed `check_cache` in `new`; the layer and cache
        // counts agree, so the flattened lists pair up.
        for (l, r) in self.local.flat.iter().zip(&self.remote.flat) {
            let c = cache_plan(*l, *r, self.pulls, self.offset_index, self.split);
            emit(&c, &self.runs, &mut sink)?;
        }
        Ok(())
    }
}

/// Runs of consecutive ids on both sides, shared by every cache, and
/// whether every id is below its side's block count (the runs are
/// meaningless otherwise). With n > 1 the connectors never merge blocks, so
/// every pair stands alone. The lists have equal lengths (paired first).
fn runs(
    local_ids: &[u64],
    remote_ids: &[u64],
    pulls: u64,
    local_blocks: u64,
    remote_blocks: u64,
) -> (Vec<(u64, u64, u64)>, bool) {
    let n = local_ids.len().min(remote_ids.len());
    let (local_ids, remote_ids) = (&local_ids[..n], &remote_ids[..n]);
    let mut bad = false;
    if pulls != 1 {
        let runs = local_ids
            .iter()
            .zip(remote_ids)
            .map(|(&l, &r)| {
                bad |= (l >= local_blocks) | (r >= remote_blocks);
                (l, r, 1)
            })
            .collect();
        return (runs, !bad);
    }
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    let (Some(&l0), Some(&r0)) = (local_ids.first(), remote_ids.first()) else {
        return (runs, true);
    };
    bad |= (l0 >= local_blocks) | (r0 >= remote_blocks);
    let mut start = 0;
    for i in 1..n {
        let (l, r) = (local_ids[i], remote_ids[i]);
        bad |= (l >= local_blocks) | (r >= remote_blocks);
        // In range, ids are below num_blocks <= u64::MAX, so + 1 cannot
        // wrap; out of range, the runs are dropped. wrapping_add only keeps
        // a check out of the loop.
        if l != local_ids[i - 1].wrapping_add(1) || r != remote_ids[i - 1].wrapping_add(1) {
            runs.push((local_ids[start], remote_ids[start], (i - start) as u64));
            start = i;
        }
    }
    runs.push((local_ids[start], remote_ids[start], (n - start) as u64));
    (runs, !bad)
}

/// The ops of one cache, run by run.
///
/// Validation keeps every address inside a region whose end fits in 64
/// bits, so none of this can overflow; it is checked anyway, as a defence,
/// with the per-cache products computed once.
fn emit(c: &CachePlan, runs: &[(u64, u64, u64)], sink: &mut impl FnMut(PlannedOp)) -> Result<()> {
    if runs.is_empty() {
        return Ok(());
    }
    let overflow = |what| TopologyError::Overflow { what };
    let scale = c.local.scale;
    // Bytes from one logical block to the next on each side, the first
    // kernel block's address at block 0 (offset included), and the bytes
    // of one logical block's slice.
    let local_step = c.local.stride.checked_mul(scale);
    let remote_step = c.remote.stride.checked_mul(scale);
    let local_start = c.local.base.checked_add(c.local_offset);
    let remote_start = c.remote.base.checked_add(c.remote_offset);
    let block_bytes = c.slice.checked_mul(scale);
    let (
        Some(local_step),
        Some(remote_step),
        Some(local_start),
        Some(remote_start),
        Some(block_bytes),
    ) = (
        local_step,
        remote_step,
        local_start,
        remote_start,
        block_bytes,
    )
    else {
        return Err(overflow("block address"));
    };
    let address = |start: u64, step: u64, id: u64| {
        id.checked_mul(step)
            .and_then(|bytes| bytes.checked_add(start))
            .ok_or(overflow("block address"))
    };
    for &(l, r, count) in runs {
        let local = address(local_start, local_step, l)?;
        let remote = address(remote_start, remote_step, r)?;
        if c.coalesce {
            sink(PlannedOp {
                local,
                remote,
                len: block_bytes
                    .checked_mul(count)
                    .ok_or(overflow("run bytes"))?,
            });
            continue;
        }
        // One op per kernel block, each a stride further on both sides.
        // The last block's addresses are checked once; every block's
        // before it is smaller, so the loop's additions cannot wrap.
        let kernels = count.checked_mul(scale).ok_or(overflow("run length"))?;
        let last = kernels - 1; // count >= 1 and scale >= 1
        let local_last = last
            .checked_mul(c.local.stride)
            .and_then(|d| d.checked_add(local));
        let remote_last = last
            .checked_mul(c.remote.stride)
            .and_then(|d| d.checked_add(remote));
        if local_last.is_none() || remote_last.is_none() {
            return Err(overflow("block address"));
        }
        let (mut local, mut remote) = (local, remote);
        for _ in 0..kernels {
            sink(PlannedOp {
                local,
                remote,
                len: c.slice,
            });
            local = local.wrapping_add(c.local.stride);
            remote = remote.wrapping_add(c.remote.stride);
        }
    }
    Ok(())
}

/// Checks one cache pair against the request: the two scales agree, the
/// split block cuts into `pulls` slices, and the other block is one slice.
fn check_cache(
    layer: usize,
    cache: usize,
    local: &CacheLayout,
    remote: &CacheLayout,
    pulls: u64,
    split_on: SplitSide,
) -> Result<()> {
    if local.scale != remote.scale {
        return Err(TopologyError::ScaleMismatch {
            layer,
            cache,
            local: local.scale,
            remote: remote.scale,
        });
    }
    let (split_side, split, other_side, other) = match split_on {
        SplitSide::Local => (Side::Local, local, Side::Remote, remote),
        SplitSide::Remote => (Side::Remote, remote, Side::Local, local),
    };
    if pulls != 1 && split.block_len % pulls != 0 {
        return Err(TopologyError::BlockLenNotDivisible {
            layer,
            cache,
            side: split_side,
            block_len: split.block_len,
            pulls,
        });
    }
    let slice = split_len(split, pulls);
    if other.block_len != slice {
        return Err(TopologyError::BlockLenMismatch {
            layer,
            cache,
            side: other_side,
            expected: slice,
            found: other.block_len,
        });
    }
    Ok(())
}

/// `ib`, a split block's slice (`pulls >= 1`).
fn split_len(split: &CacheLayout, pulls: u64) -> u64 {
    if pulls == 1 {
        split.block_len
    } else {
        split.block_len / pulls
    }
}

/// The constants of a cache pair that passed `check_cache`.
fn cache_plan(
    local: CacheLayout,
    remote: CacheLayout,
    pulls: u64,
    offset_index: u64,
    split_on: SplitSide,
) -> CachePlan {
    let slice = split_len(
        match split_on {
            SplitSide::Local => &local,
            SplitSide::Remote => &remote,
        },
        pulls,
    );
    // offset_index < pulls, so this is below block_len.
    let offset = offset_index * slice;
    let (local_offset, remote_offset) = match split_on {
        SplitSide::Local => (offset, 0),
        SplitSide::Remote => (0, offset),
    };
    CachePlan {
        local,
        remote,
        slice,
        local_offset,
        remote_offset,
        coalesce: pulls == 1 && local.is_byte_contiguous() && remote.is_byte_contiguous(),
    }
}

fn pair_remote_ids<'a>(local: &[u64], remote: &'a [u64], prefix: PrefixHit) -> Result<&'a [u64]> {
    let mismatch = |detail: String| TopologyError::IdCountMismatch {
        local: local.len(),
        remote: remote.len(),
        detail,
    };
    let skip = match prefix {
        PrefixHit::None => 0,
        PrefixHit::TrimRemoteHead => remote.len().checked_sub(local.len()).ok_or_else(|| {
            mismatch("the local list may not be longer than the remote list".into())
        })?,
        PrefixHit::ComputedTokens {
            computed_tokens,
            tokens_per_block,
        } => {
            if tokens_per_block == 0 || computed_tokens % tokens_per_block != 0 {
                return Err(TopologyError::ComputedTokensNotAligned {
                    computed_tokens,
                    tokens_per_block,
                });
            }
            usize::try_from(computed_tokens / tokens_per_block).map_err(|_| {
                mismatch(format!(
                    "{computed_tokens} computed tokens exceed any id list"
                ))
            })?
        }
    };
    let tail = remote.get(skip..).ok_or_else(|| {
        mismatch(format!(
            "{skip} computed blocks are more than the remote list holds"
        ))
    })?;
    if tail.len() != local.len() {
        return Err(mismatch(format!(
            "after skipping {skip} computed blocks, {} remote ids remain",
            tail.len()
        )));
    }
    Ok(tail)
}

fn check_ids(side: Side, ids: &[u64], num_blocks: u64) -> Result<()> {
    // One branch-free pass (it vectorises); the position only on failure.
    if !ids.iter().fold(false, |bad, &id| bad | (id >= num_blocks)) {
        return Ok(());
    }
    match ids.iter().enumerate().find(|&(_, &id)| id >= num_blocks) {
        Some((position, &id)) => Err(TopologyError::BlockIdOutOfRange {
            side,
            id,
            position,
            num_blocks,
        }),
        None => Ok(()),
    }
}
