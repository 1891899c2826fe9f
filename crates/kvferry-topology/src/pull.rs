//! Which prefill ranks each decode rank pulls from (the v1 connector, decode
//! pulls), COMPAT.md section 3.

use sha2::{Digest, Sha256};

use crate::cpython_random::CpythonRandom;
use crate::error::{Result, TopologyError};
use crate::shape::{Attention, PdShape};

/// The seed the connectors derive from a request id: the first 8 bytes of
/// SHA-256 over its UTF-8 bytes, read as an unsigned little-endian integer.
///
/// Both sides hash the *remote* request id (the prefill side's id), so they
/// agree without exchanging the choice.
///
/// ```
/// assert_eq!(kvferry_topology::seed_for_request("req-0"), 7753214593136781247);
/// ```
pub fn seed_for_request(request_id: &str) -> u64 {
    let digest = Sha256::digest(request_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// One prefill rank in a decode rank's pull list, with what the decode rank
/// needs to place its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PullTarget {
    /// Global prefill rank `stage * P + tp_rank` (also the port offset).
    pub prefill_rank: usize,
    /// The rank's TP index within its stage.
    pub tp_rank: usize,
    /// The prefill pipeline stage holding it (`(rank % (P*S)) / P`).
    pub pp_stage: usize,
    /// Which `1/n` slice of the decode block this rank's bytes fill
    /// (`j % n` for the `j`-th entry of the list).
    pub offset_index: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// P == D: rank i reads rank i of every stage.
    SameTp,
    /// Replicas chosen by the request seed; `groups` = G, `rows` = P / G,
    /// `chosen` = how many replica columns are sampled.
    Sampled {
        groups: usize,
        rows: usize,
        chosen: usize,
    },
    /// GQA with P <= H: decode rank i reads the `per_rank` consecutive prefill
    /// ranks that hold its heads.
    Consecutive { per_rank: usize },
}

/// The pull mapping for one accepted shape.
///
/// Construction checks the shape once; every later call is cheap and agrees
/// bit for bit with the Python connectors on every shape they handle
/// correctly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullMapping {
    shape: PdShape,
    pulls: usize,
    route: Route,
}

impl PullMapping {
    /// Accepts or rejects `shape`.
    ///
    /// On top of the checks shared with the push mapping (see "Rejected
    /// shapes" on [`PdShape`]: zero sizes, `P < D`, unshardable heads,
    /// straddling head slices), a shape is rejected when the rules would not
    /// give every decode rank exactly [`Self::pulls_per_rank`] prefill ranks
    /// per stage: the replica rows do not tile `P` (`P % G != 0`), or the
    /// sampled entries do not cut into `D` chunks of `n` (sparse attention
    /// with more KV heads than decode ranks, where the connectors leave some
    /// decode ranks without a source).
    pub fn new(shape: PdShape) -> Result<Self> {
        shape.validate_common()?;
        let pulls = pulls_per_rank_unchecked(&shape);
        let (p, d, heads) = (shape.prefill_tp, shape.decode_tp, shape.num_kv_heads);
        let route = if p == d {
            Route::SameTp
        } else if shape.attention.is_latent() || p > heads {
            let h = shape.layout_heads();
            let groups = (p / h).max(1);
            let chosen = (d / h).max(1);
            let uneven = |produced| TopologyError::UnevenPullLists {
                produced,
                decode_tp: d,
                pulls_per_rank: pulls,
                shape,
            };
            if p % groups != 0 {
                return Err(uneven(p / groups * chosen));
            }
            let rows = p / groups;
            if rows * chosen != d * pulls {
                return Err(uneven(rows * chosen));
            }
            Route::Sampled {
                groups,
                rows,
                chosen,
            }
        } else {
            // GQA, P <= H: validate_common guarantees P % D == 0, and then
            // n = (H/D) / (H/P) = P/D exactly.
            let per_rank = p / d;
            if per_rank * d != p || per_rank != pulls {
                return Err(TopologyError::UnevenPullLists {
                    produced: per_rank * d,
                    decode_tp: d,
                    pulls_per_rank: pulls,
                    shape,
                });
            }
            Route::Consecutive { per_rank }
        };
        Ok(PullMapping {
            shape,
            pulls,
            route,
        })
    }

    /// The accepted shape.
    pub fn shape(&self) -> PdShape {
        self.shape
    }

    /// `n`: how many prefill ranks per stage fill one decode block, each
    /// writing `block_len / n` bytes. 1 under MLA, else
    /// `max(1, H/D) / max(1, H/P)`.
    pub fn pulls_per_rank(&self) -> usize {
        self.pulls
    }

    /// The length of every decode rank's pull list: `n * S`.
    pub fn pull_list_len(&self) -> usize {
        self.pulls * self.shape.prefill_pp
    }

    /// How many prefill ranks [`Self::pulled_prefill_ranks`] returns, known
    /// without drawing the replicas: all `P * S` ranks, or, when replicas are
    /// chosen, `D * n * S` of them (each read by exactly one decode rank).
    pub fn pulled_prefill_rank_count(&self) -> usize {
        let (p, stages) = (self.shape.prefill_tp, self.shape.prefill_pp);
        match self.route {
            Route::SameTp | Route::Consecutive { .. } => p * stages,
            Route::Sampled { rows, chosen, .. } => rows * chosen * stages,
        }
    }

    /// The prefill ranks every decode rank pulls from for `request_id`: one list
    /// per decode rank, stage 0's `n` ranks first, then stage 1's, and so on.
    pub fn pull_ranks(&self, request_id: &str) -> Result<Vec<Vec<usize>>> {
        self.pull_ranks_for_seed(seed_for_request(request_id))
    }

    /// [`Self::pull_ranks`] from an already computed seed.
    pub fn pull_ranks_for_seed(&self, seed: u64) -> Result<Vec<Vec<usize>>> {
        let (p, d, stages) = (
            self.shape.prefill_tp,
            self.shape.decode_tp,
            self.shape.prefill_pp,
        );
        let mut lists: Vec<Vec<usize>> = (0..d)
            .map(|_| Vec::with_capacity(self.pulls * stages))
            .collect();
        match self.route {
            Route::SameTp => {
                for (i, list) in lists.iter_mut().enumerate() {
                    list.extend((0..stages).map(|s| s * p + i));
                }
            }
            Route::Consecutive { per_rank } => {
                for s in 0..stages {
                    for (i, list) in lists.iter_mut().enumerate() {
                        list.extend((0..per_rank).map(|j| s * p + i * per_rank + j));
                    }
                }
            }
            Route::Sampled { groups, rows, .. } => {
                let columns = self.sampled_columns(seed)?;
                for s in 0..stages {
                    // The flattened [row][chosen column] matrix, cut into
                    // chunks of n: chunk i belongs to decode rank i.
                    let flat = (0..rows)
                        .flat_map(|r| columns.iter().map(move |&c| s * p + r * groups + c));
                    for (index, rank) in flat.enumerate() {
                        if let Some(list) = lists.get_mut(index / self.pulls) {
                            list.push(rank);
                        }
                    }
                }
            }
        }
        Ok(lists)
    }

    /// The replica columns `C = sample(range(G), max(D/h, 1))`, sorted as drawn.
    fn sampled_columns(&self, seed: u64) -> Result<Vec<usize>> {
        let Route::Sampled { groups, chosen, .. } = self.route else {
            return Ok(Vec::new());
        };
        let mut rng = CpythonRandom::new(seed);
        let drawn = rng.sample_range(groups as u64, chosen)?;
        // Every value is below `groups`, a usize, so the conversion holds.
        Ok(drawn.into_iter().map(|c| c as usize).collect())
    }

    /// Decode rank `decode_rank`'s pull list for `request_id`, with each
    /// entry's TP rank, stage and head offset index.
    pub fn pull_targets(&self, request_id: &str, decode_rank: usize) -> Result<Vec<PullTarget>> {
        let limit = self.shape.decode_tp;
        if decode_rank >= limit {
            return Err(TopologyError::RankOutOfRange {
                what: "decode rank",
                rank: decode_rank,
                limit,
            });
        }
        let lists = self.pull_ranks(request_id)?;
        let list = lists.get(decode_rank).map(Vec::as_slice).unwrap_or(&[]);
        Ok(list
            .iter()
            .enumerate()
            .map(|(j, &rank)| PullTarget {
                prefill_rank: rank,
                tp_rank: rank % self.shape.prefill_tp,
                pp_stage: self.pp_stage(rank),
                offset_index: self.offset_index(j),
            })
            .collect())
    }

    /// The head offset index of the `j`-th entry of a pull list: `j % n`.
    pub fn offset_index(&self, position: usize) -> usize {
        position % self.pulls
    }

    /// The pipeline stage of a global prefill rank: `(rank % (P*S)) / P`.
    pub fn pp_stage(&self, prefill_rank: usize) -> usize {
        let p = self.shape.prefill_tp;
        (prefill_rank % (p * self.shape.prefill_pp)) / p
    }

    /// The union of all decode ranks' lists for `request_id`, sorted: the
    /// prefill ranks that will be read, so each prefill rank knows whether to
    /// wait for a reader or free its blocks at once.
    ///
    /// Computed from the rules directly (all ranks, or every row of the
    /// chosen replica columns), not by merging the lists, so the property
    /// tests can check one against the other. Its length is
    /// [`Self::pulled_prefill_rank_count`].
    pub fn pulled_prefill_ranks(&self, request_id: &str) -> Result<Vec<usize>> {
        self.pulled_prefill_ranks_for_seed(seed_for_request(request_id))
    }

    /// [`Self::pulled_prefill_ranks`] from an already computed seed.
    pub fn pulled_prefill_ranks_for_seed(&self, seed: u64) -> Result<Vec<usize>> {
        let (p, stages) = (self.shape.prefill_tp, self.shape.prefill_pp);
        match self.route {
            Route::SameTp | Route::Consecutive { .. } => Ok((0..p * stages).collect()),
            Route::Sampled { groups, rows, .. } => {
                // Every rank of a chosen replica column, in every row and
                // stage: `s*P + r*G + c`, ascending when the columns are.
                // Built from the output's own size, so a huge group count
                // with few chosen columns costs nothing.
                let mut columns = self.sampled_columns(seed)?;
                columns.sort_unstable();
                let mut ranks = Vec::with_capacity(stages * rows * columns.len());
                for s in 0..stages {
                    for r in 0..rows {
                        ranks.extend(columns.iter().map(|&c| s * p + r * groups + c));
                    }
                }
                Ok(ranks)
            }
        }
    }

    /// The decode rank that pulls from global prefill rank `prefill_rank` for
    /// `request_id`, or `None` if no decode rank reads it. At most one does:
    /// the rules never hand one prefill rank to two decode ranks.
    pub fn decode_rank_pulling_from(
        &self,
        request_id: &str,
        prefill_rank: usize,
    ) -> Result<Option<usize>> {
        let (p, stages) = (self.shape.prefill_tp, self.shape.prefill_pp);
        if prefill_rank >= p * stages {
            return Err(TopologyError::RankOutOfRange {
                what: "prefill rank",
                rank: prefill_rank,
                limit: p * stages,
            });
        }
        let tp_rank = prefill_rank % p;
        Ok(match self.route {
            Route::SameTp => Some(tp_rank),
            Route::Consecutive { per_rank } => Some(tp_rank / per_rank),
            Route::Sampled { groups, .. } => {
                let columns = self.sampled_columns(seed_for_request(request_id))?;
                let (row, column) = (tp_rank / groups, tp_rank % groups);
                columns
                    .iter()
                    .position(|&c| c == column)
                    .map(|pos| (row * columns.len() + pos) / self.pulls)
            }
        })
    }
}

/// `n` before validation; only called on shapes with nonzero TPs.
fn pulls_per_rank_unchecked(shape: &PdShape) -> usize {
    if shape.attention == Attention::Mla {
        return 1;
    }
    let heads = shape.num_kv_heads;
    (heads / shape.decode_tp).max(1) / (heads / shape.prefill_tp).max(1)
}
