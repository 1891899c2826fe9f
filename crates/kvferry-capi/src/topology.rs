//! Rank mapping and block planning (the `kvferry-topology` crate) through
//! the C ABI, and `kvf_transfer_blocks`, which plans a request's blocks and
//! moves them in one call, so a caller passes two short id arrays instead of
//! three long address arrays.
//!
//! Every rule is COMPAT.md sections 2 and 3; the answers agree bit for bit
//! with the vllm-ascend connectors. Rejections of the topology crate are
//! `KVF_STATUS_INVALID_ARGUMENT` with its message (which names the values at
//! fault) as the last error.
//!
//! Arrays the library fills follow one convention: the caller passes the
//! array and its capacity in elements; the call writes the number of
//! elements needed to an out-parameter on success and on
//! `KVF_STATUS_BUFFER_TOO_SMALL` (then nothing else is written). A NULL array
//! with capacity 0 is the size query.

use std::ffi::c_char;

use kvferry_core::{Error, Op, Status};
use kvferry_topology::{
    Attention, CacheLayout, PdShape, PlanRequest, PrefixHit, PreparedPlan, PullMapping,
    PushMapping, SideLayout, SplitSide, TopologyError, seed_for_request,
};

use crate::boundary::{buffer_too_small, ffi};
use crate::engine::kvf_engine;
use crate::handle;
use crate::transfer::transfer_target;

/// `kvf_pd_shape.attention`: grouped-query (or multi-head) attention, heads
/// sharded over TP ranks.
pub const KVF_ATTENTION_GQA: u32 = 0;
/// `kvf_pd_shape.attention`: multi-head latent attention (the head count is ignored).
pub const KVF_ATTENTION_MLA: u32 = 1;
/// `kvf_pd_shape.attention`: sparse attention (replicas chosen as under MLA,
/// pulls per rank from the head count).
pub const KVF_ATTENTION_SPARSE: u32 = 2;

/// `kvf_plan_options.split`: the local block holds `pulls` remote blocks
/// side by side (a decode rank pulling from `pulls` prefill ranks).
pub const KVF_SPLIT_LOCAL: u32 = 0;
/// `kvf_plan_options.split`: the remote block holds `pulls` local blocks (a
/// prefill rank pushing its slice into a larger decode block).
pub const KVF_SPLIT_REMOTE: u32 = 1;

/// `kvf_plan_options.prefix`: nothing computed locally; the id arrays pair
/// one to one and have equal lengths.
pub const KVF_PREFIX_NONE: u32 = 0;
/// `kvf_plan_options.prefix`: the local side already holds the first
/// `computed_tokens` tokens (a multiple of `tokens_per_block`); the first
/// `computed_tokens / tokens_per_block` remote ids are skipped and the rest
/// pair one to one with the local ids.
pub const KVF_PREFIX_COMPUTED_TOKENS: u32 = 1;
/// `kvf_plan_options.prefix`: the connectors' own rule: a shorter local
/// array pairs with the tail of the remote array.
pub const KVF_PREFIX_TRIM_REMOTE_HEAD: u32 = 2;

/// The largest TP size, PP size or head count a `kvf_pd_shape` may hold.
/// Larger values are `KVF_STATUS_INVALID_ARGUMENT`: no deployment comes
/// near it, and the bound keeps every rank below 2^32 and every internal
/// table small.
pub const KVF_TOPOLOGY_MAX_SIZE: u32 = 65536;

/// A prefill/decode deployment (one DP rank each, no context parallelism).
/// A plain value: nothing is checked until a call uses it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvf_pd_shape {
    /// Prefill tensor-parallel size `P`.
    pub prefill_tp: u32,
    /// Decode tensor-parallel size `D` (at most `P`).
    pub decode_tp: u32,
    /// Prefill pipeline stages `S` (at least 1).
    pub prefill_pp: u32,
    /// The model's KV head count `H` (ignored under MLA).
    pub num_kv_heads: u32,
    /// `KVF_ATTENTION_GQA`, `KVF_ATTENTION_MLA` or `KVF_ATTENTION_SPARSE`.
    pub attention: u32,
}

/// Where one cache (K or V; nope or rope under MLA) of one layer lives.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvf_cache_layout {
    /// Address of kernel block 0.
    pub base: u64,
    /// Bytes of one kernel block (at least 1).
    pub block_len: u64,
    /// Bytes from one kernel block to the next (at least `block_len`).
    pub stride: u64,
    /// Kernel blocks per logical block (at least 1; the same on both sides).
    pub scale: u64,
}

/// How a request's blocks are cut and paired. Pass NULL for the defaults:
/// one pull, offset 0, `KVF_SPLIT_LOCAL`, `KVF_PREFIX_NONE`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvf_plan_options {
    /// `n`, pulls per decode rank (at least 1): the split side's block is
    /// `n` slices of the other side's block.
    pub pulls: u64,
    /// `o`, which slice this transfer fills (below `pulls`).
    pub offset_index: u64,
    /// `KVF_SPLIT_LOCAL` or `KVF_SPLIT_REMOTE`.
    pub split: u32,
    /// `KVF_PREFIX_NONE`, `KVF_PREFIX_COMPUTED_TOKENS` or `KVF_PREFIX_TRIM_REMOTE_HEAD`.
    pub prefix: u32,
    /// Tokens the local side already holds (`KVF_PREFIX_COMPUTED_TOKENS` only).
    pub computed_tokens: u64,
    /// Tokens per logical block (`KVF_PREFIX_COMPUTED_TOKENS` only).
    pub tokens_per_block: u64,
}

/// One side's KV layout: per layer, per cache, where blocks live. Made by
/// `kvf_layout_new`, freed by `kvf_layout_free`. Immutable, so thread-safe:
/// any number of calls may use one layout at once (except `kvf_layout_free`,
/// which must be the last call).
#[derive(Debug)]
pub struct kvf_layout {
    _private: [u8; 0],
}

fn topology_error(e: TopologyError) -> Error {
    Error::InvalidArgument {
        what: e.to_string(),
    }
}

/// Reads and checks a shape (the integers; the rules are the crate's).
///
/// # Safety
/// `p` is NULL or points to a readable `kvf_pd_shape`.
unsafe fn shape_arg(p: *const kvf_pd_shape) -> Result<PdShape, Error> {
    // SAFETY: forwarded to the caller; every field is a plain integer.
    let raw = unsafe { handle::struct_arg(p, "shape") }?;
    let attention = match raw.attention {
        KVF_ATTENTION_GQA => Attention::Gqa,
        KVF_ATTENTION_MLA => Attention::Mla,
        KVF_ATTENTION_SPARSE => Attention::Sparse,
        other => {
            return Err(Error::InvalidArgument {
                what: format!(
                    "attention {other}: expected KVF_ATTENTION_GQA (0), KVF_ATTENTION_MLA (1) or KVF_ATTENTION_SPARSE (2)"
                ),
            });
        }
    };
    for (what, value) in [
        ("prefill_tp", raw.prefill_tp),
        ("decode_tp", raw.decode_tp),
        ("prefill_pp", raw.prefill_pp),
        ("num_kv_heads", raw.num_kv_heads),
    ] {
        if value > KVF_TOPOLOGY_MAX_SIZE {
            return Err(Error::InvalidArgument {
                what: format!(
                    "{what} {value} exceeds KVF_TOPOLOGY_MAX_SIZE ({KVF_TOPOLOGY_MAX_SIZE})"
                ),
            });
        }
    }
    // u32 -> usize is lossless on every platform this library builds for.
    let size = |v: u32| v as usize;
    Ok(PdShape::new(
        size(raw.prefill_tp),
        size(raw.decode_tp),
        size(raw.prefill_pp),
        size(raw.num_kv_heads),
        attention,
    ))
}

/// Ranks and counts as the C ABI hands them out. Shapes are bounded by
/// `KVF_TOPOLOGY_MAX_SIZE`, so every rank (below `P * S <= 2^32`) fits.
fn to_u32(value: usize) -> Result<u32, Error> {
    u32::try_from(value).map_err(|_| Error::Internal {
        what: format!("{value} does not fit 32 bits"),
    })
}

/// `n`, the number of prefill ranks each decode rank pulls from per stage,
/// in `*out_pulls`: 1 under MLA, else `max(1, H/D) / max(1, H/P)`. The shape
/// must be one the pull mapping accepts (`kvf_topology_pull_ranks`).
///
/// # Safety
/// `shape` NULL or readable; `out_pulls` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_topology_pulls_per_rank(
    shape: *const kvf_pd_shape,
    out_pulls: *mut u32,
) -> Status {
    ffi!({
        handle::need_out(out_pulls, "out_pulls")?;
        // SAFETY: forwarded to the caller.
        let shape = unsafe { shape_arg(shape) }?;
        let mapping = PullMapping::new(shape).map_err(topology_error)?;
        let pulls = to_u32(mapping.pulls_per_rank())?;
        // SAFETY: checked non-NULL above; writable (caller's promise).
        unsafe { handle::out(out_pulls, "out_pulls", pulls) }?;
        Ok(Status::Ok)
    })
}

/// The seed the connectors derive from a request id (the first 8 bytes of
/// SHA-256 over its UTF-8 bytes, little-endian) in `*out_seed`.
///
/// # Safety
/// `request_id` NULL or NUL-terminated; `out_seed` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_topology_request_seed(
    request_id: *const c_char,
    out_seed: *mut u64,
) -> Status {
    ffi!({
        handle::need_out(out_seed, "out_seed")?;
        // SAFETY: forwarded to the caller.
        let request_id = unsafe { handle::str_arg(request_id, "request_id") }?;
        // SAFETY: checked non-NULL above; writable (caller's promise).
        unsafe { handle::out(out_seed, "out_seed", seed_for_request(request_id)) }?;
        Ok(Status::Ok)
    })
}

/// The prefill ranks every decode rank pulls from for `request_id` (the
/// remote, i.e. prefill-side, request id, as the connectors hash it).
///
/// Decode rank `i`'s list is `ranks[offsets[i] .. offsets[i + 1]]`: stage 0's
/// `n` ranks, then stage 1's, and so on; the `j`-th entry fills head slice
/// `j % n` and belongs to stage `rank / P`. Global prefill rank
/// `stage * P + tp_rank` is also the port offset.
///
/// `*out_num_ranks` (`D * n * S`) and `*out_num_offsets` (`D + 1`) are written
/// on success and on `KVF_STATUS_BUFFER_TOO_SMALL`; pass NULL arrays with
/// capacity 0 to ask for them.
///
/// # Safety
/// `shape` NULL or readable; `request_id` NULL or NUL-terminated; each array
/// NULL or writable for its capacity; each out-pointer NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_topology_pull_ranks(
    shape: *const kvf_pd_shape,
    request_id: *const c_char,
    ranks: *mut u32,
    ranks_capacity: usize,
    out_num_ranks: *mut usize,
    offsets: *mut usize,
    offsets_capacity: usize,
    out_num_offsets: *mut usize,
) -> Status {
    ffi!({
        handle::need_out(out_num_ranks, "out_num_ranks")?;
        handle::need_out(out_num_offsets, "out_num_offsets")?;
        // SAFETY: forwarded to the caller.
        let shape = unsafe { shape_arg(shape) }?;
        // SAFETY: forwarded to the caller.
        let request_id = unsafe { handle::str_arg(request_id, "request_id") }?;
        let mapping = PullMapping::new(shape).map_err(topology_error)?;
        let decode = shape.decode_tp;
        let needed_ranks =
            decode
                .checked_mul(mapping.pull_list_len())
                .ok_or_else(|| Error::InvalidArgument {
                    what: format!("the pull lists of {shape} do not fit in memory"),
                })?;
        let needed_offsets = decode + 1;
        if ranks_capacity < needed_ranks || offsets_capacity < needed_offsets {
            // SAFETY: both checked non-NULL above; writable (caller's promise).
            unsafe { handle::out(out_num_ranks, "out_num_ranks", needed_ranks) }?;
            // SAFETY: as above.
            unsafe { handle::out(out_num_offsets, "out_num_offsets", needed_offsets) }?;
            return Ok(if ranks_capacity < needed_ranks {
                buffer_too_small("ranks", needed_ranks, ranks_capacity)
            } else {
                buffer_too_small("offsets", needed_offsets, offsets_capacity)
            });
        }
        handle::check_out_array(ranks, ranks_capacity, needed_ranks, "ranks")?;
        handle::check_out_array(offsets, offsets_capacity, needed_offsets, "offsets")?;

        let lists = mapping.pull_ranks(request_id).map_err(topology_error)?;
        let mut flat = Vec::with_capacity(needed_ranks);
        let mut starts = Vec::with_capacity(needed_offsets);
        starts.push(0);
        for list in &lists {
            for &rank in list {
                flat.push(to_u32(rank)?);
            }
            starts.push(flat.len());
        }
        // SAFETY: forwarded to the caller (both arrays).
        unsafe { handle::write_array(ranks, ranks_capacity, &flat, "ranks") }?;
        // SAFETY: as above.
        unsafe { handle::write_array(offsets, offsets_capacity, &starts, "offsets") }?;
        // SAFETY: both checked non-NULL above; writable (caller's promise).
        unsafe { handle::out(out_num_ranks, "out_num_ranks", flat.len()) }?;
        // SAFETY: as above.
        unsafe { handle::out(out_num_offsets, "out_num_offsets", starts.len()) }?;
        Ok(Status::Ok)
    })
}

/// The union of all decode ranks' pull lists for `request_id`, ascending:
/// the global prefill ranks that will be read, so a prefill rank knows
/// whether to wait for a reader. `*out_num_ranks` is written on success and
/// on `KVF_STATUS_BUFFER_TOO_SMALL`.
///
/// # Safety
/// As `kvf_topology_pull_ranks`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_topology_prefill_union(
    shape: *const kvf_pd_shape,
    request_id: *const c_char,
    ranks: *mut u32,
    capacity: usize,
    out_num_ranks: *mut usize,
) -> Status {
    ffi!({
        handle::need_out(out_num_ranks, "out_num_ranks")?;
        // SAFETY: forwarded to the caller.
        let shape = unsafe { shape_arg(shape) }?;
        // SAFETY: forwarded to the caller.
        let request_id = unsafe { handle::str_arg(request_id, "request_id") }?;
        let mapping = PullMapping::new(shape).map_err(topology_error)?;
        let needed = mapping.pulled_prefill_rank_count();
        if capacity < needed {
            // SAFETY: checked non-NULL above; writable (caller's promise).
            unsafe { handle::out(out_num_ranks, "out_num_ranks", needed) }?;
            return Ok(buffer_too_small("ranks", needed, capacity));
        }
        handle::check_out_array(ranks, capacity, needed, "ranks")?;
        let union = mapping
            .pulled_prefill_ranks(request_id)
            .map_err(topology_error)?
            .into_iter()
            .map(to_u32)
            .collect::<Result<Vec<u32>, Error>>()?;
        // SAFETY: forwarded to the caller.
        unsafe { handle::write_array(ranks, capacity, &union, "ranks") }?;
        // SAFETY: checked non-NULL above; writable (caller's promise).
        unsafe { handle::out(out_num_ranks, "out_num_ranks", union.len()) }?;
        Ok(Status::Ok)
    })
}

/// The layerwise connector's push mapping: the decode ranks prefill TP rank
/// `prefill_rank` writes to for the request at position `request_index` of
/// the step's batch (ascending; none when its replica group is not active
/// for this request), and in `*out_offset_index` where its bytes go inside
/// the decode block, in units of the prefill block length.
/// `*out_num_ranks` is written on success and on `KVF_STATUS_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `shape` NULL or readable; `decode_ranks` NULL or writable for `capacity`
/// elements; each out-pointer NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_topology_push_targets(
    shape: *const kvf_pd_shape,
    request_index: u64,
    prefill_rank: u32,
    decode_ranks: *mut u32,
    capacity: usize,
    out_num_ranks: *mut usize,
    out_offset_index: *mut u64,
) -> Status {
    ffi!({
        handle::need_out(out_num_ranks, "out_num_ranks")?;
        handle::need_out(out_offset_index, "out_offset_index")?;
        // SAFETY: forwarded to the caller.
        let shape = unsafe { shape_arg(shape) }?;
        let mapping = PushMapping::new(shape).map_err(topology_error)?;
        let target = mapping
            .push_targets(request_index, prefill_rank as usize)
            .map_err(topology_error)?;
        let needed = target.decode_ranks.len();
        if capacity < needed {
            // SAFETY: checked non-NULL above; writable (caller's promise).
            unsafe { handle::out(out_num_ranks, "out_num_ranks", needed) }?;
            return Ok(buffer_too_small("decode_ranks", needed, capacity));
        }
        let ranks = target
            .decode_ranks
            .iter()
            .map(|&r| to_u32(r))
            .collect::<Result<Vec<u32>, Error>>()?;
        // SAFETY: forwarded to the caller.
        unsafe { handle::write_array(decode_ranks, capacity, &ranks, "decode_ranks") }?;
        // SAFETY: checked non-NULL above; writable (caller's promise).
        unsafe { handle::out(out_num_ranks, "out_num_ranks", needed) }?;
        // SAFETY: checked non-NULL above; writable (caller's promise).
        unsafe { handle::out(out_offset_index, "out_offset_index", target.offset_index) }?;
        Ok(Status::Ok)
    })
}

/// Creates a layout in `*out`: `num_layers` layers of `caches_per_layer`
/// caches each, every cache holding `num_blocks` logical blocks.
/// `caches` holds `num_layers * caches_per_layer` entries, layer-major
/// (layer 0's caches, then layer 1's, ...); it is copied.
///
/// Each cache's region `base .. base + stride * scale * num_blocks` must fit
/// in 64 bits; planning keeps every copy inside it. Zero layers or caches,
/// a zero `block_len` or `scale`, and a `stride` below `block_len` are
/// `KVF_STATUS_INVALID_ARGUMENT`.
///
/// # Safety
/// `caches` NULL or readable for `num_layers * caches_per_layer` entries;
/// `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_layout_new(
    num_blocks: u64,
    num_layers: usize,
    caches_per_layer: usize,
    caches: *const kvf_cache_layout,
    out: *mut *mut kvf_layout,
) -> Status {
    ffi!({
        handle::need_out(out, "out")?;
        if num_layers == 0 || caches_per_layer == 0 {
            return Err(Error::InvalidArgument {
                what: format!(
                    "a layout needs at least one layer and one cache per layer ({num_layers} layers x {caches_per_layer} caches given)"
                ),
            });
        }
        let total =
            num_layers
                .checked_mul(caches_per_layer)
                .ok_or_else(|| Error::InvalidArgument {
                    what: format!("{num_layers} layers x {caches_per_layer} caches overflows"),
                })?;
        // SAFETY: forwarded to the caller.
        let caches = unsafe { handle::slice_arg(caches, total, "caches") }?;
        let layers = caches
            .chunks_exact(caches_per_layer)
            .map(|layer| {
                layer
                    .iter()
                    .map(|c| CacheLayout {
                        base: c.base,
                        block_len: c.block_len,
                        stride: c.stride,
                        scale: c.scale,
                    })
                    .collect()
            })
            .collect();
        let layout = SideLayout::new(num_blocks, layers).map_err(topology_error)?;
        // SAFETY: checked non-NULL above; writable (caller's promise).
        unsafe { handle::out(out, "out", handle::layout_into_raw(layout)) }?;
        Ok(Status::Ok)
    })
}

/// Frees a layout. NULL is a no-op.
///
/// # Safety
/// `layout` is NULL or from `kvf_layout_new`, and no other call on it runs
/// or follows.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_layout_free(layout: *mut kvf_layout) {
    let _ = ffi!({
        // SAFETY: forwarded to the caller.
        unsafe { handle::layout_free(layout) };
        Ok(Status::Ok)
    });
}

/// The inputs of one plan, read and checked.
struct BlockArgs<'a> {
    local: &'a SideLayout,
    remote: &'a SideLayout,
    request: PlanRequest<'a>,
}

impl BlockArgs<'_> {
    /// Validates the plan once; count and ops come from the result.
    fn prepare(&self) -> Result<PreparedPlan<'_>, Error> {
        PreparedPlan::new(self.local, self.remote, &self.request).map_err(topology_error)
    }
}

/// Reads the arguments every planning call shares.
///
/// # Safety
/// As `kvf_plan_blocks`.
unsafe fn block_args<'a>(
    local_layout: *const kvf_layout,
    remote_layout: *const kvf_layout,
    local_ids: *const u64,
    n_local: usize,
    remote_ids: *const u64,
    n_remote: usize,
    options: *const kvf_plan_options,
) -> Result<BlockArgs<'a>, Error> {
    // SAFETY: forwarded to the caller.
    let local_ids = unsafe { handle::slice_arg(local_ids, n_local, "local_ids") }?;
    // SAFETY: as above.
    let remote_ids = unsafe { handle::slice_arg(remote_ids, n_remote, "remote_ids") }?;
    // SAFETY: as above.
    unsafe { block_args_with(local_layout, remote_layout, local_ids, remote_ids, options) }
}

/// `block_args` with the id arrays already read.
///
/// # Safety
/// Layouts and `options` as `kvf_plan_blocks`.
unsafe fn block_args_with<'a>(
    local_layout: *const kvf_layout,
    remote_layout: *const kvf_layout,
    local_ids: &'a [u64],
    remote_ids: &'a [u64],
    options: *const kvf_plan_options,
) -> Result<BlockArgs<'a>, Error> {
    // SAFETY: forwarded to the caller (all three below).
    let local = unsafe { handle::layout(local_layout, "local_layout") }?;
    // SAFETY: as above.
    let remote = unsafe { handle::layout(remote_layout, "remote_layout") }?;
    // SAFETY: as above; every field is a plain integer.
    let options = unsafe { handle::opt_struct_arg(options, "options") }?;
    let mut request = PlanRequest::new(local_ids, remote_ids);
    if let Some(o) = options {
        let split = match o.split {
            KVF_SPLIT_LOCAL => SplitSide::Local,
            KVF_SPLIT_REMOTE => SplitSide::Remote,
            other => {
                return Err(Error::InvalidArgument {
                    what: format!(
                        "split {other}: expected KVF_SPLIT_LOCAL (0) or KVF_SPLIT_REMOTE (1)"
                    ),
                });
            }
        };
        let prefix = match o.prefix {
            KVF_PREFIX_NONE => PrefixHit::None,
            KVF_PREFIX_COMPUTED_TOKENS => PrefixHit::ComputedTokens {
                computed_tokens: o.computed_tokens,
                tokens_per_block: o.tokens_per_block,
            },
            KVF_PREFIX_TRIM_REMOTE_HEAD => PrefixHit::TrimRemoteHead,
            other => {
                return Err(Error::InvalidArgument {
                    what: format!(
                        "prefix {other}: expected KVF_PREFIX_NONE (0), KVF_PREFIX_COMPUTED_TOKENS (1) or KVF_PREFIX_TRIM_REMOTE_HEAD (2)"
                    ),
                });
            }
        };
        request = request
            .with_pulls(o.pulls, o.offset_index)
            .with_split(split)
            .with_prefix(prefix);
    }
    Ok(BlockArgs {
        local,
        remote,
        request,
    })
}

/// Plans the copies that move a request's blocks (COMPAT.md section 2):
/// for each layer, each cache and each run of consecutive ids, op `i` copies
/// `lens[i]` bytes between `local_addrs[i]` and `remote_addrs[i]` (feed them
/// to `kvf_transfer_sync`, or use `kvf_transfer_blocks`). `options` NULL
/// means one pull, offset 0, no prefix hit.
///
/// `*out_num_ops` is written on success and on `KVF_STATUS_BUFFER_TOO_SMALL`
/// (the three arrays share `capacity`); NULL arrays with capacity 0 ask for
/// it. Id arrays that do not pair, ids beyond the layout, layouts of
/// different shapes, block lengths that do not split into `pulls` slices,
/// and bad option values are `KVF_STATUS_INVALID_ARGUMENT` with the reason.
///
/// # Safety
/// Layouts NULL or from `kvf_layout_new`; id arrays NULL or readable for
/// their counts; `options` NULL or readable; the three output arrays NULL or
/// writable for `capacity` elements; `out_num_ops` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_plan_blocks(
    local_layout: *const kvf_layout,
    remote_layout: *const kvf_layout,
    local_ids: *const u64,
    n_local: usize,
    remote_ids: *const u64,
    n_remote: usize,
    options: *const kvf_plan_options,
    local_addrs: *mut u64,
    remote_addrs: *mut u64,
    lens: *mut u64,
    capacity: usize,
    out_num_ops: *mut usize,
) -> Status {
    ffi!({
        handle::need_out(out_num_ops, "out_num_ops")?;
        // SAFETY: forwarded to the caller.
        let args = unsafe {
            block_args(
                local_layout,
                remote_layout,
                local_ids,
                n_local,
                remote_ids,
                n_remote,
                options,
            )
        }?;
        // SAFETY: forwarded to the caller.
        unsafe {
            write_plan(
                &args,
                local_addrs,
                remote_addrs,
                lens,
                capacity,
                out_num_ops,
            )
        }
    })
}

/// Plans `args` once and writes the ops to the caller's three arrays, or
/// the op count alone when they are too small.
///
/// # Safety
/// As the output arrays and `out_num_ops` of `kvf_plan_blocks`
/// (`out_num_ops` checked non-NULL by the caller).
unsafe fn write_plan(
    args: &BlockArgs<'_>,
    local_addrs: *mut u64,
    remote_addrs: *mut u64,
    lens: *mut u64,
    capacity: usize,
    out_num_ops: *mut usize,
) -> Result<Status, Error> {
    let plan = args.prepare()?;
    let count = plan.op_count();
    if capacity < count {
        // SAFETY: checked non-NULL by the caller; writable (caller's promise).
        unsafe { handle::out(out_num_ops, "out_num_ops", count) }?;
        return Ok(buffer_too_small(
            "local_addrs, remote_addrs and lens",
            count,
            capacity,
        ));
    }
    // The plan goes straight into the caller's arrays: no copy of it is
    // ever held here.
    // SAFETY: forwarded to the caller (the three arrays).
    let [la, ra, ln] = unsafe {
        handle::out_arrays(
            [
                (local_addrs, "local_addrs"),
                (remote_addrs, "remote_addrs"),
                (lens, "lens"),
            ],
            capacity,
            count,
        )
    }?;
    let mut slots = la.iter_mut().zip(ra.iter_mut()).zip(ln.iter_mut());
    let mut written = 0;
    plan.for_each(|op| {
        if let Some(((l, r), n)) = slots.next() {
            l.write(op.local);
            r.write(op.remote);
            n.write(op.len);
        }
        written += 1;
    })
    .map_err(topology_error)?;
    // `count` is exactly the number of ops: anything else is a bug.
    if written != count {
        return Err(Error::Internal {
            what: format!("planned {written} ops, {count} counted"),
        });
    }
    // SAFETY: checked non-NULL by the caller; writable (caller's promise).
    unsafe { handle::out(out_num_ops, "out_num_ops", written) }?;
    Ok(Status::Ok)
}

/// One side's ids for `kvf_plan_blocks_spans`: the caller's array, or the
/// span `first .. first + count` (NULL array), built here after checking
/// that it lies inside the layout, so no count allocates beyond it.
///
/// # Safety
/// `ids` NULL or readable for `count` elements.
unsafe fn ids_or_span<'a>(
    ids: *const u64,
    first: u64,
    count: usize,
    layout: (*const kvf_layout, &'static str),
    argument: &'static str,
    storage: &'a mut Vec<u64>,
) -> Result<&'a [u64], Error> {
    if !ids.is_null() {
        if first != 0 {
            return Err(Error::InvalidArgument {
                what: format!(
                    "{argument}: first is {first} with an id array; it must be 0 (first only describes a span: a NULL array)"
                ),
            });
        }
        // SAFETY: forwarded to the caller.
        return unsafe { handle::slice_arg(ids, count, argument) };
    }
    if count == 0 {
        return Ok(&[]);
    }
    // SAFETY: forwarded to the caller (checked again when planning).
    let num_blocks = unsafe { handle::layout(layout.0, layout.1) }?.num_blocks();
    let end = u64::try_from(count)
        .ok()
        .and_then(|n| first.checked_add(n))
        .filter(|&end| end <= num_blocks)
        .ok_or_else(|| Error::InvalidArgument {
            what: format!(
                "{argument}: the span {first} .. {first} + {count} goes beyond the layout's {num_blocks} blocks"
            ),
        })?;
    storage.clear();
    storage.extend(first..end);
    Ok(storage.as_slice())
}

/// `kvf_plan_blocks` where either side's ids may be a span: a NULL id array
/// with a nonzero count means the consecutive ids `first .. first + count`
/// (a caller that holds ids as a range passes two integers instead of an
/// array). With an id array, `first` must be 0. A span must lie inside its
/// layout (`first + count <= num_blocks`), even where a prefix hit would
/// skip part of it. Everything else, outputs included, is `kvf_plan_blocks`.
///
/// # Safety
/// As `kvf_plan_blocks`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_plan_blocks_spans(
    local_layout: *const kvf_layout,
    remote_layout: *const kvf_layout,
    local_ids: *const u64,
    local_first: u64,
    n_local: usize,
    remote_ids: *const u64,
    remote_first: u64,
    n_remote: usize,
    options: *const kvf_plan_options,
    local_addrs: *mut u64,
    remote_addrs: *mut u64,
    lens: *mut u64,
    capacity: usize,
    out_num_ops: *mut usize,
) -> Status {
    ffi!({
        handle::need_out(out_num_ops, "out_num_ops")?;
        let (mut local_span, mut remote_span) = (Vec::new(), Vec::new());
        // SAFETY: forwarded to the caller.
        let local = unsafe {
            ids_or_span(
                local_ids,
                local_first,
                n_local,
                (local_layout, "local_layout"),
                "local_ids",
                &mut local_span,
            )
        }?;
        // SAFETY: forwarded to the caller.
        let remote = unsafe {
            ids_or_span(
                remote_ids,
                remote_first,
                n_remote,
                (remote_layout, "remote_layout"),
                "remote_ids",
                &mut remote_span,
            )
        }?;
        // SAFETY: forwarded to the caller.
        let args = unsafe { block_args_with(local_layout, remote_layout, local, remote, options) }?;
        // SAFETY: forwarded to the caller.
        unsafe {
            write_plan(
                &args,
                local_addrs,
                remote_addrs,
                lens,
                capacity,
                out_num_ops,
            )
        }
    })
}

/// Every argument of `kvf_plan_blocks_spans` in one struct, for
/// `kvf_plan_blocks_call`: a caller whose cost is per argument (Python's
/// ctypes converts each one) passes one pointer instead of fourteen, and
/// may keep the struct between calls, rewriting only what changed.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvf_plan_call {
    /// As `kvf_plan_blocks_spans`.
    pub local_layout: *const kvf_layout,
    /// As `kvf_plan_blocks_spans`.
    pub remote_layout: *const kvf_layout,
    /// Local ids, or NULL for the span `local_first .. local_first + n_local`.
    pub local_ids: *const u64,
    /// First id of a local span (0 with an array).
    pub local_first: u64,
    /// Local id count.
    pub n_local: usize,
    /// Remote ids, or NULL for the span `remote_first .. remote_first + n_remote`.
    pub remote_ids: *const u64,
    /// First id of a remote span (0 with an array).
    pub remote_first: u64,
    /// Remote id count.
    pub n_remote: usize,
    /// As `kvf_plan_blocks` (NULL: the defaults).
    pub options: *const kvf_plan_options,
    /// Output: local address of each op.
    pub local_addrs: *mut u64,
    /// Output: remote address of each op.
    pub remote_addrs: *mut u64,
    /// Output: bytes of each op.
    pub lens: *mut u64,
    /// Capacity of each output array, in elements.
    pub capacity: usize,
    /// Written by the call: the op count, on success and on
    /// `KVF_STATUS_BUFFER_TOO_SMALL`.
    pub num_ops: usize,
}

/// `kvf_plan_blocks_spans(c->local_layout, ..., &c->num_ops)`: the same
/// plan, checks and statuses, with the arguments read from `*call` and the
/// op count written to `call->num_ops`.
///
/// # Safety
/// `call` NULL or valid for reads and writes of a `kvf_plan_call` whose
/// fields satisfy `kvf_plan_blocks_spans`; `num_ops` may not lie inside an
/// output array.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_plan_blocks_call(call: *mut kvf_plan_call) -> Status {
    ffi!({
        // A copy: no reference into `*call` lives while `num_ops` is written.
        // SAFETY: forwarded to the caller; every field is a plain value.
        let c: kvf_plan_call = *unsafe { handle::struct_arg(call, "call") }?;
        // SAFETY: `call` is non-NULL and aligned (checked above); this only
        // takes the field's address.
        let num_ops = unsafe { &raw mut (*call).num_ops };
        // SAFETY: forwarded to the caller (the fields of `*call`).
        Ok(unsafe {
            kvf_plan_blocks_spans(
                c.local_layout,
                c.remote_layout,
                c.local_ids,
                c.local_first,
                c.n_local,
                c.remote_ids,
                c.remote_first,
                c.n_remote,
                c.options,
                c.local_addrs,
                c.remote_addrs,
                c.lens,
                c.capacity,
                num_ops,
            )
        })
    })
}

/// The engine ops of a plan. `None` when there is nothing to move (no ids).
fn engine_ops(args: &BlockArgs<'_>) -> Result<Option<Vec<Op>>, Error> {
    let plan = args.prepare()?;
    let count = plan.op_count();
    if count == 0 {
        return Ok(None);
    }
    // Reserved up front: a refused allocation is an error, not an abort of
    // the host process.
    let mut ops = Vec::new();
    ops.try_reserve_exact(count)
        .map_err(|e| Error::InvalidArgument {
            what: format!("cannot hold a plan of {count} ops: {e}"),
        })?;
    plan.for_each(|o| {
        ops.push(Op {
            local: o.local,
            remote: o.remote,
            len: o.len,
        })
    })
    .map_err(topology_error)?;
    Ok(Some(ops))
}

/// Plans a request's blocks (as `kvf_plan_blocks`) and moves them to or
/// from `session` (as `kvf_transfer_sync`): `KVF_OP_READ` copies the remote
/// blocks into the local ones, `KVF_OP_WRITE` the other way. Returns when
/// every byte has moved, or with the first error. The local layout's memory
/// must be registered with `engine`, the remote layout's with the peer.
/// Nothing moves unless the whole plan is valid. No ids (a full prefix hit)
/// is `KVF_STATUS_OK` with nothing moved.
///
/// # Safety
/// `engine` from `kvf_engine_new`; `session` NULL or NUL-terminated; the
/// rest as `kvf_plan_blocks`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_transfer_blocks(
    engine: *const kvf_engine,
    session: *const c_char,
    opcode: u32,
    local_layout: *const kvf_layout,
    remote_layout: *const kvf_layout,
    local_ids: *const u64,
    n_local: usize,
    remote_ids: *const u64,
    n_remote: usize,
    options: *const kvf_plan_options,
) -> Status {
    ffi!({
        // SAFETY: forwarded to the caller.
        let (e, session, op) = unsafe { transfer_target(engine, session, opcode) }?;
        // SAFETY: forwarded to the caller.
        let args = unsafe {
            block_args(
                local_layout,
                remote_layout,
                local_ids,
                n_local,
                remote_ids,
                n_remote,
                options,
            )
        }?;
        if let Some(ops) = engine_ops(&args)? {
            e.transfer_sync(session, op, &ops)?;
        }
        Ok(Status::Ok)
    })
}

/// Like `kvf_transfer_blocks`, but returns once the plan is validated and
/// started, with its batch id in `*out_batch` (never 0). Follow with
/// `kvf_batch_poll` / `kvf_batch_wait`, then `kvf_batch_free`. No ids is
/// `KVF_STATUS_INVALID_ARGUMENT` here: there would be no batch to track.
///
/// # Safety
/// As `kvf_transfer_blocks`; `out_batch` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_batch_submit_blocks(
    engine: *const kvf_engine,
    session: *const c_char,
    opcode: u32,
    local_layout: *const kvf_layout,
    remote_layout: *const kvf_layout,
    local_ids: *const u64,
    n_local: usize,
    remote_ids: *const u64,
    n_remote: usize,
    options: *const kvf_plan_options,
    out_batch: *mut u64,
) -> Status {
    ffi!({
        handle::need_out(out_batch, "out_batch")?;
        // SAFETY: forwarded to the caller.
        let (e, session, op) = unsafe { transfer_target(engine, session, opcode) }?;
        // SAFETY: forwarded to the caller.
        let args = unsafe {
            block_args(
                local_layout,
                remote_layout,
                local_ids,
                n_local,
                remote_ids,
                n_remote,
                options,
            )
        }?;
        let ops = engine_ops(&args)?.ok_or_else(|| Error::InvalidArgument {
            what: "no blocks to transfer (n_local == 0): a batch needs at least one op; use kvf_transfer_blocks, which accepts an empty request".into(),
        })?;
        let id = e.submit(session, op, &ops)?;
        // SAFETY: checked non-NULL above; writable (caller's promise).
        unsafe { handle::out(out_batch, "out_batch", id.0) }?;
        Ok(Status::Ok)
    })
}
