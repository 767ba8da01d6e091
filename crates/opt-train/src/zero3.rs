//! FSDP / ZeRO-3 for the trainer: a rank holds its window of master weights, moments and
//! gradient (as in every sharded run) and, on the compute side, only the non-layer parameters
//! plus one layer slot ([`opt_model::ParamLayout::streamed`]). [`Zero3Stream`] is the model's
//! [`LayerStream`]: before each layer's forward and backward it all-gathers that layer from
//! the fsdp ranks' windows; after each layer's backward it reduce-scatters the layer's
//! gradient into this rank's window of the step's gradient. The non-layer parameters are
//! gathered after each update ([`gather_resident`]) and their gradient reduced once per step
//! ([`reduce_resident`]).
//!
//! Every fsdp rank makes the same collectives in the same order: the model fetches and reduces
//! layers in a fixed order (forward 0..L, backward L-1..0, the last layer kept in the slot).
//!
//! ZeRO-2 (`parallel.reshard_after_forward = false`) uses the same stream with a `local` copy
//! of the whole slice, all-gathered once per step after the update: a fetch is then a copy out
//! of it (no collective), while each layer's gradient is still reduce-scattered right after its
//! backward, so no rank ever holds the slice's whole gradient.

use opt_model::{LayerStream, ModelError, OptModel, ParamLayout, Pass};
use opt_tensor::{Backend, Buffer, View, ViewMut};

use crate::parallel::Parallel;
use crate::{Result, TrainError};

/// `[a, b) ∩ [lo, hi)`, empty as `(a, a)`.
fn meet((a, b): (usize, usize), (lo, hi): (usize, usize)) -> (usize, usize) {
    let (x, y) = (a.max(lo), b.min(hi));
    if x < y {
        (x, y)
    } else {
        (a, a)
    }
}

/// This rank's part (window ∩ range) of range `[a, b)` of the master weights, to the host.
fn my_part<B: Backend>(be: &B, master: &B::Buf, window: (usize, usize), range: (usize, usize)) -> Result<Vec<f32>> {
    let (x, y) = meet(range, window);
    if x == y {
        return Ok(Vec::new());
    }
    Ok(be.to_f32(master.at(x - window.0, y - x))?)
}

/// Add `part` (this rank's window ∩ `range`) into the window-long `acc`.
fn add_part(acc: &mut [f32], window: (usize, usize), range: (usize, usize), part: &[f32]) {
    let (x, y) = meet(range, window);
    if x == y {
        return;
    }
    for (o, g) in acc[x - window.0..y - window.0].iter_mut().zip(part) {
        *o += g;
    }
}

/// The model's layer stream over the fsdp group.
pub struct Zero3Stream<'a, B: Backend> {
    pub par: &'a dyn Parallel<B>,
    /// The slice's ordinary layout (where each layer lives in the flat buffer).
    pub slice: &'a ParamLayout,
    pub window: (usize, usize),
    /// This rank's f32 master weights (its window).
    pub master: &'a B::Buf,
    /// The step's gradient, this rank's window, summed over the fsdp group (`None` in a
    /// forward-only pass).
    pub grad: Option<&'a mut [f32]>,
    /// ZeRO-2: the whole slice, gathered (in the compute dtype); fetches copy out of it.
    pub local: Option<&'a B::Buf>,
    /// The first collective error, kept whole (the model sees only its text).
    pub failed: Option<TrainError>,
}

impl<'a, B: Backend> Zero3Stream<'a, B> {
    pub fn new(
        par: &'a dyn Parallel<B>,
        slice: &'a ParamLayout,
        window: (usize, usize),
        master: &'a B::Buf,
        grad: Option<&'a mut [f32]>,
    ) -> Self {
        Zero3Stream { par, slice, window, master, grad, local: None, failed: None }
    }

    /// Fetch layers from `local` (the gathered slice, ZeRO-2) instead of gathering them.
    pub fn with_local(mut self, local: Option<&'a B::Buf>) -> Self {
        self.local = local;
        self
    }

    /// The model call's result, with a collective failure reported as the original error.
    pub fn finish<T>(self, r: opt_model::Result<T>) -> Result<T> {
        match (r, self.failed) {
            (Err(_), Some(e)) => Err(e),
            (r, _) => Ok(r?),
        }
    }

    fn layer(&self, li: usize) -> Result<(usize, usize)> {
        self.slice
            .layer_range(li)
            .ok_or_else(|| TrainError::Model(ModelError::Input(format!("layer {li} is not in this slice's layout"))))
    }

    fn keep<T>(&mut self, r: Result<T>) -> opt_model::Result<T> {
        r.map_err(|e| {
            let text = e.to_string();
            self.failed.get_or_insert(e);
            ModelError::Parallel(text)
        })
    }
}

impl<B: Backend> LayerStream<B> for Zero3Stream<'_, B> {
    fn fetch(&mut self, be: &B, li: usize, _pass: Pass, slot: ViewMut<'_, B::Buf>) -> opt_model::Result<()> {
        let r = (|| {
            let range = self.layer(li)?;
            if let Some(local) = self.local {
                be.copy(slot, local.at(range.0, range.1 - range.0))?;
                return Ok(());
            }
            let mine = my_part(be, self.master, self.window, range)?;
            let whole = self.par.gather_range(&mine, self.slice.total(), range)?;
            let x = be.from_f32(&whole, slot.buf.dtype())?;
            be.copy(slot, x.v())?;
            Ok(())
        })();
        self.keep(r)
    }

    fn reduce(&mut self, be: &B, li: usize, grad: View<'_, B::Buf>) -> opt_model::Result<()> {
        let r = (|| {
            let range = self.layer(li)?;
            let host = be.to_f32(grad)?;
            let part = self.par.reduce_range(&host, self.slice.total(), range)?;
            let acc = self.grad.as_deref_mut().ok_or_else(|| {
                TrainError::Model(ModelError::Input("a forward-only layer stream was handed a gradient".into()))
            })?;
            add_part(acc, self.window, range, &part);
            Ok(())
        })();
        self.keep(r)
    }
}

/// Gather the non-layer parameters (embeddings, projections, final norm, LM head) from every
/// fsdp rank's master window into the streamed model's buffer.
pub fn gather_resident<B: Backend>(
    par: &dyn Parallel<B>,
    slice: &ParamLayout,
    window: (usize, usize),
    master: &B::Buf,
    model: &mut OptModel<B>,
) -> Result<()> {
    let be = &model.backend;
    for (a, b, at) in slice.resident_ranges() {
        let mine = my_part(be, master, window, (a, b))?;
        let whole = par.gather_range(&mine, slice.total(), (a, b))?;
        let x = be.from_f32(&whole, model.params.dtype())?;
        be.copy(model.params.at_mut(at, b - a), x.v())?;
    }
    Ok(())
}

/// Reduce the non-layer parameters' gradient (accumulated in the streamed model's gradient
/// buffer `grads`) into this rank's window `acc`.
pub fn reduce_resident<B: Backend>(
    par: &dyn Parallel<B>,
    be: &B,
    slice: &ParamLayout,
    window: (usize, usize),
    grads: &B::Buf,
    acc: &mut [f32],
) -> Result<()> {
    for (a, b, at) in slice.resident_ranges() {
        let host = be.to_f32(grads.at(at, b - a))?;
        let part = par.reduce_range(&host, slice.total(), (a, b))?;
        add_part(acc, window, (a, b), &part);
    }
    Ok(())
}

/// ZeRO-2: copy the non-layer parameters out of the gathered slice `local` into the streamed
/// model's buffer.
pub fn copy_resident<B: Backend>(slice: &ParamLayout, local: &B::Buf, model: &mut OptModel<B>) -> Result<()> {
    let be = &model.backend;
    for (a, b, at) in slice.resident_ranges() {
        be.copy(model.params.at_mut(at, b - a), local.at(a, b - a))?;
    }
    Ok(())
}
