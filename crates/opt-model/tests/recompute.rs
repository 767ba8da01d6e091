//! Activation recomputation (`TrainState::with_recompute`): each layer keeps only its input and
//! runs its forward again before its backward. Loss and every gradient are bit-identical to the
//! stored-activation path, dropout included (masks are a function of seed, layer and site), on
//! every fixture layout, and the saved activations shrink to the layer inputs plus one layer.

mod common;

use common::{load, Reference};
use opt_model::{causal_targets, DropoutCfg, TrainBatch, TrainState};
use opt_tensor::{Backend, Buffer, DType};

const MODELS: [&str; 4] = ["pre_ln", "post_ln_proj", "no_final_ln", "galactica"];

#[test]
fn recomputed_gradients_are_bit_identical() {
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
        for drop in [None, Some(DropoutCfg { p: 0.1, attn_p: 0.1, seed: 7 })] {
            let run = |recompute: bool| {
                let mut st = TrainState::with_recompute(&model, b, t, recompute).expect("state");
                assert_eq!(st.recomputes(), recompute);
                let mut g = be.zeros(DType::F32, model.layout.total()).expect("grads");
                // Two steps on the same state: the second starts from what the first left.
                let mut out = Vec::new();
                for _ in 0..2 {
                    be.fill(g.vm(), 0.0).expect("zero");
                    let loss = model.forward_backward(&batch, &mut st, &mut g, None, drop.as_ref()).expect("fwd/bwd");
                    out.push((loss, g.to_f32_vec()));
                }
                (out, st.saved_layer_floats())
            };
            let (want, full) = run(false);
            let (got, slim) = run(true);
            for ((a, ga), (b2, gb)) in got.iter().zip(&want) {
                assert_eq!(a, b2, "{m} (dropout {}): loss", drop.is_some());
                assert!(ga == gb, "{m} (dropout {}): gradients differ", drop.is_some());
            }
            let nl = model.cfg.num_hidden_layers;
            let per_layer = full / nl;
            let input = b * t * model.cfg.hidden_size;
            assert_eq!(slim, nl * input + per_layer, "{m}: inputs + one layer's activations");
            assert!(slim < full, "{m}");
        }
    }
}
