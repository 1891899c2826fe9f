//! The MT19937 / `random.Random` reimplementation against CPython itself.
//!
//! Thousands of seeds (0, word boundaries, random 64-bit, and a few
//! multi-word and negative seeds), populations from 0 to 200, around the
//! `sample` algorithm switch point, and up to 2^64 - 1, with every sample size
//! from 0 to n possible; after each sample a few `getrandbits` widths
//! (including 0, 32, 33, 64, 65 and multi-word) and `_randbelow` bounds, so
//! the generator state is compared after each step, not just the sample.
//! One python3 process answers all cases.

mod common;

use common::{SplitMix, run_oracle};
use kvferry_topology::cpython_random::{CpythonRandom, sample_setsize};

struct Case {
    /// abs(seed) as little-endian 32-bit words.
    words: Vec<u32>,
    negative: bool,
    n: u64,
    k: usize,
    bits: Vec<u32>,
    below: Vec<u64>,
}

fn hex_of_words(words: &[u32]) -> String {
    let mut hex = String::new();
    for &w in words.iter().rev() {
        if hex.is_empty() {
            if w != 0 {
                hex = format!("{w:x}");
            }
        } else {
            hex.push_str(&format!("{w:08x}"));
        }
    }
    if hex.is_empty() { "0".into() } else { hex }
}

fn make_cases() -> Vec<Case> {
    let mut g = SplitMix(0x6b76_6665_7272_7921);
    let fixed_seeds: [u64; 9] = [
        0,
        1,
        42,
        u32::MAX as u64,
        1 << 32,
        (1 << 32) + 1,
        u64::MAX,
        7_753_214_593_136_781_247,
        1 << 63,
    ];
    let big_populations: [u64; 9] = [
        1_000_000,
        (1 << 31) + 3,
        1 << 32,
        (1 << 32) + 1,
        (1 << 53) + 1,
        3 * (1 << 40) + 7,
        (1 << 62) + 5,
        (1 << 63) - 2,
        // len(range(n)) must fit a C ssize_t, so CPython stops here.
        (1 << 63) - 1,
    ];
    let widths: [u32; 15] = [0, 1, 5, 31, 32, 33, 48, 63, 64, 65, 96, 100, 128, 200, 1000];
    let bounds: [u64; 12] = [
        1,
        2,
        3,
        7,
        8,
        9,
        1 << 31,
        1 << 32,
        (1 << 32) + 1,
        (1 << 53) + 1,
        1 << 63,
        u64::MAX,
    ];
    let mut cases = Vec::new();
    for i in 0..4000 {
        let (words, negative) = match i % 20 {
            0..=8 if i < 9 * 20 => {
                let s = fixed_seeds[i % 20];
                (vec![s as u32, (s >> 32) as u32], false)
            }
            0..=9 => {
                let s = g.next_u64();
                (vec![s as u32, (s >> 32) as u32], false)
            }
            10..=15 => (vec![g.next_u64() as u32], false),
            16 | 17 => (vec![g.below(1 << 16) as u32, 0], false),
            // Seeds above 2^64 and negative ones: CPython seeds from abs().
            18 => {
                let len = 3 + g.below(3) as usize;
                ((0..len).map(|_| g.next_u64() as u32).collect(), false)
            }
            _ => {
                let s = g.next_u64();
                (vec![s as u32, (s >> 32) as u32], true)
            }
        };
        let (n, k) = match g.below(10) {
            0..=6 => {
                let n = g.below(201);
                (n, g.below(n + 1) as usize)
            }
            7 | 8 => {
                // Around the switch point: n = setsize(k) - 1, setsize(k), setsize(k) + 1.
                let k = 6 + g.below(90) as usize;
                let n = (sample_setsize(k) as u64 + g.below(3)).saturating_sub(1);
                (n.max(k as u64), k)
            }
            _ => (*g.pick(&big_populations), g.below(301) as usize),
        };
        let bits = (0..3).map(|_| *g.pick(&widths)).collect();
        let mut below: Vec<u64> = (0..2).map(|_| *g.pick(&bounds)).collect();
        below.push(1 + g.below(u64::MAX));
        cases.push(Case {
            words,
            negative,
            n,
            k,
            bits,
            below,
        });
    }
    cases
}

fn setsize_ks() -> Vec<usize> {
    let mut ks: Vec<usize> = (0..=400).collect();
    // Where the floating-point log4 disagrees with the exact ceiling (and
    // its neighbours): CPython's float answer is the one to match.
    let mut power: u128 = 4;
    for _ in 1..=31 {
        for delta in [-4i128, -1, 0, 1, 2, 5] {
            let three_k = power as i128 + delta;
            if three_k > 0 && three_k % 3 == 0 {
                ks.push((three_k / 3) as usize);
            }
        }
        power *= 4;
    }
    ks.extend([usize::MAX / 3, usize::MAX / 3 + 1, usize::MAX]);
    ks
}

#[test]
fn matches_cpython_random_bit_for_bit() {
    let cases = make_cases();
    let ks = setsize_ks();
    let mut json = String::from("{\"cases\": [");
    for (i, c) in cases.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        let sign = if c.negative { "-" } else { "" };
        json.push_str(&format!(
            "{{\"seed\": \"{sign}0x{}\", \"n\": {}, \"k\": {}, \"bits\": {:?}, \"below\": {:?}}}",
            hex_of_words(&c.words),
            c.n,
            c.k,
            c.bits,
            c.below
        ));
    }
    json.push_str(&format!("], \"setsize_k\": {ks:?}}}"));

    let output = run_oracle("cpython_random.py", &json);
    let mut lines = output.lines();
    let (mut pool_cases, mut set_cases) = (0, 0);
    for (i, c) in cases.iter().enumerate() {
        let expected = lines.next().expect("one line per case");
        let mut rng = if c.words.len() == 2 {
            CpythonRandom::new(u64::from(c.words[0]) | (u64::from(c.words[1]) << 32))
        } else {
            CpythonRandom::from_seed_words(&c.words)
        };
        let sample = rng.sample_range(c.n, c.k).expect("k <= n");
        if u128::from(c.n) <= sample_setsize(c.k) {
            pool_cases += 1;
        } else {
            set_cases += 1;
        }
        let bits: Vec<String> = c
            .bits
            .iter()
            .enumerate()
            .map(|(j, &b)| {
                // Exercise both entry points on the widths both accept.
                if b <= 64 && (i + j) % 2 == 0 {
                    format!("{:x}", rng.getrandbits(b).expect("b <= 64"))
                } else {
                    hex_of_words(&rng.getrandbits_words(b))
                }
            })
            .collect();
        let below: Vec<String> = c
            .below
            .iter()
            .map(|&m| rng.randbelow(m).expect("m > 0").to_string())
            .collect();
        let sample: Vec<String> = sample.iter().map(u64::to_string).collect();
        let actual = format!(
            "{} | {} | {}",
            sample.join(" "),
            bits.join(" "),
            below.join(" ")
        );
        assert_eq!(
            actual.trim(),
            expected.trim(),
            "case {i}: seed words {:?} (negative: {}), n {}, k {}",
            c.words,
            c.negative,
            c.n,
            c.k
        );
    }
    assert!(
        pool_cases > 500 && set_cases > 500,
        "both sample algorithms must run: pool {pool_cases}, set {set_cases}"
    );
    for &k in &ks {
        let expected: u128 = lines.next().expect("setsize line").parse().expect("int");
        assert_eq!(sample_setsize(k), expected, "setsize({k})");
    }
    assert!(lines.next().is_none(), "oracle printed extra lines");
}

#[test]
fn rejects_what_cpython_rejects() {
    let mut rng = CpythonRandom::new(1);
    assert!(rng.sample_range(3, 4).is_err());
    assert!(rng.randbelow(0).is_err());
    assert!(rng.getrandbits(65).is_err());
    assert_eq!(rng.getrandbits(0).expect("0 bits"), 0);
    assert!(rng.getrandbits_words(0).is_empty());
}

/// Long streams: the generator recomputes each state word just before it
/// is drawn instead of twisting all 624 at once, so draws well past the
/// first and second 624-word cycles, in odd widths that straddle the
/// boundaries, must still be CPython's.
#[test]
fn long_streams_cross_twist_boundaries_like_cpython() {
    let seeds: [u64; 4] = [0, 1, 7_753_214_593_136_781_247, u64::MAX];
    // 623 words, then 2 (crossing the first boundary), then ~1250 more
    // (two more boundaries), then small widths.
    let widths: [u32; 6] = [623 * 32, 33, 1250 * 32 + 5, 1, 64, 31];
    let mut json = String::from("{\"cases\": [");
    for (i, seed) in seeds.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            "{{\"seed\": \"{seed}\", \"n\": 1000, \"k\": 3, \"bits\": {widths:?}, \"below\": [1000003, 7]}}"
        ));
    }
    json.push_str("], \"setsize_k\": []}");
    let output = run_oracle("cpython_random.py", &json);
    for (seed, expected) in seeds.iter().zip(output.lines()) {
        let mut rng = CpythonRandom::new(*seed);
        let sample: Vec<String> = rng
            .sample_range(1000, 3)
            .expect("k <= n")
            .iter()
            .map(u64::to_string)
            .collect();
        let bits: Vec<String> = widths
            .iter()
            .map(|&b| hex_of_words(&rng.getrandbits_words(b)))
            .collect();
        let below: Vec<String> = [1_000_003, 7]
            .iter()
            .map(|&m| rng.randbelow(m).expect("m > 0").to_string())
            .collect();
        let actual = format!(
            "{} | {} | {}",
            sample.join(" "),
            bits.join(" "),
            below.join(" ")
        );
        assert_eq!(actual.trim(), expected.trim(), "seed {seed}");
    }
}
