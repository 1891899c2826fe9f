//! A KV cache of realistic shape, filled with a pattern that names every
//! byte's place, so a reader can verify what it pulled.

/// Shape of one rank's paged KV cache: `layers` x {K, V} tensors, each
/// `blocks` blocks of `block_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub blocks: usize,
    /// tokens per block x kv heads per rank x head dim x bytes per element.
    pub block_bytes: usize,
}

pub const CACHES_PER_LAYER: usize = 2;

impl KvShape {
    pub fn tensor_bytes(&self) -> usize {
        self.blocks * self.block_bytes
    }
    pub fn tensors(&self) -> usize {
        self.layers * CACHES_PER_LAYER
    }
    pub fn total_bytes(&self) -> usize {
        self.tensor_bytes() * self.tensors()
    }
}

/// One tensor per (layer, cache), page-aligned like the framework's
/// allocations, each registered as its own region.
#[derive(Debug)]
pub struct KvCache {
    pub shape: KvShape,
    tensors: Vec<Vec<u64>>,
}

impl KvCache {
    /// A cache filled with a sentinel no pattern word equals. Writing it
    /// also faults every page in, as a framework's up-front allocation does,
    /// so page faults do not count as transfer time.
    pub fn empty(shape: KvShape) -> KvCache {
        let words = shape.tensor_bytes().div_ceil(8);
        KvCache {
            shape,
            tensors: (0..shape.tensors())
                .map(|_| vec![Self::SENTINEL; words])
                .collect(),
        }
    }

    const SENTINEL: u64 = 0xdead_beef_dead_beef;

    /// The value of word `w` of block `b` of tensor `t` in the prefill cache.
    pub fn expected_word(t: usize, b: usize, w: usize) -> u64 {
        ((t as u64) << 48) ^ ((b as u64) << 24) ^ (w as u64) ^ 0x5a5a_0000_0000_0000
    }

    pub fn fill_pattern(&mut self) {
        let bw = self.shape.block_bytes / 8;
        for (t, tensor) in self.tensors.iter_mut().enumerate() {
            for (i, word) in tensor.iter_mut().enumerate() {
                *word = Self::expected_word(t, i / bw, i % bw);
            }
        }
    }

    pub fn base(&self, tensor: usize) -> u64 {
        self.tensors[tensor].as_ptr() as u64
    }

    pub fn bases(&self) -> Vec<u64> {
        (0..self.tensors.len()).map(|t| self.base(t)).collect()
    }

    pub fn block_addr(&self, tensor: usize, block: usize) -> u64 {
        self.base(tensor) + (block * self.shape.block_bytes) as u64
    }

    /// Checks that local block `local` of every tensor holds prefill block
    /// `remote`; returns the first mismatch.
    pub fn verify_block(&self, local: usize, remote: usize) -> Result<(), String> {
        let bw = self.shape.block_bytes / 8;
        for (t, tensor) in self.tensors.iter().enumerate() {
            let words = &tensor[local * bw..(local + 1) * bw];
            if let Some((w, got)) = words
                .iter()
                .enumerate()
                .find(|(w, v)| **v != Self::expected_word(t, remote, *w))
            {
                return Err(format!(
                    "tensor {t} local block {local} (prefill block {remote}) word {w}: got {got:#x}, expected {:#x}",
                    Self::expected_word(t, remote, w)
                ));
            }
        }
        Ok(())
    }

    pub fn tensors_mut(&mut self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let bytes = self.shape.tensor_bytes() as u64;
        self.tensors
            .iter_mut()
            .map(move |t| (t.as_mut_ptr() as u64, bytes))
    }
}
