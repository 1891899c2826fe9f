//! The deployment shape both mappings start from, and the checks that decide
//! which shapes are accepted.

use std::ops::Range;
use std::str::FromStr;

use crate::error::{Result, TopologyError};

/// How the model's KV cache is split over heads.
///
/// The connectors branch on exactly these three cases, so the enum mirrors them
/// rather than the model zoo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Attention {
    /// Grouped-query (or multi-head) attention: `num_kv_heads` heads are
    /// sharded over TP ranks, or replicated when TP exceeds them.
    Gqa,
    /// Multi-head latent attention: every rank holds the whole latent cache,
    /// so the head count plays no part.
    Mla,
    /// Sparse attention (DeepSeek sparse attention): laid out like MLA for
    /// replica choice, but the pull count still uses `num_kv_heads`.
    Sparse,
}

impl Attention {
    /// The lower-case name the Python API uses.
    pub fn name(self) -> &'static str {
        match self {
            Attention::Gqa => "gqa",
            Attention::Mla => "mla",
            Attention::Sparse => "sparse",
        }
    }

    /// True where every rank holds one undivided cache (`h = 1` in COMPAT.md).
    pub fn is_latent(self) -> bool {
        matches!(self, Attention::Mla | Attention::Sparse)
    }
}

impl FromStr for Attention {
    type Err = TopologyError;

    /// Accepts `gqa`, `mla` and `sparse` in any letter case, the names the
    /// Python API documents.
    fn from_str(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "gqa" => Ok(Attention::Gqa),
            "mla" => Ok(Attention::Mla),
            "sparse" => Ok(Attention::Sparse),
            _ => Err(TopologyError::UnknownAttention {
                name: name.to_owned(),
            }),
        }
    }
}

impl std::fmt::Display for Attention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A prefill/decode deployment as the connectors see it (one DP rank each,
/// no context parallelism).
///
/// A plain value: nothing is checked until [`crate::PullMapping::new`] or
/// [`crate::PushMapping::new`] accepts or rejects it, so it can also serve as
/// error context.
///
/// # Rejected shapes
/// Both mappings reject, because the connectors would crash or silently move
/// the wrong bytes:
/// - a zero TP or PP size, or a zero head count except under MLA (which
///   ignores it): the rules divide by all of them;
/// - prefill TP below decode TP: the connectors refuse it;
/// - under GQA, a TP size that neither divides nor is divided by the head
///   count: vLLM cannot shard the heads, so "the heads of a rank" is undefined;
/// - under GQA, prefill TP below the head count and not a multiple of decode
///   TP: a prefill rank's heads would straddle two decode ranks.
///
/// The pull mapping also rejects shapes whose rules would not hand every
/// decode rank exactly `n` prefill ranks per stage (see
/// [`crate::PullMapping::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PdShape {
    /// Prefill tensor-parallel size `P`.
    pub prefill_tp: usize,
    /// Decode tensor-parallel size `D`.
    pub decode_tp: usize,
    /// Prefill pipeline stages `S` (decode has one).
    pub prefill_pp: usize,
    /// The model's KV head count `H` (ignored under MLA).
    pub num_kv_heads: usize,
    /// The attention kind.
    pub attention: Attention,
}

impl std::fmt::Display for PdShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "shape(P={}, D={}, S={}, H={}, {})",
            self.prefill_tp, self.decode_tp, self.prefill_pp, self.num_kv_heads, self.attention
        )
    }
}

impl PdShape {
    /// Builds a shape; see the field docs.
    pub fn new(
        prefill_tp: usize,
        decode_tp: usize,
        prefill_pp: usize,
        num_kv_heads: usize,
        attention: Attention,
    ) -> Self {
        PdShape {
            prefill_tp,
            decode_tp,
            prefill_pp,
            num_kv_heads,
            attention,
        }
    }

    /// The head count the layout rules work with: 1 for MLA and sparse (one
    /// undivided cache per rank), `num_kv_heads` for GQA.
    pub fn layout_heads(&self) -> usize {
        if self.attention.is_latent() {
            1
        } else {
            self.num_kv_heads
        }
    }

    /// The checks shared by the pull and push mappings; see "Rejected shapes"
    /// above for why each exists.
    pub(crate) fn validate_common(&self) -> Result<()> {
        let zero = |what| Err(TopologyError::ZeroSize { what, shape: *self });
        if self.prefill_tp == 0 {
            return zero("prefill tp");
        }
        if self.decode_tp == 0 {
            return zero("decode tp");
        }
        if self.prefill_pp == 0 {
            return zero("prefill pp");
        }
        if self.attention != Attention::Mla && self.num_kv_heads == 0 {
            return zero("num kv heads");
        }
        if self.prefill_tp < self.decode_tp {
            return Err(TopologyError::PrefillSmallerThanDecode { shape: *self });
        }
        if self.attention == Attention::Gqa {
            let heads = self.num_kv_heads;
            for (side, tp) in [("prefill", self.prefill_tp), ("decode", self.decode_tp)] {
                if tp % heads != 0 && !heads.is_multiple_of(tp) {
                    return Err(TopologyError::HeadsNotPartitionable {
                        side,
                        tp,
                        heads,
                        shape: *self,
                    });
                }
            }
            if self.prefill_tp < heads && !self.prefill_tp.is_multiple_of(self.decode_tp) {
                return Err(TopologyError::HeadSlicesStraddle { shape: *self });
            }
        }
        Ok(())
    }
}

/// The KV heads rank `rank` of a TP group of size `tp` holds, as COMPAT.md
/// section 3 defines them: with `tp <= heads`, the contiguous slice
/// `[rank*heads/tp, (rank+1)*heads/tp)`; with `tp > heads`, the single head
/// `rank / (tp/heads)` (replicated on `tp/heads` ranks).
///
/// Pass `heads = 1` for MLA and sparse attention. Returns `None` when the
/// arguments are outside the rules' domain (zero sizes, `rank >= tp`, or sizes
/// that do not divide one another), never a wrong answer.
pub fn rank_heads(tp: usize, heads: usize, rank: usize) -> Option<Range<usize>> {
    if tp == 0 || heads == 0 || rank >= tp {
        return None;
    }
    if tp <= heads {
        if !heads.is_multiple_of(tp) {
            return None;
        }
        let per_rank = heads / tp;
        Some(rank * per_rank..(rank + 1) * per_rank)
    } else {
        if !tp.is_multiple_of(heads) {
            return None;
        }
        let head = rank / (tp / heads);
        Some(head..head + 1)
    }
}
