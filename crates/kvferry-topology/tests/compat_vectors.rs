//! Every worked example and vector in COMPAT.md sections 2 and 3, plus the
//! decisions the crate documents where COMPAT.md is silent.

use kvferry_topology::{
    Attention, CacheLayout, PdShape, PlanRequest, PlannedOp, PrefixHit, PullMapping, PullTarget,
    PushMapping, Side, SideLayout, SplitSide, TopologyError, decode_pull_port, plan_blocks,
    plan_op_count, prefill_worker_port, replica_groups, seed_for_request, side_channel_port,
};

fn pull(p: usize, d: usize, h: usize, kind: Attention, s: usize) -> PullMapping {
    PullMapping::new(PdShape::new(p, d, s, h, kind)).expect("shape accepted")
}

fn push(p: usize, d: usize, h: usize, kind: Attention) -> PushMapping {
    PushMapping::new(PdShape::new(p, d, 1, h, kind)).expect("shape accepted")
}

#[test]
fn seed_vector() {
    assert_eq!(seed_for_request("req-0"), 7_753_214_593_136_781_247);
}

/// P, D, H, attention, S, and the decode rank lists for "req-0".
type PullRow = (usize, usize, usize, Attention, usize, Vec<Vec<usize>>);

#[test]
fn pull_table() {
    use Attention::*;
    let table: [PullRow; 6] = [
        (8, 8, 8, Gqa, 1, (0..8).map(|i| vec![i]).collect()),
        (
            8,
            4,
            8,
            Gqa,
            1,
            vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]],
        ),
        (8, 4, 4, Gqa, 1, vec![vec![1], vec![3], vec![5], vec![7]]),
        (16, 4, 4, Gqa, 1, vec![vec![3], vec![7], vec![11], vec![15]]),
        // MLA ignores the head count ("-" in the table); any value gives the same.
        (8, 4, 0, Mla, 1, vec![vec![6], vec![7], vec![1], vec![0]]),
        (4, 2, 4, Gqa, 2, vec![vec![0, 1, 4, 5], vec![2, 3, 6, 7]]),
    ];
    for (p, d, h, kind, s, expected) in table {
        let mapping = pull(p, d, h, kind, s);
        assert_eq!(
            mapping.pull_ranks("req-0").expect("lists"),
            expected,
            "P{p} D{d} H{h} {kind} S{s}"
        );
    }
    for h in [1, 8, 64] {
        assert_eq!(
            pull(8, 4, h, Mla, 1).pull_ranks("req-0").expect("lists"),
            vec![vec![6], vec![7], vec![1], vec![0]]
        );
    }
}

#[test]
fn pulls_per_rank_formula() {
    use Attention::*;
    assert_eq!(pull(8, 4, 8, Gqa, 1).pulls_per_rank(), 2);
    assert_eq!(pull(8, 4, 4, Gqa, 1).pulls_per_rank(), 1);
    assert_eq!(pull(8, 2, 4, Gqa, 1).pulls_per_rank(), 2);
    assert_eq!(pull(16, 2, 64, Gqa, 1).pulls_per_rank(), 8);
    assert_eq!(pull(32, 1, 64, Mla, 1).pulls_per_rank(), 1);
    assert_eq!(pull(8, 4, 1, Sparse, 1).pulls_per_rank(), 1);
}

#[test]
fn offsets_and_stages() {
    let mapping = pull(4, 2, 4, Attention::Gqa, 2);
    let targets = mapping.pull_targets("req-0", 1).expect("targets");
    let expected: Vec<PullTarget> = [(2, 0, 0), (3, 1, 0), (6, 0, 1), (7, 1, 1)]
        .iter()
        .map(|&(rank, offset, stage)| PullTarget {
            prefill_rank: rank,
            tp_rank: rank % 4,
            pp_stage: stage,
            offset_index: offset,
        })
        .collect();
    assert_eq!(targets, expected);
    assert!(mapping.pull_targets("req-0", 2).is_err());
}

#[test]
fn prefill_side_union() {
    let mapping = pull(16, 4, 4, Attention::Gqa, 1);
    assert_eq!(
        mapping.pulled_prefill_ranks("req-0").expect("union"),
        vec![3, 7, 11, 15]
    );
    assert_eq!(
        mapping.decode_rank_pulling_from("req-0", 11).expect("ok"),
        Some(2)
    );
    assert_eq!(
        mapping.decode_rank_pulling_from("req-0", 10).expect("ok"),
        None
    );
    assert!(mapping.decode_rank_pulling_from("req-0", 16).is_err());
    let mla = pull(8, 4, 1, Attention::Mla, 1);
    assert_eq!(
        mla.pulled_prefill_ranks("req-0").expect("union"),
        vec![0, 1, 6, 7]
    );
    assert_eq!(
        mla.decode_rank_pulling_from("req-0", 1).expect("ok"),
        Some(2)
    );
}

#[test]
fn ports() {
    assert_eq!(side_channel_port(30000, 2, 8, 2).expect("port"), 30032);
    let worker = prefill_worker_port(30032, 1, 8, 3).expect("port");
    assert_eq!(worker, 30043);
    // A decode rank pulling global prefill rank 1*8 + 3 reaches that worker.
    assert_eq!(decode_pull_port(30032, 11).expect("port"), worker);
    assert!(matches!(
        side_channel_port(65000, 100, 8, 1),
        Err(TopologyError::PortOverflow { .. })
    ));
    assert!(decode_pull_port(65535, 1).is_err());
    assert!(prefill_worker_port(1, usize::MAX, 2, 0).is_err());
}

#[test]
fn push_examples() {
    // P8 D4 H8: p -> p/2 at offset (p%2) * block_len, for every request.
    let m = push(8, 4, 8, Attention::Gqa);
    for q in 0..4 {
        for p in 0..8 {
            let t = m.push_targets(q, p).expect("targets");
            assert_eq!(t.decode_ranks, vec![p / 2]);
            assert_eq!(t.offset_index, (p % 2) as u64);
            assert_eq!(t.offset_bytes(4096).expect("bytes"), (p % 2) as u64 * 4096);
        }
    }
    // P8 D2 H4: even q -> {0,2,4,6} send, odd q -> {1,3,5,7}; p -> p/4 at ((p/2)%2).
    let m = push(8, 2, 4, Attention::Gqa);
    for q in 0..4u64 {
        for p in 0..8usize {
            let t = m.push_targets(q, p).expect("targets");
            let sends = (p % 2) as u64 == q % 2;
            let expected = if sends { vec![p / 4] } else { vec![] };
            assert_eq!(t.decode_ranks, expected, "q {q} p {p}");
            if sends {
                assert_eq!(t.offset_index, ((p / 2) % 2) as u64);
            }
        }
    }
    // P8 D4 MLA: even q -> 0..3 send to 0..3, odd q -> 4..7 send to 0..3.
    let m = push(8, 4, 1, Attention::Mla);
    for q in 0..4u64 {
        for p in 0..8usize {
            let t = m.push_targets(q, p).expect("targets");
            let sends = (p / 4) as u64 == q % 2;
            let expected = if sends { vec![p % 4] } else { vec![] };
            assert_eq!(t.decode_ranks, expected, "q {q} p {p}");
            assert_eq!(t.offset_index, 0);
        }
    }
    assert!(m.push_targets(0, 8).is_err());
}

#[test]
fn replica_group_rule() {
    assert_eq!(
        replica_groups(8, 4),
        vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]]
    );
    assert_eq!(replica_groups(2, 4), vec![vec![0, 1]]);
    assert_eq!(
        replica_groups(4, 1),
        vec![vec![0], vec![1], vec![2], vec![3]]
    );
    assert!(replica_groups(0, 4).is_empty());
}

fn one_cache(num_blocks: u64, base: u64, block_len: u64, stride: u64) -> SideLayout {
    SideLayout::new(
        num_blocks,
        vec![vec![CacheLayout {
            base,
            block_len,
            stride,
            scale: 1,
        }]],
    )
    .expect("layout")
}

#[test]
fn plan_examples() {
    // local [2,3,4], remote [7,8,9], n = 1, block_len = stride = 1024.
    let local = one_cache(16, 0x1000, 1024, 1024);
    let remote = one_cache(16, 0x3000, 1024, 1024);
    let ops =
        plan_blocks(&local, &remote, &PlanRequest::new(&[2, 3, 4], &[7, 8, 9])).expect("plan");
    assert_eq!(
        ops,
        vec![PlannedOp {
            local: 0x1000 + 2048,
            remote: 0x3000 + 7168,
            len: 3072
        }]
    );
    // Local stride 2048, remote stride 4096: three 1024-byte ops.
    let local = one_cache(16, 0x1000, 1024, 2048);
    let remote = one_cache(16, 0x3000, 1024, 4096);
    let ops =
        plan_blocks(&local, &remote, &PlanRequest::new(&[2, 3, 4], &[7, 8, 9])).expect("plan");
    let expected: Vec<PlannedOp> = (0..3)
        .map(|i| PlannedOp {
            local: 0x1000 + (2 + i) * 2048,
            remote: 0x3000 + (7 + i) * 4096,
            len: 1024,
        })
        .collect();
    assert_eq!(ops, expected);
}

#[test]
fn plan_runs_cut_where_either_side_jumps() {
    let local = one_cache(32, 0, 100, 100);
    let remote = one_cache(32, 1_000_000, 100, 100);
    let ops = plan_blocks(
        &local,
        &remote,
        &PlanRequest::new(&[10, 11, 12, 14, 15], &[1, 2, 3, 5, 6]),
    )
    .expect("plan");
    assert_eq!(
        ops,
        vec![
            PlannedOp {
                local: 1000,
                remote: 1_000_100,
                len: 300
            },
            PlannedOp {
                local: 1400,
                remote: 1_000_500,
                len: 200
            },
        ]
    );
    // A jump on one side only also cuts.
    let ops =
        plan_blocks(&local, &remote, &PlanRequest::new(&[1, 2, 3], &[1, 2, 4])).expect("plan");
    assert_eq!(ops.len(), 2);
}

#[test]
fn plan_with_pulls_splits_every_block() {
    // n = 2, o = 1: the decode block of 2048 holds two prefill blocks of 1024.
    let local = one_cache(8, 0, 2048, 2048);
    let remote = one_cache(8, 1 << 20, 1024, 1024);
    let ops = plan_blocks(
        &local,
        &remote,
        &PlanRequest::new(&[0, 1], &[4, 5]).with_pulls(2, 1),
    )
    .expect("plan");
    assert_eq!(
        ops,
        vec![
            PlannedOp {
                local: 1024,
                remote: (1 << 20) + 4 * 1024,
                len: 1024
            },
            PlannedOp {
                local: 2048 + 1024,
                remote: (1 << 20) + 5 * 1024,
                len: 1024
            },
        ]
    );
    // Push direction: the remote (decode) block is the split one.
    let ops = plan_blocks(
        &remote,
        &local,
        &PlanRequest::new(&[4], &[0])
            .with_pulls(2, 1)
            .with_split(SplitSide::Remote),
    )
    .expect("plan");
    assert_eq!(
        ops,
        vec![PlannedOp {
            local: (1 << 20) + 4096,
            remote: 1024,
            len: 1024
        }]
    );
}

#[test]
fn plan_scale_expands_logical_blocks() {
    // Two kernel blocks of 512 per logical block, densely packed.
    let layout = |base| {
        SideLayout::new(
            8,
            vec![vec![CacheLayout {
                base,
                block_len: 512,
                stride: 512,
                scale: 2,
            }]],
        )
        .expect("layout")
    };
    let ops = plan_blocks(
        &layout(0),
        &layout(1 << 20),
        &PlanRequest::new(&[1, 2], &[5, 6]),
    )
    .expect("plan");
    assert_eq!(
        ops,
        vec![PlannedOp {
            local: 1024,
            remote: (1 << 20) + 5 * 1024,
            len: 2048
        }]
    );
    // Padded kernel blocks: one op per kernel block.
    let padded = SideLayout::new(
        8,
        vec![vec![CacheLayout {
            base: 0,
            block_len: 512,
            stride: 640,
            scale: 2,
        }]],
    )
    .expect("layout");
    let ops = plan_blocks(&padded, &layout(1 << 20), &PlanRequest::new(&[1], &[5])).expect("plan");
    assert_eq!(
        ops,
        vec![
            PlannedOp {
                local: 2 * 640,
                remote: (1 << 20) + 10 * 512,
                len: 512
            },
            PlannedOp {
                local: 3 * 640,
                remote: (1 << 20) + 11 * 512,
                len: 512
            },
        ]
    );
    let other_scale = SideLayout::new(
        8,
        vec![vec![CacheLayout {
            base: 0,
            block_len: 512,
            stride: 512,
            scale: 1,
        }]],
    )
    .expect("layout");
    assert!(matches!(
        plan_blocks(
            &other_scale,
            &layout(1 << 20),
            &PlanRequest::new(&[1], &[5])
        ),
        Err(TopologyError::ScaleMismatch {
            local: 1,
            remote: 2,
            ..
        })
    ));
}

#[test]
fn plan_prefix_hits() {
    let local = one_cache(64, 0, 64, 64);
    let remote = one_cache(64, 1 << 20, 64, 64);
    let remote_ids = [10, 11, 12, 13, 14];
    // The decode side already computed 2 blocks of 16 tokens.
    let computed = PrefixHit::ComputedTokens {
        computed_tokens: 32,
        tokens_per_block: 16,
    };
    let ops = plan_blocks(
        &local,
        &remote,
        &PlanRequest::new(&[40, 41, 42], &remote_ids).with_prefix(computed),
    )
    .expect("plan");
    assert_eq!(
        ops,
        vec![PlannedOp {
            local: 40 * 64,
            remote: (1 << 20) + 12 * 64,
            len: 192
        }]
    );
    // The connectors' tail trim gives the same pairing without the count.
    let trimmed = plan_blocks(
        &local,
        &remote,
        &PlanRequest::new(&[40, 41, 42], &remote_ids).with_prefix(PrefixHit::TrimRemoteHead),
    )
    .expect("plan");
    assert_eq!(trimmed, ops);
    // Inconsistent counts, partial blocks and longer local lists are errors.
    let wrong = PrefixHit::ComputedTokens {
        computed_tokens: 16,
        tokens_per_block: 16,
    };
    assert!(matches!(
        plan_blocks(
            &local,
            &remote,
            &PlanRequest::new(&[40, 41, 42], &remote_ids).with_prefix(wrong)
        ),
        Err(TopologyError::IdCountMismatch { .. })
    ));
    let partial = PrefixHit::ComputedTokens {
        computed_tokens: 20,
        tokens_per_block: 16,
    };
    assert!(matches!(
        plan_blocks(
            &local,
            &remote,
            &PlanRequest::new(&[40, 41, 42], &remote_ids).with_prefix(partial)
        ),
        Err(TopologyError::ComputedTokensNotAligned { .. })
    ));
    assert!(
        plan_blocks(
            &local,
            &remote,
            &PlanRequest::new(&[1, 2, 3], &[1, 2]).with_prefix(PrefixHit::TrimRemoteHead)
        )
        .is_err()
    );
    // A full prefix hit copies nothing.
    let all = PrefixHit::ComputedTokens {
        computed_tokens: 80,
        tokens_per_block: 16,
    };
    assert!(
        plan_blocks(
            &local,
            &remote,
            &PlanRequest::new(&[], &remote_ids).with_prefix(all)
        )
        .expect("plan")
        .is_empty()
    );
}

#[test]
fn plan_rejections() {
    let local = one_cache(8, 0, 1024, 1024);
    let remote = one_cache(8, 1 << 20, 1024, 1024);
    let plan = |req: PlanRequest<'_>| plan_blocks(&local, &remote, &req);
    assert!(matches!(
        plan(PlanRequest::new(&[1, 2], &[1])),
        Err(TopologyError::IdCountMismatch {
            local: 2,
            remote: 1,
            ..
        })
    ));
    assert!(matches!(
        plan(PlanRequest::new(&[8], &[1])),
        Err(TopologyError::BlockIdOutOfRange {
            side: Side::Local,
            id: 8,
            ..
        })
    ));
    assert!(matches!(
        plan(PlanRequest::new(&[1], &[9])),
        Err(TopologyError::BlockIdOutOfRange {
            side: Side::Remote,
            id: 9,
            ..
        })
    ));
    assert!(matches!(
        plan(PlanRequest::new(&[1], &[1]).with_pulls(2, 2)),
        Err(TopologyError::OffsetOutOfRange { .. })
    ));
    assert!(plan(PlanRequest::new(&[1], &[1]).with_pulls(0, 0)).is_err());
    // n = 2 needs the remote block to be half the local one.
    assert!(matches!(
        plan(PlanRequest::new(&[1], &[1]).with_pulls(2, 0)),
        Err(TopologyError::BlockLenMismatch {
            side: Side::Remote,
            expected: 512,
            found: 1024,
            ..
        })
    ));
    assert!(matches!(
        plan(PlanRequest::new(&[1], &[1]).with_pulls(3, 0)),
        Err(TopologyError::BlockLenNotDivisible { .. })
    ));
    let two_layers =
        SideLayout::new(8, vec![vec![CacheLayout::dense(0, 1024)]; 2]).expect("layout");
    assert!(matches!(
        plan_blocks(&two_layers, &remote, &PlanRequest::new(&[1], &[1])),
        Err(TopologyError::LayerCountMismatch {
            local: 2,
            remote: 1
        })
    ));
    let two_caches =
        SideLayout::new(8, vec![vec![CacheLayout::dense(0, 1024); 2]]).expect("layout");
    assert!(matches!(
        plan_blocks(&two_caches, &remote, &PlanRequest::new(&[1], &[1])),
        Err(TopologyError::CacheCountMismatch {
            layer: 0,
            local: 2,
            remote: 1
        })
    ));
    // Layouts that cannot be valid on their own.
    let bad = |c: CacheLayout| SideLayout::new(4, vec![vec![c]]);
    assert!(
        bad(CacheLayout {
            base: 0,
            block_len: 0,
            stride: 0,
            scale: 1
        })
        .is_err()
    );
    assert!(
        bad(CacheLayout {
            base: 0,
            block_len: 10,
            stride: 5,
            scale: 1
        })
        .is_err()
    );
    assert!(
        bad(CacheLayout {
            base: 0,
            block_len: 10,
            stride: 10,
            scale: 0
        })
        .is_err()
    );
    assert!(
        bad(CacheLayout {
            base: u64::MAX - 10,
            block_len: 10,
            stride: 10,
            scale: 1
        })
        .is_err()
    );
}

#[test]
fn shape_rejections() {
    use Attention::*;
    let err = |p, d, s, h, kind| PullMapping::new(PdShape::new(p, d, s, h, kind)).unwrap_err();
    assert!(matches!(
        err(4, 8, 1, 8, Gqa),
        TopologyError::PrefillSmallerThanDecode { .. }
    ));
    assert!(matches!(
        err(0, 0, 1, 8, Gqa),
        TopologyError::ZeroSize {
            what: "prefill tp",
            ..
        }
    ));
    assert!(matches!(
        err(8, 4, 0, 8, Gqa),
        TopologyError::ZeroSize {
            what: "prefill pp",
            ..
        }
    ));
    assert!(matches!(
        err(8, 4, 1, 0, Gqa),
        TopologyError::ZeroSize {
            what: "num kv heads",
            ..
        }
    ));
    assert!(matches!(
        err(8, 4, 1, 0, Sparse),
        TopologyError::ZeroSize { .. }
    ));
    assert!(matches!(
        err(8, 4, 1, 3, Gqa),
        TopologyError::HeadsNotPartitionable { .. }
    ));
    assert!(matches!(
        err(6, 4, 1, 12, Gqa),
        TopologyError::HeadSlicesStraddle { .. }
    ));
    // Sparse with more KV heads than decode ranks: n = 2 but only 4 entries.
    assert!(matches!(
        err(8, 4, 1, 8, Sparse),
        TopologyError::UnevenPullLists { .. }
    ));
    // ... which the push mapping (sparse treated as MLA) still accepts.
    assert!(PushMapping::new(PdShape::new(8, 4, 1, 8, Sparse)).is_ok());
    // The message carries the shape.
    let message = err(4, 8, 1, 8, Gqa).to_string();
    assert!(
        message.contains("P=4") && message.contains("D=8"),
        "{message}"
    );
    assert_eq!("MLA".parse::<Attention>().expect("name"), Mla);
    assert!("mqa".parse::<Attention>().is_err());
}

#[test]
fn plan_op_count_sizes_a_plan_without_building_it() {
    // Padded blocks with 2^40 kernel blocks per logical block: a plan of
    // 2^40 ops, counted (and so refusable) without allocating any.
    let huge = |base| {
        SideLayout::new(
            1,
            vec![vec![CacheLayout {
                base,
                block_len: 1,
                stride: 2,
                scale: 1 << 40,
            }]],
        )
        .expect("layout")
    };
    let request = PlanRequest::new(&[0], &[0]);
    assert_eq!(
        plan_op_count(&huge(0), &huge(1 << 42), &request).expect("count"),
        1 << 40
    );
    // The same errors as planning.
    let local = one_cache(8, 0, 1024, 1024);
    let remote = one_cache(8, 1 << 20, 1024, 1024);
    assert!(matches!(
        plan_op_count(&local, &remote, &PlanRequest::new(&[8], &[1])),
        Err(TopologyError::BlockIdOutOfRange { id: 8, .. })
    ));
    // Coalesced runs count once per cache, split blocks once per block.
    let ids = [1, 2, 3, 5];
    assert_eq!(
        plan_op_count(&local, &remote, &PlanRequest::new(&ids, &ids)).expect("count"),
        2
    );
    let half = one_cache(8, 1 << 20, 512, 512);
    assert_eq!(
        plan_op_count(
            &local,
            &half,
            &PlanRequest::new(&ids, &ids).with_pulls(2, 1)
        )
        .expect("count"),
        4
    );
}
