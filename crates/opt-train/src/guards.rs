//! Stability guards: the fixes the OPT-175B logbook records being applied by hand, automated.
//!
//! Every step's loss and gradient norm are judged before the update is applied:
//! - a non-finite loss or gradient → skip the step; `max_nonfinite` in a row → roll back;
//! - a loss above `spike_ratio ×` the exponentially weighted mean of accepted losses → skip the
//!   batch; `max_spikes` such skips within `spike_window` steps → roll back.
//!
//! Rolling back (done by the trainer) restores the last checkpoint, multiplies the learning
//! rate by `rollback_lr_factor` and continues on the data *after* the bad batches, which is
//! what the OPT team did (restart from an earlier checkpoint with a lower LR, skipping data).

use serde::{Deserialize, Serialize};

use crate::config::GuardSection;

/// What to do with a step.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Accept,
    SkipNonFinite,
    SkipSpike { ratio: f64, ewma: f64 },
    Rollback { reason: String },
}

/// Guard state, saved in checkpoints (the mean as exact bits, so a resume is bit for bit).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GuardState {
    /// Exponentially weighted mean of accepted losses, as `f64::to_bits` (None before the first).
    pub ewma_bits: Option<u64>,
    /// Accepted steps so far.
    pub accepted: u64,
    /// Steps of recent skipped spikes.
    pub spikes: Vec<u64>,
    /// Non-finite steps in a row.
    pub nonfinite_run: usize,
}

impl GuardState {
    pub fn ewma(&self) -> Option<f64> {
        self.ewma_bits.map(f64::from_bits)
    }

    /// Judge step `step` (0-based) with its loss and gradient norm.
    pub fn judge(&mut self, cfg: &GuardSection, step: u64, loss: f64, grad_norm: f64) -> Verdict {
        if !cfg.enabled {
            return Verdict::Accept;
        }
        if !loss.is_finite() || !grad_norm.is_finite() {
            self.nonfinite_run += 1;
            if self.nonfinite_run >= cfg.max_nonfinite {
                return Verdict::Rollback { reason: format!("{} non-finite steps in a row", self.nonfinite_run) };
            }
            return Verdict::SkipNonFinite;
        }
        self.nonfinite_run = 0;
        if let Some(ewma) = self.ewma() {
            let ratio = loss / ewma;
            if self.accepted >= cfg.warmup_steps && ratio > cfg.spike_ratio {
                self.spikes.retain(|&s| s + cfg.spike_window > step);
                self.spikes.push(step);
                if self.spikes.len() >= cfg.max_spikes {
                    return Verdict::Rollback {
                        reason: format!(
                            "{} loss spikes within {} steps (last: loss {loss:.4} = {ratio:.2} × average {ewma:.4})",
                            self.spikes.len(),
                            cfg.spike_window
                        ),
                    };
                }
                return Verdict::SkipSpike { ratio, ewma };
            }
        }
        Verdict::Accept
    }

    /// Record an applied step's loss.
    pub fn accept(&mut self, cfg: &GuardSection, loss: f64) {
        let next = match self.ewma() {
            None => loss,
            Some(e) => cfg.ewma_decay * e + (1.0 - cfg.ewma_decay) * loss,
        };
        self.ewma_bits = Some(next.to_bits());
        self.accepted += 1;
    }

    /// After a rollback: forget the spike history and the non-finite streak.
    pub fn clear_trouble(&mut self) {
        self.spikes.clear();
        self.nonfinite_run = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GuardSection {
        GuardSection {
            enabled: true,
            ewma_decay: 0.5,
            spike_ratio: 2.0,
            warmup_steps: 2,
            max_spikes: 2,
            spike_window: 10,
            max_nonfinite: 2,
            rollback_lr_factor: 0.5,
            max_rollbacks: 1,
        }
    }

    #[test]
    fn verdicts() {
        let c = cfg();
        let mut g = GuardState::default();
        // No judging of spikes before warmup_steps accepted steps.
        assert_eq!(g.judge(&c, 0, 4.0, 1.0), Verdict::Accept);
        g.accept(&c, 4.0);
        assert_eq!(g.judge(&c, 1, 100.0, 1.0), Verdict::Accept);
        g.accept(&c, 2.0);
        assert_eq!(g.ewma(), Some(3.0));
        assert_eq!(g.judge(&c, 2, 7.0, 1.0), Verdict::SkipSpike { ratio: 7.0 / 3.0, ewma: 3.0 });
        assert_eq!(g.judge(&c, 3, f64::NAN, 1.0), Verdict::SkipNonFinite);
        assert!(matches!(g.judge(&c, 4, 1.0, f64::INFINITY), Verdict::Rollback { .. }));
        g.clear_trouble();
        // A spike outside the window is forgotten; two inside roll back.
        assert!(matches!(g.judge(&c, 20, 7.0, 1.0), Verdict::SkipSpike { .. }));
        assert!(matches!(g.judge(&c, 25, 7.0, 1.0), Verdict::Rollback { .. }));
        let mut off = GuardState::default();
        assert_eq!(off.judge(&GuardSection { enabled: false, ..c }, 0, f64::NAN, 1.0), Verdict::Accept);
    }
}
