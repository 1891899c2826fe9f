//! The crate's single error type.
//!
//! Every variant carries the values that made the call fail, so a message
//! logged by a connector (or returned through the C ABI as the last error)
//! says what to fix without a debugger.

use crate::shape::PdShape;

/// Which side of a transfer a value belongs to, for error context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The side running the planner (the decode side when pulling).
    Local,
    /// The peer (the prefill side when pulling).
    Remote,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Local => "local",
            Side::Remote => "remote",
        })
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// A size that the rules divide by, or count over, is zero.
    #[error("{what} is 0 in {shape}; it must be at least 1")]
    ZeroSize {
        /// Which size (`"prefill tp"`, `"num kv heads"`, ...).
        what: &'static str,
        /// The rejected shape.
        shape: PdShape,
    },

    /// The connectors only support a prefill TP at least as large as the decode TP.
    #[error("prefill tp {} < decode tp {} in {shape}: the connectors require prefill tp >= decode tp", shape.prefill_tp, shape.decode_tp)]
    PrefillSmallerThanDecode {
        /// The rejected shape.
        shape: PdShape,
    },

    /// Neither the TP size divides the KV head count nor the other way round,
    /// so vLLM cannot shard (or replicate) the heads over the ranks.
    #[error("{side} tp {tp} and {heads} kv heads do not divide one another in {shape}")]
    HeadsNotPartitionable {
        /// `"prefill"` or `"decode"`.
        side: &'static str,
        /// That side's TP size.
        tp: usize,
        /// The KV head count.
        heads: usize,
        /// The rejected shape.
        shape: PdShape,
    },

    /// A prefill rank's heads would straddle two decode ranks (prefill tp below
    /// the head count and not a multiple of decode tp), so no byte offset can
    /// place them.
    #[error("prefill tp {} is not a multiple of decode tp {} while below {} kv heads in {shape}: prefill head slices would straddle decode ranks", shape.prefill_tp, shape.decode_tp, shape.num_kv_heads)]
    HeadSlicesStraddle {
        /// The rejected shape.
        shape: PdShape,
    },

    /// The rules would not give every decode rank exactly `pulls_per_rank`
    /// prefill ranks per stage (the connectors would produce too few or
    /// ragged lists and some decode heads would never be filled).
    #[error(
        "the pull rules give {produced} entries per stage where {decode_tp} decode ranks x {pulls_per_rank} pulls are needed, in {shape}"
    )]
    UnevenPullLists {
        /// Entries the rules produce per stage.
        produced: usize,
        /// Decode TP size.
        decode_tp: usize,
        /// Pulls per decode rank.
        pulls_per_rank: usize,
        /// The rejected shape.
        shape: PdShape,
    },

    /// An attention name other than `gqa`, `mla` or `sparse`.
    #[error("unknown attention kind {name:?}; expected \"gqa\", \"mla\" or \"sparse\"")]
    UnknownAttention {
        /// The name given.
        name: String,
    },

    /// A rank index outside its TP (or TP x PP) range.
    #[error("{what} {rank} is out of range: must be below {limit}")]
    RankOutOfRange {
        /// Which rank (`"prefill rank"`, `"decode rank"`, ...).
        what: &'static str,
        /// The rank given.
        rank: usize,
        /// The exclusive upper bound.
        limit: usize,
    },

    /// `sample(range(n), k)` with `k > n` (CPython raises `ValueError`).
    #[error("sample of {k} from a population of {population}: sample larger than population")]
    SampleLargerThanPopulation {
        /// Population size `n`.
        population: u64,
        /// Requested sample size `k`.
        k: u64,
    },

    /// `_randbelow(0)`: CPython would loop forever; we refuse.
    #[error("randbelow(0): the range [0, 0) is empty")]
    EmptyRange,

    /// `getrandbits` into a `u64` asked for more than 64 bits.
    #[error("getrandbits({bits}) does not fit in 64 bits; use getrandbits_words")]
    TooManyBits {
        /// The bit count asked for.
        bits: u32,
    },

    /// A port computation left the 16-bit port range.
    #[error("{what}: {base} + {offset} exceeds the largest port 65535")]
    PortOverflow {
        /// Which port (`"side channel port"`, ...).
        what: &'static str,
        /// The base port.
        base: u16,
        /// The offset added to it.
        offset: u64,
    },

    /// The local and remote block id lists cannot be paired.
    #[error("cannot pair {local} local block ids with {remote} remote block ids ({detail})")]
    IdCountMismatch {
        /// Length of the local id list.
        local: usize,
        /// Length of the remote id list.
        remote: usize,
        /// Which rule failed, with its numbers.
        detail: String,
    },

    /// The number of computed tokens is not a whole number of blocks.
    #[error(
        "{computed_tokens} computed tokens is not a multiple of {tokens_per_block} tokens per block"
    )]
    ComputedTokensNotAligned {
        /// Tokens the local side already holds.
        computed_tokens: u64,
        /// Tokens in one logical block.
        tokens_per_block: u64,
    },

    /// The two layouts have different layer counts.
    #[error("local layout has {local} layers, remote layout has {remote}")]
    LayerCountMismatch {
        /// Local layer count.
        local: usize,
        /// Remote layer count.
        remote: usize,
    },

    /// A layer has different cache counts on the two sides.
    #[error("layer {layer}: local has {local} caches, remote has {remote}")]
    CacheCountMismatch {
        /// Layer index.
        layer: usize,
        /// Local cache count.
        local: usize,
        /// Remote cache count.
        remote: usize,
    },

    /// A cache layout is unusable on its own.
    #[error("layout layer {layer} cache {cache}: {reason}")]
    InvalidLayout {
        /// Layer index.
        layer: usize,
        /// Cache index within the layer.
        cache: usize,
        /// What is wrong, with the numbers.
        reason: String,
    },

    /// The two sides split a logical block into different numbers of kernel blocks.
    #[error("layer {layer} cache {cache}: local scale {local} differs from remote scale {remote}")]
    ScaleMismatch {
        /// Layer index.
        layer: usize,
        /// Cache index.
        cache: usize,
        /// Local kernel blocks per logical block.
        local: u64,
        /// Remote kernel blocks per logical block.
        remote: u64,
    },

    /// The split side's block cannot be cut into `pulls` equal slices.
    #[error(
        "layer {layer} cache {cache}: {side} block_len {block_len} is not divisible by {pulls} pulls"
    )]
    BlockLenNotDivisible {
        /// Layer index.
        layer: usize,
        /// Cache index.
        cache: usize,
        /// The side whose block is split.
        side: Side,
        /// Its block length in bytes.
        block_len: u64,
        /// Pulls per rank.
        pulls: u64,
    },

    /// The unsplit side's block is not exactly one slice of the split side's block.
    #[error(
        "layer {layer} cache {cache}: {side} block_len {found} must equal {expected} (the other side's block_len / pulls)"
    )]
    BlockLenMismatch {
        /// Layer index.
        layer: usize,
        /// Cache index.
        cache: usize,
        /// The side with the unexpected length.
        side: Side,
        /// Required length.
        expected: u64,
        /// Length found.
        found: u64,
    },

    /// `pulls` was zero or the offset index was not below it.
    #[error("offset index {offset_index} is not below {pulls} pulls (pulls must be at least 1)")]
    OffsetOutOfRange {
        /// The head offset index given.
        offset_index: u64,
        /// Pulls per rank.
        pulls: u64,
    },

    /// A block id beyond the side's block count.
    #[error("{side} block id {id} at position {position} is not below {num_blocks} blocks")]
    BlockIdOutOfRange {
        /// Which side.
        side: Side,
        /// The id.
        id: u64,
        /// Its index in the id list.
        position: usize,
        /// The side's logical block count.
        num_blocks: u64,
    },

    /// An address or length computation overflowed 64 bits.
    #[error("arithmetic overflow computing {what}")]
    Overflow {
        /// What was being computed.
        what: &'static str,
    },
}

/// Shorthand used throughout the crate.
pub type Result<T, E = TopologyError> = std::result::Result<T, E>;
