//! The full pull and push mappings against tests/oracle/rules.py, a Python
//! transcription of COMPAT.md section 3 that uses CPython's own `random`.
//!
//! Grid: TP in {1, 2, 4, 8, 16, 32} on both sides, KV heads in
//! {1, 2, 4, 8, 16, 64}, prefill PP in {1, 2}, GQA / MLA / sparse, plus a
//! grid of zero and non-power-of-two sizes for the rejections; 48 request
//! ids (ASCII, empty, long, non-ASCII) and 6 request indices for each.
//! Accept/reject must agree too.

mod common;

use common::{SplitMix, json_string, run_oracle};
use kvferry_topology::{Attention, PdShape, PullMapping, PushMapping};

const KINDS: [Attention; 3] = [Attention::Gqa, Attention::Mla, Attention::Sparse];

fn shapes() -> Vec<PdShape> {
    let mut shapes = Vec::new();
    let tps = [1, 2, 4, 8, 16, 32];
    for &p in &tps {
        for &d in &tps {
            for h in [1, 2, 4, 8, 16, 64] {
                for s in [1, 2] {
                    for kind in KINDS {
                        shapes.push(PdShape::new(p, d, s, h, kind));
                    }
                }
            }
        }
    }
    // Off the main grid: zero sizes and sizes that are not powers of two.
    let odd_tps = [0, 3, 6, 12, 24];
    for &p in &odd_tps {
        for &d in &[0, 2, 3, 4, 6] {
            for h in [0, 3, 6, 12] {
                for s in [0, 1, 3] {
                    for kind in KINDS {
                        shapes.push(PdShape::new(p, d, s, h, kind));
                    }
                }
            }
        }
    }
    shapes
}

fn request_ids() -> Vec<String> {
    let mut g = SplitMix(0x7265_7175_6573_7473);
    let mut ids: Vec<String> = (0..16).map(|i| format!("req-{i}")).collect();
    ids.push(String::new());
    ids.push("x".repeat(300));
    ids.push("запрос-7".into());
    ids.push("请求-八".into());
    ids.push("cmpl-\"quoted\"\\slash".into());
    while ids.len() < 48 {
        ids.push(format!(
            "cmpl-{:016x}{:08x}-0",
            g.next_u64(),
            g.next_u64() as u32
        ));
    }
    ids
}

fn join<T: ToString>(items: &[T], sep: &str) -> String {
    items.iter().map(T::to_string).collect::<Vec<_>>().join(sep)
}

#[test]
fn pull_and_push_mappings_match_the_python_transcription() {
    let shapes = shapes();
    let ids = request_ids();
    let indices: [u64; 6] = [0, 1, 2, 3, 7, (1 << 40) + 3];

    let shape_json: Vec<String> = shapes
        .iter()
        .map(|s| {
            format!(
                "[{}, {}, {}, \"{}\", {}]",
                s.prefill_tp, s.decode_tp, s.num_kv_heads, s.attention, s.prefill_pp
            )
        })
        .collect();
    let id_json: Vec<String> = ids.iter().map(|id| json_string(id)).collect();
    let json = format!(
        "{{\"shapes\": [{}], \"request_ids\": [{}], \"request_indices\": {indices:?}}}",
        shape_json.join(","),
        id_json.join(",")
    );
    let output = run_oracle("rules.py", &json);
    let mut lines = output.lines();

    let (mut pull_accepted, mut push_accepted, mut sampled) = (0, 0, 0);
    for shape in &shapes {
        let header = lines.next().expect("shape header");
        assert_eq!(
            header,
            format!(
                "shape {} {} {} {} {}",
                shape.prefill_tp,
                shape.decode_tp,
                shape.num_kv_heads,
                shape.attention,
                shape.prefill_pp
            )
        );
        let pull = PullMapping::new(*shape);
        let push = PushMapping::new(*shape);
        let verdict = lines.next().expect("verdict line");
        if verdict == "reject" {
            assert!(pull.is_err(), "{shape}: Python rejects, Rust pull accepts");
            assert!(push.is_err(), "{shape}: Python rejects, Rust push accepts");
            continue;
        }
        if verdict == "pull reject" {
            assert!(
                pull.is_err(),
                "{shape}: Python rejects the pull mapping, Rust accepts"
            );
        } else {
            let pull =
                pull.unwrap_or_else(|e| panic!("{shape}: Python accepts, Rust rejects: {e}"));
            assert_eq!(verdict, format!("n {}", pull.pulls_per_rank()), "{shape}");
            pull_accepted += 1;
            if shape.prefill_tp != shape.decode_tp {
                sampled += 1;
            }
            for id in &ids {
                let expected = lines.next().expect("lists line");
                let lists = pull.pull_ranks(id).expect("pull ranks");
                let actual = lists
                    .iter()
                    .map(|l| join(l, ","))
                    .collect::<Vec<_>>()
                    .join(";");
                assert_eq!(actual, expected, "{shape}, request {id:?}");
            }
        }
        let push =
            push.unwrap_or_else(|e| panic!("{shape}: Python accepts push, Rust rejects: {e}"));
        push_accepted += 1;
        for &q in &indices {
            let expected = lines.next().expect("push line");
            let parts: Vec<String> = (0..shape.prefill_tp)
                .map(|p| {
                    let t = push.push_targets(q, p).expect("push targets");
                    format!("{}/{}", join(&t.decode_ranks, ","), t.offset_index)
                })
                .collect();
            assert_eq!(parts.join(";"), expected, "{shape}, request index {q}");
        }
    }
    assert!(lines.next().is_none(), "oracle printed extra lines");
    // Guard against a vacuous pass (e.g. everything rejected on both sides).
    assert!(
        pull_accepted > 600,
        "only {pull_accepted} pull shapes accepted"
    );
    assert!(
        push_accepted > 600,
        "only {push_accepted} push shapes accepted"
    );
    assert!(
        sampled > 300,
        "only {sampled} shapes with request-seeded choice"
    );
}
