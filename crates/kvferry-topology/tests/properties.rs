//! Property tests: the guarantees a connector relies on, over shapes and
//! layouts well beyond the COMPAT.md grid (non-powers of two included).
//!
//! Head coverage is defined from COMPAT.md section 3: rank `r` of a TP group
//! of size `tp` holds `rank_heads(tp, H, r)`; a decode block is `n` slices,
//! slice `o` filled by the `o`-th entry of each stage's chunk of the pull list
//! (or, pushing, by the prefill rank whose offset index is `o`). Covered
//! exactly once means: per stage, the slices' heads, in slice order, are the
//! decode rank's heads, no more, no fewer, no repeats.

mod common;

use std::collections::BTreeSet;

use common::SplitMix;
use kvferry_topology::{
    Attention, CacheLayout, PdShape, PlanRequest, PlannedOp, PrefixHit, PullMapping, PushMapping,
    SideLayout, SplitSide, plan_blocks, plan_blocks_each, plan_op_count, rank_heads,
    seed_for_request,
};
use proptest::prelude::*;

fn sizes() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64])
}

fn shape() -> impl Strategy<Value = PdShape> {
    (
        sizes(),
        sizes(),
        1usize..=3,
        sizes(),
        prop::sample::select(vec![Attention::Gqa, Attention::Mla, Attention::Sparse]),
    )
        .prop_map(|(a, b, s, h, kind)| PdShape::new(a.max(b), a.min(b), s, h, kind))
}

fn heads(tp: usize, shape: &PdShape, rank: usize) -> Vec<usize> {
    rank_heads(tp, shape.layout_heads(), rank)
        .expect("accepted shapes shard their heads")
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn pull_covers_every_decode_head_exactly_once(shape in shape(), request_id in "\\PC{0,16}") {
        let Ok(mapping) = PullMapping::new(shape) else { return Ok(()); };
        let (p, d, stages) = (shape.prefill_tp, shape.decode_tp, shape.prefill_pp);
        let n = mapping.pulls_per_rank();
        let lists = mapping.pull_ranks(&request_id).expect("lists");
        prop_assert_eq!(lists.len(), d);
        for (i, list) in lists.iter().enumerate() {
            prop_assert_eq!(list.len(), n * stages, "decode rank {}", i);
            for (s, chunk) in list.chunks(n).enumerate() {
                let mut filled = Vec::new();
                for &rank in chunk {
                    prop_assert!(rank < p * stages);
                    prop_assert_eq!(mapping.pp_stage(rank), s);
                    filled.extend(heads(p, &shape, rank % p));
                }
                // Under MLA and sparse every rank holds the one latent cache.
                prop_assert_eq!(filled, heads(d, &shape, i), "decode rank {} stage {}", i, s);
            }
        }
    }

    #[test]
    fn prefill_union_equals_union_of_decode_lists(shape in shape(), request_id in "\\PC{0,16}") {
        let Ok(mapping) = PullMapping::new(shape) else { return Ok(()); };
        let lists = mapping.pull_ranks(&request_id).expect("lists");
        let mut seen = BTreeSet::new();
        for list in &lists {
            for &rank in list {
                // No prefill rank serves two decode ranks.
                prop_assert!(seen.insert(rank), "rank {} pulled twice", rank);
            }
        }
        let union = mapping.pulled_prefill_ranks(&request_id).expect("union");
        prop_assert_eq!(union.len(), mapping.pulled_prefill_rank_count());
        prop_assert_eq!(union, seen.iter().copied().collect::<Vec<_>>());
        prop_assert!(lists.iter().all(|l| l.len() == mapping.pull_list_len()));
        for rank in 0..shape.prefill_tp * shape.prefill_pp {
            let expected = lists.iter().position(|l| l.contains(&rank));
            prop_assert_eq!(mapping.decode_rank_pulling_from(&request_id, rank).expect("ok"), expected);
        }
        prop_assert_eq!(
            mapping.pull_ranks_for_seed(seed_for_request(&request_id)).expect("lists"),
            lists
        );
    }

    #[test]
    fn push_covers_every_decode_head_exactly_once(shape in shape(), q in any::<u64>()) {
        let Ok(mapping) = PushMapping::new(shape) else { return Ok(()); };
        let (p, d) = (shape.prefill_tp, shape.decode_tp);
        let mut received: Vec<Vec<(u64, usize)>> = vec![Vec::new(); d];
        for rank in 0..p {
            let target = mapping.push_targets(q, rank).expect("targets");
            for &decode in &target.decode_ranks {
                received[decode].push((target.offset_index, rank));
            }
        }
        for (decode, mut sources) in received.into_iter().enumerate() {
            sources.sort();
            let offsets: Vec<u64> = sources.iter().map(|s| s.0).collect();
            prop_assert_eq!(offsets, (0..sources.len() as u64).collect::<Vec<_>>(), "decode {}", decode);
            let filled: Vec<usize> = sources.iter().flat_map(|&(_, rank)| heads(p, &shape, rank)).collect();
            prop_assert_eq!(filled, heads(d, &shape, decode), "decode {}", decode);
        }
    }

    #[test]
    fn plans_stay_in_regions_and_cover_exactly_the_requested_bytes(seed in any::<u64>()) {
        check_plan(seed)?;
    }
}

struct PlanCase {
    local: SideLayout,
    remote: SideLayout,
    local_ids: Vec<u64>,
    remote_ids: Vec<u64>,
    prefix: PrefixHit,
    pulls: u64,
    offset: u64,
    split: SplitSide,
}

/// Ids with long +1 runs, occasional jumps, and reorderings.
fn ids(g: &mut SplitMix, count: usize, num_blocks: u64) -> Vec<u64> {
    let mut pool: Vec<u64> = (0..num_blocks).collect();
    if g.below(3) == 0 {
        for i in (1..pool.len()).rev() {
            pool.swap(i, g.below(i as u64 + 1) as usize);
        }
        pool.truncate(count);
        return pool;
    }
    // Sorted ids with gaps: drop random ids from the front part.
    let mut out = Vec::with_capacity(count);
    let mut next = g.below(num_blocks - count as u64 + 1);
    while out.len() < count {
        out.push(next);
        let left = count - out.len();
        let room = num_blocks - next - 1 - left as u64;
        next += 1 + if room > 0 && g.below(4) == 0 {
            g.below(room.min(3) + 1)
        } else {
            0
        };
    }
    out
}

fn make_case(seed: u64) -> PlanCase {
    let mut g = SplitMix(seed);
    let pulls = *g.pick(&[1u64, 1, 2, 4]);
    let offset = g.below(pulls);
    let split = if g.below(3) == 0 {
        SplitSide::Remote
    } else {
        SplitSide::Local
    };
    let layers = 1 + g.below(3) as usize;
    let caches = 1 + g.below(2) as usize;
    let local_blocks = 1 + g.below(40);
    let remote_blocks = 1 + g.below(40);
    let mut next_base = 0x10_0000u64;
    let mut layout = |g: &mut SplitMix, block_len: u64, scale: u64, blocks: u64| {
        let stride = block_len + *g.pick(&[0, 0, 0, 8, block_len]);
        let base = next_base;
        next_base += stride * scale * blocks + 4096 + g.below(4096);
        CacheLayout {
            base,
            block_len,
            stride,
            scale,
        }
    };
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    for _ in 0..layers {
        let (mut l, mut r) = (Vec::new(), Vec::new());
        for _ in 0..caches {
            let slice = 16 * (1 + g.below(4));
            let scale = 1 + g.below(3);
            let (local_len, remote_len) = match split {
                SplitSide::Local => (slice * pulls, slice),
                SplitSide::Remote => (slice, slice * pulls),
            };
            l.push(layout(&mut g, local_len, scale, local_blocks));
            r.push(layout(&mut g, remote_len, scale, remote_blocks));
        }
        local.push(l);
        remote.push(r);
    }
    let count = g.below(local_blocks.min(remote_blocks) + 1) as usize;
    let skip = g.below(remote_blocks - count as u64 + 1) as usize;
    let (prefix, remote_count) = match g.below(3) {
        0 => (PrefixHit::None, count),
        1 => (PrefixHit::TrimRemoteHead, count + skip),
        _ => (
            PrefixHit::ComputedTokens {
                computed_tokens: skip as u64 * 16,
                tokens_per_block: 16,
            },
            count + skip,
        ),
    };
    PlanCase {
        local: SideLayout::new(local_blocks, local).expect("valid layout"),
        remote: SideLayout::new(remote_blocks, remote).expect("valid layout"),
        local_ids: ids(&mut g, count, local_blocks),
        remote_ids: ids(&mut g, remote_count, remote_blocks),
        prefix,
        pulls,
        offset,
        split,
    }
}

fn check_plan(seed: u64) -> Result<(), TestCaseError> {
    let c = make_case(seed);
    let request = PlanRequest::new(&c.local_ids, &c.remote_ids)
        .with_prefix(c.prefix)
        .with_pulls(c.pulls, c.offset)
        .with_split(c.split);
    let ops = plan_blocks(&c.local, &c.remote, &request).expect("valid request");
    prop_assert_eq!(
        plan_op_count(&c.local, &c.remote, &request).expect("valid request"),
        ops.len()
    );
    let mut streamed = Vec::new();
    plan_blocks_each(&c.local, &c.remote, &request, |op| streamed.push(op)).expect("valid");
    prop_assert_eq!(&streamed, &ops);
    let paired_remote = &c.remote_ids[c.remote_ids.len() - c.local_ids.len()..];

    // Expected: one (local, remote) slice pair per layer, cache, id pair and
    // kernel block, straight from the COMPAT.md formulas.
    let mut expected = Vec::new();
    for (lc, rc) in c.local.layers().iter().zip(c.remote.layers()) {
        for (l, r) in lc.iter().zip(rc) {
            let (split_len, other_len) = match c.split {
                SplitSide::Local => (l.block_len, r.block_len),
                SplitSide::Remote => (r.block_len, l.block_len),
            };
            let slice = split_len / c.pulls;
            prop_assert_eq!(slice, other_len);
            let (lo, ro) = match c.split {
                SplitSide::Local => (c.offset * slice, 0),
                SplitSide::Remote => (0, c.offset * slice),
            };
            for (&li, &ri) in c.local_ids.iter().zip(paired_remote) {
                for k in 0..l.scale {
                    expected.push((
                        l.base + (li * l.scale + k) * l.stride + lo,
                        r.base + (ri * r.scale + k) * r.stride + ro,
                        slice,
                    ));
                }
            }
        }
    }

    // Actual: every op inside the same layer/cache region on both sides, cut
    // back into slices.
    let mut actual = Vec::new();
    let mut previous: Option<(PlannedOp, (usize, usize))> = None;
    for op in &ops {
        let located = locate(&c.local, op.local, op.len);
        prop_assert!(located.is_some(), "op {:?} leaves every local region", op);
        let (layer, cache) = located.expect("checked");
        let remote_region = c.remote.region(layer, cache).expect("same shape");
        prop_assert!(
            remote_region.start <= op.remote && op.remote + op.len <= remote_region.end,
            "op {:?} leaves remote region {:?}",
            op,
            remote_region
        );
        let l = c.local.layers()[layer][cache];
        let r = c.remote.layers()[layer][cache];
        let slice = match c.split {
            SplitSide::Local => r.block_len,
            SplitSide::Remote => l.block_len,
        };
        prop_assert!(
            op.len > 0 && op.len % slice == 0,
            "op {:?}, slice {}",
            op,
            slice
        );
        for j in 0..op.len / slice {
            actual.push((op.local + j * slice, op.remote + j * slice, slice));
        }
        // Maximal coalescing: where merging is allowed, two consecutive ops of
        // one cache are never byte-adjacent on both sides.
        if let Some((prev, at)) = previous {
            let mergeable = c.pulls == 1 && l.stride == l.block_len && r.stride == r.block_len;
            if mergeable && at == (layer, cache) {
                prop_assert!(
                    !(prev.local + prev.len == op.local && prev.remote + prev.len == op.remote),
                    "ops {:?} and {:?} should have been one",
                    prev,
                    op
                );
            }
        }
        previous = Some((*op, (layer, cache)));
    }
    expected.sort_unstable();
    actual.sort_unstable();
    prop_assert_eq!(actual, expected);
    Ok(())
}

/// The (layer, cache) whose local region holds `[addr, addr + len)`.
fn locate(layout: &SideLayout, addr: u64, len: u64) -> Option<(usize, usize)> {
    for (layer, caches) in layout.layers().iter().enumerate() {
        for cache in 0..caches.len() {
            let region = layout.region(layer, cache)?;
            if region.start <= addr && addr + len <= region.end {
                return Some((layer, cache));
            }
        }
    }
    None
}
