//! A streamed model (`ParamLayout::streamed`: one layer slot, layers supplied by a
//! `LayerStream`, as FSDP / ZeRO-3 runs it) computes exactly what the ordinary model does:
//! logits (with and without a KV cache), loss, and every gradient, on every fixture layout
//! (pre-LN, 350M's post-LN with projections, no final LN, Galactica's no-bias / no-affine).

mod common;

use common::{fixture, load, Reference};
use opt_model::{
    causal_targets, KvCache, LayerStream, LogitsMode, OptModel, ParamLayout, Pass, TrainBatch, TrainState,
};
use opt_tensor::{Backend, Buffer, CpuBackend, DType, View, ViewMut};

const MODELS: [&str; 4] = ["pre_ln", "post_ln_proj", "no_final_ln", "galactica"];

/// Holds the whole model on the host and serves its layers; sums their gradients.
struct HostStream {
    full: ParamLayout,
    params: Vec<f32>,
    grads: Vec<f32>,
    fetches: Vec<(usize, Pass)>,
    reduces: Vec<usize>,
}

impl LayerStream<CpuBackend> for HostStream {
    fn fetch(
        &mut self,
        be: &CpuBackend,
        li: usize,
        pass: Pass,
        slot: ViewMut<'_, <CpuBackend as Backend>::Buf>,
    ) -> opt_model::Result<()> {
        let (a, b) = self.full.layer_range(li).expect("layer");
        assert_eq!(slot.len, b - a);
        let x = be.from_f32(&self.params[a..b], slot.buf.dtype())?;
        be.copy(slot, x.v())?;
        self.fetches.push((li, pass));
        Ok(())
    }
    fn reduce(
        &mut self,
        be: &CpuBackend,
        li: usize,
        grad: View<'_, <CpuBackend as Backend>::Buf>,
    ) -> opt_model::Result<()> {
        let (a, b) = self.full.layer_range(li).expect("layer");
        for (o, x) in self.grads[a..b].iter_mut().zip(be.to_f32(grad)?) {
            *o += x;
        }
        self.reduces.push(li);
        Ok(())
    }
}

fn streamed(model: &OptModel<CpuBackend>) -> (OptModel<CpuBackend>, HostStream) {
    let full = model.layout.clone();
    let params = model.params_f32().expect("params");
    let copy = OptModel::from_folder(CpuBackend::new(), &fixture_dir(model), DType::F32).expect("load");
    let s = copy.into_streamed().expect("streamed");
    let n = full.total();
    (s, HostStream { full, params, grads: vec![0.0; n], fetches: vec![], reduces: vec![] })
}

fn fixture_dir(model: &OptModel<CpuBackend>) -> std::path::PathBuf {
    // The fixtures are told apart by their configs.
    for m in MODELS {
        let cfg = opt_model::OptConfig::from_path(&fixture(m)).expect("config");
        if cfg == model.cfg {
            return fixture(m);
        }
    }
    panic!("no fixture with this config");
}

#[test]
fn streamed_layout_holds_one_layer() {
    for m in MODELS {
        let model = load(m, DType::F32);
        let full = &model.layout;
        let s = full.streamed();
        let nl = model.cfg.num_hidden_layers;
        let (a, b) = full.layer_range(0).expect("layer 0");
        let layer = b - a;
        for li in 1..nl {
            let (x, y) = full.layer_range(li).expect("layer");
            assert_eq!((x, y - x), (a + li * layer, layer), "{m}: layer {li} is contiguous after the previous one");
        }
        assert_eq!(s.total(), full.total() - (nl - 1) * layer, "{m}");
        assert_eq!(s.slot, Some((a, a + layer)), "{m}");
        assert!(s.layers.iter().all(|l| *l == s.layers[0]), "{m}");
        // Resident ranges cover everything outside the layers, once.
        let res: usize = full.resident_ranges().iter().map(|r| r.1 - r.0).sum();
        assert_eq!(res + nl * layer, full.total(), "{m}");
        // The ordinary entry points refuse a streamed model.
        let (sm, _) = streamed(&model);
        let Err(err) = sm.forward(&[2, 5, 6], 1, None, None, LogitsMode::All) else {
            panic!("{m}: a streamed model's ordinary forward must be refused");
        };
        assert!(err.to_string().contains("streamed"), "{m}: {err}");
    }
}

#[test]
fn streamed_forward_equals_ordinary() {
    for m in MODELS {
        let model = load(m, DType::F32);
        let r = Reference::open(m);
        let ids = r.u32s("input_ids");
        let mask = r.mask("attention_mask");
        let shape = r.shape("input_ids");
        let (b, t) = (shape[0], shape[1]);
        let want = model.forward(&ids, b, Some(&mask), None, LogitsMode::All).expect("forward").to_f32_vec();
        let (mut sm, mut stream) = streamed(&model);
        let got = sm
            .forward_streamed(&ids, b, Some(&mask), None, LogitsMode::All, &mut stream)
            .expect("streamed forward")
            .to_f32_vec();
        assert_eq!(got, want, "{m}: logits");
        let nl = model.cfg.num_hidden_layers;
        assert_eq!(stream.fetches, (0..nl).map(|l| (l, Pass::Forward)).collect::<Vec<_>>(), "{m}");

        // KV-cache decoding, one token at a time after a prefill.
        let row = &ids[..t];
        let mut c1 = KvCache::for_model(&model, 1, t).expect("cache");
        let mut c2 = KvCache::for_model(&sm, 1, t).expect("cache");
        let p = t / 2;
        let w1 = model.forward(&row[..p], 1, None, Some(&mut c1), LogitsMode::Last).expect("prefill").to_f32_vec();
        let w2 = sm
            .forward_streamed(&row[..p], 1, None, Some(&mut c2), LogitsMode::Last, &mut stream)
            .expect("prefill")
            .to_f32_vec();
        assert_eq!(w1, w2, "{m}: prefill");
        for &id in &row[p..] {
            let w1 = model.forward(&[id], 1, None, Some(&mut c1), LogitsMode::Last).expect("step").to_f32_vec();
            let w2 = sm
                .forward_streamed(&[id], 1, None, Some(&mut c2), LogitsMode::Last, &mut stream)
                .expect("step")
                .to_f32_vec();
            assert_eq!(w1, w2, "{m}: decode step");
        }
    }
}

#[test]
fn streamed_gradients_equal_ordinary() {
    for m in MODELS {
        let model = load(m, DType::F32);
        let r = Reference::open(m);
        let ids = r.u32s("input_ids");
        let mask = r.mask("attention_mask");
        let shape = r.shape("input_ids");
        let (b, t) = (shape[0], shape[1]);
        let targets = causal_targets(&ids, &mask, b, t);
        let batch = TrainBatch { ids: &ids, mask: &mask, targets: &targets, batch: b, seq: t };
        let be = &model.backend;

        let mut st = TrainState::new(&model, b, t).expect("state");
        let mut grads = be.zeros(DType::F32, model.layout.total()).expect("grads");
        let want = model.forward_backward(&batch, &mut st, &mut grads, None, None).expect("fwd/bwd");
        let want_g = grads.to_f32_vec();

        let (mut sm, mut stream) = streamed(&model);
        // With activation recomputation too: a layer is recomputed after its backward fetch.
        let mut st2 = TrainState::new(&sm, b, t).expect("state");
        let mut st3 = TrainState::with_recompute(&sm, b, t, true).expect("state");
        let mut g2 = be.zeros(DType::F32, sm.layout.total()).expect("grads");
        let full = &model.layout;
        let (sa, sb) = sm.layout.slot.expect("slot");
        // Two steps in a row (stored, then recomputed activations): each starts from a clean slot.
        for step in 0..2 {
            be.fill(g2.vm(), 0.0).expect("zero");
            stream.grads.iter_mut().for_each(|g| *g = 0.0);
            let st = if step == 0 { &mut st2 } else { &mut st3 };
            let got = sm.forward_backward_streamed(&batch, st, &mut g2, None, None, &mut stream).expect("streamed");
            assert_eq!(got, want, "{m}: loss");
            let g = g2.to_f32_vec();
            assert!(g[sa..sb].iter().all(|&x| x == 0.0), "{m}: the slot's gradient is handed over and cleared");
            let mut merged = stream.grads.clone();
            for (a, e, at) in full.resident_ranges() {
                merged[a..e].copy_from_slice(&g[at..at + e - a]);
            }
            assert_eq!(merged, want_g, "{m}: gradients");
        }
        let nl = model.cfg.num_hidden_layers;
        // Forward fetches every layer; backward every layer but the last (still in the slot).
        let mut expect = Vec::new();
        for _ in 0..2 {
            expect.extend((0..nl).map(|l| (l, Pass::Forward)));
            expect.extend((0..nl - 1).rev().map(|l| (l, Pass::Backward)));
        }
        assert_eq!(stream.fetches, expect, "{m}: fetch order");
        assert_eq!(stream.reduces.len(), 2 * nl, "{m}");
    }
}
