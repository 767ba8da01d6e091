//! Learning-rate schedules.
//!
//! `s` counts updates from 0: update `s` uses `lr(s)`. This is metaseq's convention
//! (`polynomial_decay.step_update(num_updates)` runs after each update and sets the rate the
//! next one uses) and `torch.optim.lr_scheduler.LambdaLR`'s (`scheduler.step()` after
//! `optimizer.step()`), so with warmup the very first update runs at rate 0, as in both.
//!
//! - warmup (`s <= W`, when `W > 0`): `peak · s / W`;
//! - constant: `peak` afterwards;
//! - linear (metaseq `polynomial_decay`, power 1): `(peak − end) · (1 − (s − W)/(T − W)) + end`,
//!   and `end` from `s >= T` on;
//! - cosine: `end + (peak − end) · (1 + cos(π · (s − W)/(T − W))) / 2`, and `end` from `T` on
//!   (torch's `CosineAnnealingLR(T_max = T − W, eta_min = end)` after the warmup).
//!
//! All arithmetic is f64, as in Python; the optimizer rounds the result to f32.

use crate::config::{ScheduleKind, TrainConfig};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak: f64,
    pub end: f64,
    pub warmup: u64,
    pub total: u64,
}

impl Schedule {
    pub fn from_config(cfg: &TrainConfig) -> Self {
        Schedule {
            kind: cfg.schedule.kind,
            peak: cfg.optim.lr,
            end: cfg.schedule.end_lr,
            warmup: cfg.schedule.warmup_steps,
            total: cfg.schedule_total(),
        }
    }

    /// The learning rate of update `s` (0-based).
    pub fn lr(&self, s: u64) -> f64 {
        let (w, t) = (self.warmup, self.total);
        if w > 0 && s <= w {
            return self.peak * s as f64 / w as f64;
        }
        match self.kind {
            ScheduleKind::Constant => self.peak,
            ScheduleKind::Linear => {
                if s >= t {
                    self.end
                } else {
                    let remaining = 1.0 - (s - w) as f64 / (t - w) as f64;
                    (self.peak - self.end) * remaining + self.end
                }
            }
            ScheduleKind::Cosine => {
                if s >= t {
                    self.end
                } else {
                    let progress = (s - w) as f64 / (t - w) as f64;
                    self.end + (self.peak - self.end) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind) -> Schedule {
        Schedule { kind, peak: 1e-3, end: 1e-4, warmup: 4, total: 10 }
    }

    #[test]
    fn warmup_then_decay_endpoints() {
        for kind in [ScheduleKind::Linear, ScheduleKind::Cosine] {
            let s = sched(kind);
            assert_eq!(s.lr(0), 0.0);
            assert!((s.lr(2) - 5e-4).abs() < 1e-15);
            assert!((s.lr(4) - 1e-3).abs() < 1e-15);
            assert!((s.lr(10) - 1e-4).abs() < 1e-15);
            assert!((s.lr(50) - 1e-4).abs() < 1e-15);
            // Monotone decay after the warmup.
            for i in 4..10 {
                assert!(s.lr(i + 1) < s.lr(i), "{kind:?} at {i}");
            }
        }
        let s = sched(ScheduleKind::Linear);
        assert!((s.lr(7) - (9e-4 * 0.5 + 1e-4)).abs() < 1e-15);
        let s = sched(ScheduleKind::Cosine);
        assert!((s.lr(7) - (1e-4 + 9e-4 * 0.5)).abs() < 1e-15);
        let s = sched(ScheduleKind::Constant);
        assert_eq!(s.lr(100), 1e-3);
        let s = Schedule { warmup: 0, ..sched(ScheduleKind::Constant) };
        assert_eq!(s.lr(0), 1e-3);
    }
}
