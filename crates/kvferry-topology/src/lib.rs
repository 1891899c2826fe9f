//! Rank mapping and block planning for disaggregated LLM serving,
//! bit-compatible with the vllm-ascend KV connectors.
//!
//! A decode instance and a prefill instance must agree, without talking, on
//! which prefill ranks each decode rank reads (or which decode ranks each
//! prefill rank writes), and on the byte ranges of every block. The Python
//! connectors decide this with a few integer rules and one
//! `random.Random(seed).sample(...)`; this crate computes exactly the same
//! answers, so a kvferry peer and a Python connector peer can serve the same
//! request. The rules are sections 2 and 3 of COMPAT.md, the shared spec at
//! `../shared/docs/COMPAT.md` beside the kvferry repository (not in it).
//!
//! Pure computation: no I/O, no unsafe code, no panics on bad input (every
//! rejection is a [`TopologyError`] with the values that caused it).
//!
//! # Quick start
//! ```
//! use kvferry_topology::{Attention, PdShape, PullMapping, PushMapping};
//!
//! // Prefill TP 8, decode TP 4, one stage, 4 KV heads: each decode rank reads
//! // one of the two prefill replicas of its heads, chosen by the request id.
//! let pull = PullMapping::new(PdShape::new(8, 4, 1, 4, Attention::Gqa))?;
//! assert_eq!(pull.pulls_per_rank(), 1);
//! assert_eq!(pull.pull_ranks("req-0")?, vec![vec![1], vec![3], vec![5], vec![7]]);
//! assert_eq!(pull.pulled_prefill_ranks("req-0")?, vec![1, 3, 5, 7]);
//!
//! // The layerwise connector: with 8 heads, prefill rank 5 writes into decode
//! // rank 2, in the second half of the block.
//! let push = PushMapping::new(PdShape::new(8, 4, 1, 8, Attention::Gqa))?;
//! let target = push.push_targets(0, 5)?;
//! assert_eq!((target.decode_ranks, target.offset_index), (vec![2], 1));
//! # Ok::<(), kvferry_topology::TopologyError>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod cpython_random;
mod error;
mod plan;
mod ports;
mod pull;
mod push;
mod shape;

pub use error::{Result, Side, TopologyError};
pub use plan::{
    CacheLayout, PlanRequest, PlannedOp, PrefixHit, PreparedPlan, SideLayout, SplitSide,
    plan_blocks, plan_blocks_each, plan_blocks_into, plan_op_count,
};
pub use ports::{decode_pull_port, prefill_worker_port, side_channel_port};
pub use pull::{PullMapping, PullTarget, seed_for_request};
pub use push::{PushMapping, PushTarget, replica_groups};
pub use shape::{Attention, PdShape, rank_heads};
