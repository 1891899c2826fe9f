//! CPython's `random.Random`, reproduced bit for bit where the connectors use it.
//!
//! The decode side picks which prefill replicas to read from with
//! `random.Random(seed).sample(range(G), k)`, and the prefill side (which may
//! still be the Python connector) recomputes the same choice to know whom to
//! wait for. Any divergence, one extra `getrandbits` call or a different
//! algorithm switch point, silently pairs the wrong ranks, so this module
//! follows CPython 3.11 (`Modules/_randommodule.c` and `Lib/random.py`)
//! step by step: MT19937 seeded by `init_by_array`, `getrandbits`,
//! `_randbelow` by rejection, and both `sample` algorithms with CPython's
//! floating-point switch point.
//!
//! ```
//! use kvferry_topology::cpython_random::CpythonRandom;
//! // python3 -c "import random; print(random.Random(42).sample(range(10), 3))"
//! let mut rng = CpythonRandom::new(42);
//! assert_eq!(rng.sample_range(10, 3).unwrap(), vec![1, 0, 4]);
//! ```

use std::collections::HashSet;

use crate::error::{Result, TopologyError};

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// `init_genrand(19650218)`, where `init_by_array` starts for every seed:
/// computed once, at compile time.
const INIT_GENRAND_19650218: [u32; N] = {
    let mut mt = [0u32; N];
    mt[0] = 19_650_218;
    let mut i = 1;
    while i < N {
        let prev = mt[i - 1];
        mt[i] = 1_812_433_253u32
            .wrapping_mul(prev ^ (prev >> 30))
            .wrapping_add(i as u32);
        i += 1;
    }
    mt
};

/// A Mersenne Twister in exactly the state `random.Random(seed)` would have.
#[derive(Clone)]
pub struct CpythonRandom {
    state: [u32; N],
    index: usize,
}

impl std::fmt::Debug for CpythonRandom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // 624 words of state help nobody reading a log.
        f.debug_struct("CpythonRandom")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl CpythonRandom {
    /// `random.Random(seed)` for a non-negative integer seed below 2^64.
    ///
    /// CPython splits the seed into 32-bit little-endian words and drops the
    /// high zero words (seed 0 keeps one word `[0]`), so seeds below 2^32
    /// seed from one word and larger ones from two.
    pub fn new(seed: u64) -> Self {
        // Truncation is the point: the low and high 32-bit words.
        let words = [seed as u32, (seed >> 32) as u32];
        Self::from_seed_words(&words)
    }

    /// `random.Random(x)` for any integer `x`, given `abs(x)` as 32-bit words,
    /// least significant first (CPython seeds from the absolute value, so `x`
    /// and `-x` give the same stream).
    ///
    /// High zero words are ignored, as CPython sizes the key by the integer's
    /// bit length; an empty or all-zero slice is the seed 0.
    pub fn from_seed_words(abs_seed_words: &[u32]) -> Self {
        let used = abs_seed_words
            .iter()
            .rposition(|&w| w != 0)
            .map_or(1, |top| top + 1);
        let zero = [0u32];
        let key = abs_seed_words.get(..used).unwrap_or(&zero);
        let mut rng = CpythonRandom {
            state: [0; N],
            index: N,
        };
        rng.init_by_array(key);
        rng
    }

    fn init_by_array(&mut self, key: &[u32]) {
        self.state = INIT_GENRAND_19650218;
        self.index = N;
        let mt = &mut self.state;
        let mut i = 1usize;
        let mut j = 0usize;
        let len = key.len().max(1);
        for _ in 0..N.max(len) {
            let prev = mt[i - 1];
            let word = key.get(j).copied().unwrap_or(0);
            mt[i] = (mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(word)
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            if j >= len {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = mt[i - 1];
            mt[i] =
                (mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
    }

    /// The next raw 32-bit output (CPython's `genrand_uint32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.index = 0;
        }
        // CPython twists all N words when it runs out, in index order and in
        // place: word i then reads the new words below i and the old ones
        // above. Computing word i just before it is drawn reads exactly the
        // same values, and a sample of a few ranks draws a few words, so the
        // other 600-odd are never computed.
        let i = self.index;
        let mt = &mut self.state;
        let next = mt[(i + 1) % N];
        let y = (mt[i] & UPPER_MASK) | (next & LOWER_MASK);
        let mag = if y & 1 == 0 { 0 } else { MATRIX_A };
        mt[i] = mt[(i + M) % N] ^ (y >> 1) ^ mag;
        let mut y = mt[i];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `getrandbits(k)` for any `k`, as little-endian 32-bit words.
    ///
    /// One 32-bit output per word, least significant word first; the last
    /// word keeps the top `k % 32` bits of its output (CPython drops the low
    /// bits). `k = 0` draws nothing and is the integer 0 (an empty vector).
    pub fn getrandbits_words(&mut self, k: u32) -> Vec<u32> {
        let words = k.div_ceil(32) as usize;
        let mut out = Vec::with_capacity(words);
        let mut remaining = k;
        while remaining > 0 {
            let r = self.next_u32();
            if remaining < 32 {
                out.push(r >> (32 - remaining));
                remaining = 0;
            } else {
                out.push(r);
                remaining -= 32;
            }
        }
        out
    }

    /// `getrandbits(k)` for `k <= 64`, the widths `_randbelow` needs for
    /// 64-bit populations. Same draws as [`Self::getrandbits_words`].
    pub fn getrandbits(&mut self, k: u32) -> Result<u64> {
        if k > 64 {
            return Err(TopologyError::TooManyBits { bits: k });
        }
        if k <= 32 {
            // CPython's single-word path; k == 0 draws nothing.
            return Ok(if k == 0 {
                0
            } else {
                u64::from(self.next_u32() >> (32 - k))
            });
        }
        let low = u64::from(self.next_u32());
        let high = u64::from(self.next_u32() >> (64 - k));
        Ok(low | (high << 32))
    }

    /// `_randbelow(n)`: draws `getrandbits(n.bit_length())` until the value is
    /// below `n` (CPython's rejection sampling, not a modulo).
    pub fn randbelow(&mut self, n: u64) -> Result<u64> {
        if n == 0 {
            return Err(TopologyError::EmptyRange);
        }
        let bits = u64::BITS - n.leading_zeros();
        loop {
            let r = self.getrandbits(bits)?;
            if r < n {
                return Ok(r);
            }
        }
    }

    /// `sample(range(n), k)`.
    ///
    /// CPython picks one of two algorithms by comparing `n` with
    /// [`sample_setsize`]`(k)`: for `n <= setsize`, a pool of the population
    /// where each pick is swapped with the last live element; otherwise
    /// repeated `_randbelow(n)` with rejection of values already chosen. Both
    /// consume the generator differently, so the switch point must match too.
    pub fn sample_range(&mut self, n: u64, k: usize) -> Result<Vec<u64>> {
        let k_wide = k as u64;
        if k_wide > n {
            return Err(TopologyError::SampleLargerThanPopulation {
                population: n,
                k: k_wide,
            });
        }
        let mut result = Vec::with_capacity(k);
        if u128::from(n) <= sample_setsize(k) {
            // n <= setsize <= 21 + 12k, so the pool is at most a small multiple of k.
            let mut pool: Vec<u64> = (0..n).collect();
            for i in 0..k_wide {
                let j = self.randbelow(n - i)?;
                let j = usize::try_from(j).map_err(|_| TopologyError::Overflow {
                    what: "sample pool index",
                })?;
                // swap_remove moves the last live element into the vacancy,
                // exactly CPython's `pool[j] = pool[n - i - 1]`.
                result.push(pool.swap_remove(j));
            }
        } else {
            let mut selected = HashSet::with_capacity(k);
            for _ in 0..k {
                let mut j = self.randbelow(n)?;
                while selected.contains(&j) {
                    j = self.randbelow(n)?;
                }
                selected.insert(j);
                result.push(j);
            }
        }
        Ok(result)
    }
}

/// CPython's `sample` switch point: `21`, plus `4 ** ceil(log(3k, 4))` when
/// `k > 5`. The logarithm is the floating-point one CPython evaluates
/// (`log(float(3k)) / log(4.0)`), which for very large `k` differs from the
/// exact integer ceiling, so it is reproduced rather than "fixed".
/// Saturates instead of overflowing; a sample that large could not be stored.
pub fn sample_setsize(k: usize) -> u128 {
    let mut setsize: u128 = 21;
    if k > 5 {
        // 3k as a float, rounded to nearest like PyLong_AsDouble.
        let three_k = (3 * k as u128) as f64;
        let exponent = (three_k.ln() / 4f64.ln()).ceil();
        // exponent is between 3 and 34 here, so the cast is exact.
        let table = 4u128.checked_pow(exponent as u32).unwrap_or(u128::MAX);
        setsize = setsize.saturating_add(table);
    }
    setsize
}
