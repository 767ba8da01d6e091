//! The model calls the engine makes, in one place, so that tensor-parallel followers can repeat
//! them.
//!
//! With tensor parallelism (`opt_dist::parallelize`) every rank holds a slice of every layer, and
//! every rank must make the same model calls in the same order on the same inputs; the
//! collectives inside those calls (the model's hooks) do the rest. Only the leader (rank 0) runs
//! the HTTP server and the scheduler. Every model call of the engine goes through [`Runner`],
//! which on the leader first hands the call to the followers as a [`Call`] message
//! ([`Followers::broadcast`]) and then runs it; a follower ([`follow`]) receives each message and
//! runs the same `Runner` code on its own slice. KV caches live in the runner, keyed by sequence
//! id, so leader and followers hold the same caches. Token choice, stop strings and best_of
//! ranking stay on the leader: followers only see which tokens to feed.
//!
//! Failure: with followers, a failed broadcast or a failed model call on the leader may have left
//! the ranks out of step, so the engine stops (requests get an error, `/health` turns 503 and
//! [`crate::Server::run_until_ctrl_c`] returns); the followers are told `Shutdown` whenever the
//! engine ends. A follower stops with an error when a receive or a model call fails.
//! Without followers (one process) the runner is a thin wrapper over the model.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::time::Duration;

use opt_generate::{GenerateError, GenerateOutput, GenerateRequest, Generator};
use opt_model::{score_sequence, KvCache, LogitsMode, OptModel, SequenceScore};
use opt_tensor::{Backend, Buffer};
use opt_tokenizer::OptTokenizer;
use serde::{Deserialize, Serialize};

use crate::error::ServeError;

/// One model call of the engine, as the leader broadcasts it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Call {
    /// Run `ids` into a new batch-1 cache for sequence `seq` with room for `capacity`
    /// positions; logits of every position when `all`, else of the last one.
    Prefill { seq: u64, ids: Vec<u32>, capacity: usize, all: bool },
    /// A copy of sequence `from`'s cache for a new sequence `to` (`n` > 1 candidates).
    Fork { from: u64, to: u64 },
    /// One decode step: `tokens[i]` is fed to sequence `seqs[i]`.
    Step { seqs: Vec<u64>, tokens: Vec<u32> },
    /// These sequences left the batch: drop their caches.
    Release { seqs: Vec<u64> },
    /// Prompt log-probs without generation (`score_sequence`).
    Score { ids: Vec<u32>, top: usize },
    /// A whole request through `Generator` (beam search).
    Generate { request: GenerateRequest },
    /// Nothing to do: sent while the leader is idle, so that followers waiting with a timeout
    /// know it is alive.
    Idle,
    /// The engine stopped: followers return.
    Shutdown,
}

/// The leader's link to its followers.
pub trait Followers: Send {
    /// Deliver `msg` to every follower (they receive messages in the order they are sent).
    fn broadcast(&mut self, msg: &[u8]) -> Result<(), String>;
    /// While idle the leader sends [`Call::Idle`] this often; keep it well below the followers'
    /// receive timeout.
    fn heartbeat(&self) -> Duration {
        Duration::from_secs(10)
    }
}

/// The engine's model and its sequences' KV caches.
pub(crate) struct Runner<B: Backend> {
    model: OptModel<B>,
    caches: HashMap<u64, KvCache<B>>,
    followers: Option<Box<dyn Followers>>,
    /// Why the followers can no longer be kept in step (leader only).
    broken: Option<String>,
}

fn missing(seq: u64) -> opt_model::ModelError {
    opt_model::ModelError::Input(format!("no KV cache for sequence {seq}"))
}

impl<B: Backend> Runner<B> {
    pub fn new(model: OptModel<B>, followers: Option<Box<dyn Followers>>) -> Self {
        Runner { model, caches: HashMap::new(), followers, broken: None }
    }

    pub fn model(&self) -> &OptModel<B> {
        &self.model
    }

    /// The leader's heartbeat interval, when it has followers.
    pub fn heartbeat(&self) -> Option<Duration> {
        self.followers.as_ref().map(|f| f.heartbeat())
    }

    /// Why the engine must stop (followers out of step), if it must.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Hand `call` to the followers (no-op without any).
    fn announce(&mut self, call: &Call) -> opt_model::Result<()> {
        let Some(f) = self.followers.as_mut() else { return Ok(()) };
        if let Some(b) = &self.broken {
            return Err(opt_model::ModelError::Input(b.clone()));
        }
        let sent = serde_json::to_vec(call).map_err(|e| e.to_string()).and_then(|msg| f.broadcast(&msg));
        sent.map_err(|e| {
            let msg = format!("tensor-parallel followers unreachable: {e}");
            self.broken = Some(msg.clone());
            opt_model::ModelError::Input(msg)
        })
    }

    /// With followers, a failed model call stops the engine (see the module docs).
    fn checked<T>(&mut self, r: opt_model::Result<T>) -> opt_model::Result<T> {
        if let (Err(e), Some(_)) = (&r, &self.followers) {
            self.broken.get_or_insert_with(|| format!("a tensor-parallel model call failed: {e}"));
        }
        r
    }

    pub fn prefill(&mut self, seq: u64, ids: &[u32], capacity: usize, all: bool) -> opt_model::Result<B::Buf> {
        self.announce(&Call::Prefill { seq, ids: ids.to_vec(), capacity, all })?;
        let r = self.run_prefill(seq, ids, capacity, all);
        self.checked(r)
    }

    pub fn fork(&mut self, from: u64, to: u64) -> opt_model::Result<()> {
        self.announce(&Call::Fork { from, to })?;
        let r = self.run_fork(from, to);
        self.checked(r)
    }

    pub fn step(&mut self, seqs: &[u64], tokens: &[u32]) -> opt_model::Result<B::Buf> {
        self.announce(&Call::Step { seqs: seqs.to_vec(), tokens: tokens.to_vec() })?;
        let r = self.run_step(seqs, tokens);
        self.checked(r)
    }

    /// Drop the caches of every sequence `live` says is gone.
    pub fn retain(&mut self, live: impl Fn(u64) -> bool) {
        let mut gone: Vec<u64> = self.caches.keys().copied().filter(|&s| !live(s)).collect();
        if gone.is_empty() {
            return;
        }
        gone.sort_unstable();
        // A failed announcement marks the runner broken; the engine stops at its next turn.
        let _ = self.announce(&Call::Release { seqs: gone.clone() });
        self.run_release(&gone);
    }

    pub fn score(&mut self, ids: &[u32], top: usize) -> opt_model::Result<SequenceScore> {
        self.announce(&Call::Score { ids: ids.to_vec(), top })?;
        let r = score_sequence(&self.model, ids, top);
        self.checked(r)
    }

    /// Run `request` through `Generator`. `cancelled` is polled as events arrive; with followers
    /// it is ignored (a leader that stopped early would leave them waiting in a collective), so
    /// a cancelled tensor-parallel beam search runs to its end and is then discarded.
    pub fn generate(
        &mut self,
        tok: &OptTokenizer,
        request: &GenerateRequest,
        cancelled: impl Fn() -> bool,
    ) -> Result<GenerateOutput, GenerateError> {
        self.announce(&Call::Generate { request: request.clone() })?;
        let lone = self.followers.is_none();
        let generator = Generator::new(&self.model, Some(tok));
        let out = generator.generate_stream(request, |_| {
            if lone && cancelled() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        if let (Err(GenerateError::Model(_) | GenerateError::Tensor(_)), Some(_)) = (&out, &self.followers) {
            let e = out.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
            self.broken.get_or_insert_with(|| format!("a tensor-parallel model call failed: {e}"));
        }
        out
    }

    /// Tell idle followers the leader is alive.
    pub fn idle(&mut self) {
        let _ = self.announce(&Call::Idle);
    }

    // ---- the calls themselves: the same code on the leader and on every follower -------------

    fn run_prefill(&mut self, seq: u64, ids: &[u32], capacity: usize, all: bool) -> opt_model::Result<B::Buf> {
        let mut cache = KvCache::for_model(&self.model, 1, capacity)?;
        let mode = if all { LogitsMode::All } else { LogitsMode::Last };
        let logits = self.model.forward(ids, 1, None, Some(&mut cache), mode)?;
        self.caches.insert(seq, cache);
        Ok(logits)
    }

    fn run_fork(&mut self, from: u64, to: u64) -> opt_model::Result<()> {
        let src = self.caches.get(&from).ok_or_else(|| missing(from))?;
        let be = &self.model.backend;
        let mut dst = KvCache::for_model(&self.model, 1, src.capacity)?;
        // This rank's heads only under tensor parallelism.
        let n = src.len * self.model.layout.attn_dim;
        for l in 0..self.model.cfg.num_hidden_layers {
            be.copy(dst.k[l].at_mut(0, n), src.k[l].at(0, n))?;
            be.copy(dst.v[l].at_mut(0, n), src.v[l].at(0, n))?;
        }
        dst.len = src.len;
        self.caches.insert(to, dst);
        Ok(())
    }

    fn run_step(&mut self, seqs: &[u64], tokens: &[u32]) -> opt_model::Result<B::Buf> {
        // Take the caches out in batch order (a sequence appears once), then put them back.
        let mut taken = Vec::with_capacity(seqs.len());
        for &s in seqs {
            match self.caches.remove(&s) {
                Some(c) => taken.push((s, c)),
                None => {
                    self.caches.extend(taken);
                    return Err(missing(s));
                }
            }
        }
        let out = {
            let mut refs: Vec<&mut KvCache<B>> = taken.iter_mut().map(|(_, c)| c).collect();
            self.model.forward_step(tokens, &mut refs)
        };
        self.caches.extend(taken);
        out
    }

    fn run_release(&mut self, seqs: &[u64]) {
        for s in seqs {
            self.caches.remove(s);
        }
    }

    /// A follower's turn: run one call from the leader. `Ok(false)` on `Shutdown`.
    fn follow_one(&mut self, tok: &OptTokenizer, call: Call) -> Result<bool, String> {
        match call {
            Call::Prefill { seq, ids, capacity, all } => {
                self.run_prefill(seq, &ids, capacity, all).map_err(|e| e.to_string())?;
            }
            Call::Fork { from, to } => self.run_fork(from, to).map_err(|e| e.to_string())?,
            Call::Step { seqs, tokens } => {
                self.run_step(&seqs, &tokens).map_err(|e| e.to_string())?;
            }
            Call::Release { seqs } => self.run_release(&seqs),
            Call::Score { ids, top } => {
                score_sequence(&self.model, &ids, top).map_err(|e| e.to_string())?;
            }
            Call::Generate { request } => {
                // Option and prompt errors happen on the leader too, before any model call;
                // only a failed model call leaves the ranks out of step.
                if let Err(e @ (GenerateError::Model(_) | GenerateError::Tensor(_))) =
                    Generator::new(&self.model, Some(tok)).generate(&request)
                {
                    return Err(e.to_string());
                }
            }
            Call::Idle => {}
            Call::Shutdown => return Ok(false),
        }
        Ok(true)
    }
}

impl<B: Backend> Drop for Runner<B> {
    fn drop(&mut self) {
        // However the engine ends, the followers must not wait for another call.
        if let Some(f) = self.followers.as_mut() {
            if let Ok(msg) = serde_json::to_vec(&Call::Shutdown) {
                let _ = f.broadcast(&msg);
            }
        }
    }
}

/// A tensor-parallel follower: receive the leader's calls with `recv` and run each on this
/// rank's slice of the model, until the leader says [`Call::Shutdown`]. `tokenizer` must be the
/// leader's (beam search with stop strings decodes text on every rank).
pub fn follow<B: Backend>(
    model: OptModel<B>,
    tokenizer: &OptTokenizer,
    mut recv: impl FnMut() -> Result<Vec<u8>, String>,
) -> Result<(), ServeError> {
    let mut runner = Runner::new(model, None);
    loop {
        let msg = recv().map_err(|e| ServeError::Follower(format!("waiting for the leader's next call: {e}")))?;
        let call: Call = serde_json::from_slice(&msg)
            .map_err(|e| ServeError::Follower(format!("unreadable call from the leader: {e}")))?;
        let what = format!("{call:?}");
        match runner.follow_one(tokenizer, call) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => {
                let what: String = what.chars().take(120).collect();
                return Err(ServeError::Follower(format!("model call {what} failed: {e}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opt_generate::{Prompt, SamplingParams};

    #[test]
    fn calls_survive_the_wire() {
        let params = SamplingParams {
            num_beams: 3,
            temperature: Some(0.7),
            stop: vec!["\n".into(), "x".into()],
            seed: Some(u64::MAX - 5),
            logprobs: Some(2),
            ..SamplingParams::default()
        };
        let calls = vec![
            Call::Prefill { seq: 3, ids: vec![2, 5, 9], capacity: 7, all: true },
            Call::Fork { from: 3, to: 4 },
            Call::Step { seqs: vec![4, 3], tokens: vec![11, 12] },
            Call::Release { seqs: vec![3] },
            Call::Score { ids: vec![2, 8], top: 1 },
            Call::Generate {
                request: GenerateRequest::new(vec![Prompt::Ids(vec![2, 7]), Prompt::Ids(vec![])], params),
            },
            Call::Idle,
            Call::Shutdown,
        ];
        for c in calls {
            let bytes = serde_json::to_vec(&c).expect("serialise");
            let back: Call = serde_json::from_slice(&bytes).expect("deserialise");
            match (&back, &c) {
                (Call::Generate { request: a }, Call::Generate { request: b }) => {
                    assert_eq!(a.prompts, b.prompts);
                    assert_eq!(a.params, b.params);
                }
                _ => assert_eq!(format!("{back:?}"), format!("{c:?}")),
            }
        }
    }
}
