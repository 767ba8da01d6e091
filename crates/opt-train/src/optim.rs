//! The optimizer side of a step: AdamW over the flat parameter buffer, clipping by global
//! gradient norm, and metaseq's dynamic loss scaler for fp16.
//!
//! Master weights and both moments are f32 buffers laid out like the parameters
//! ([`opt_model::ParamLayout`]), whatever precision the model computes in. One AdamW call covers
//! a run of consecutive parameters with the same weight decay: the whole buffer when decay
//! applies to everything (metaseq, `torch.optim.AdamW(model.parameters())`), or alternating
//! runs when biases and LayerNorms are excluded.

use opt_model::ParamLayout;
use opt_tensor::{AdamW, Backend, Buffer, DType};
use serde::{Deserialize, Serialize};

use crate::config::{DecayScope, Fp16Section, OptimSection};
use crate::Result;

/// First and second moments plus the count of applied updates (AdamW's bias-correction step).
pub struct AdamWState<B: Backend> {
    pub m: B::Buf,
    pub v: B::Buf,
    /// Updates applied so far (skipped steps do not count).
    pub updates: u64,
    /// `(offset, len, weight_decay)` runs covering the buffer.
    windows: Vec<(usize, usize, f32)>,
    beta1: f32,
    beta2: f32,
    eps: f32,
}

impl<B: Backend> AdamWState<B> {
    pub fn new(be: &B, layout: &ParamLayout, hp: &OptimSection) -> Result<Self> {
        Self::new_window(be, layout, hp, 0, layout.total())
    }

    /// The state of the window `[lo, hi)` of the flat buffer (a rank's FSDP / ZeRO shard):
    /// moments of `hi - lo` elements, and the decay runs clipped to the window and counted from
    /// its start.
    pub fn new_window(be: &B, layout: &ParamLayout, hp: &OptimSection, lo: usize, hi: usize) -> Result<Self> {
        let wd = hp.weight_decay as f32;
        let mut windows: Vec<(usize, usize, f32)> = Vec::new();
        let mut specs: Vec<_> = layout.specs.iter().collect();
        specs.sort_by_key(|s| s.offset);
        for s in specs {
            let decay = match hp.decay {
                DecayScope::All => wd,
                DecayScope::Matrices if s.is_matrix => wd,
                DecayScope::Matrices => 0.0,
            };
            let (a, b) = (s.offset.max(lo), (s.offset + s.numel()).min(hi));
            if a >= b {
                continue;
            }
            let (off, len) = (a - lo, b - a);
            match windows.last_mut() {
                Some(w) if w.2 == decay && w.0 + w.1 == off => w.1 += len,
                _ => windows.push((off, len, decay)),
            }
        }
        Ok(AdamWState {
            m: be.zeros(DType::F32, hi - lo)?,
            v: be.zeros(DType::F32, hi - lo)?,
            updates: 0,
            windows,
            beta1: hp.betas[0] as f32,
            beta2: hp.betas[1] as f32,
            eps: hp.eps as f32,
        })
    }

    /// One update of `params` (f32 master weights) with `grads · grad_scale` at rate `lr`.
    pub fn update(&mut self, be: &B, params: &mut B::Buf, grads: &B::Buf, lr: f32, grad_scale: f32) -> Result<()> {
        self.updates += 1;
        for &(off, len, weight_decay) in &self.windows {
            let hp = AdamW {
                lr,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay,
                step: self.updates,
                grad_scale,
            };
            be.adamw(
                params.at_mut(off, len),
                grads.at(off, len),
                self.m.at_mut(off, len),
                self.v.at_mut(off, len),
                &hp,
            )?;
        }
        Ok(())
    }
}

/// The global L2 norm of a gradient buffer (f64, deterministic).
pub fn grad_norm<B: Backend>(be: &B, grads: &B::Buf) -> Result<f64> {
    Ok(be.sum_squares(grads.v())?.sqrt())
}

/// `torch.nn.utils.clip_grad_norm_`'s multiplier: `min(1, max_norm / (norm + 1e-6))`, computed in
/// f32 as torch does. `max_norm = 0` disables clipping.
pub fn clip_coef(norm: f64, max_norm: f64) -> f32 {
    if max_norm <= 0.0 || !norm.is_finite() {
        return 1.0;
    }
    let c = max_norm as f32 / (norm as f32 + 1e-6);
    c.min(1.0)
}

/// metaseq's `DynamicLossScaler` (scale factor 2, tolerance 0): the loss is multiplied by
/// `scale` before backward; an overflowing step is skipped and halves the scale; every
/// `window` clean steps since the last overflow double it. Falling below `min_scale` stops the
/// run (metaseq raises `FloatingPointError("Minimum loss scale reached ...")`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    #[serde(with = "crate::checkpoint::exact_f64")]
    pub scale: f64,
    pub window: u64,
    #[serde(with = "crate::checkpoint::exact_f64")]
    pub min_scale: f64,
    /// Clean steps since the last overflow or rescale.
    pub clean: u64,
}

/// What the scaler did after a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScaleChange {
    Same,
    Grew(f64),
    Halved(f64),
}

impl LossScaler {
    pub fn new(cfg: &Fp16Section) -> Self {
        LossScaler { scale: cfg.init_scale, window: cfg.scale_window, min_scale: cfg.min_scale, clean: 0 }
    }

    /// A step without overflow.
    pub fn clean_step(&mut self) -> ScaleChange {
        self.clean += 1;
        if self.clean.is_multiple_of(self.window) {
            self.scale *= 2.0;
            self.clean = 0;
            return ScaleChange::Grew(self.scale);
        }
        ScaleChange::Same
    }

    /// An overflowing step: halve the scale. `Err(scale)` when it would fall below the minimum.
    pub fn overflow(&mut self) -> std::result::Result<ScaleChange, f64> {
        self.clean = 0;
        let next = self.scale / 2.0;
        if next < self.min_scale {
            return Err(self.scale);
        }
        self.scale = next;
        Ok(ScaleChange::Halved(next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaler_grows_halves_and_stops() {
        let mut s = LossScaler::new(&Fp16Section { init_scale: 4.0, scale_window: 3, min_scale: 1.0 });
        assert_eq!(s.clean_step(), ScaleChange::Same);
        assert_eq!(s.clean_step(), ScaleChange::Same);
        assert_eq!(s.clean_step(), ScaleChange::Grew(8.0));
        assert_eq!(s.overflow(), Ok(ScaleChange::Halved(4.0)));
        assert_eq!(s.clean_step(), ScaleChange::Same);
        assert_eq!(s.overflow(), Ok(ScaleChange::Halved(2.0)));
        assert_eq!(s.overflow(), Ok(ScaleChange::Halved(1.0)));
        assert_eq!(s.overflow(), Err(1.0));
    }

    #[test]
    fn clip_coefficient_follows_torch() {
        assert_eq!(clip_coef(0.5, 1.0), 1.0);
        assert!((clip_coef(4.0, 1.0) - 1.0 / (4.0 + 1e-6)).abs() < 1e-7);
        assert_eq!(clip_coef(4.0, 0.0), 1.0);
    }
}
