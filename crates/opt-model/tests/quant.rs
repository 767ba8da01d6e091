//! Weight-only int8 models: the quantized forward equals the f32 forward on the dequantized
//! weights (so every matrix is routed through the int8 kernels), stays close to the f32 model,
//! keeps greedy continuations, round-trips through its folder format bit for bit, and bad
//! folders are rejected with messages that name the tensor.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use opt_checkpoint::{Checkpoint, FileDType, RawTensorWrite};
use opt_model::{causal_targets, KvCache, LogitsMode, OptModel, QuantConfig, TrainBatch, TrainState};
use opt_tensor::{Backend, Buffer, CpuBackend, DType, Int8Matrix};

const MODELS: [&str; 4] = ["pre_ln", "post_ln_proj", "galactica", "no_final_ln"];

fn configs() -> [QuantConfig; 4] {
    [
        QuantConfig { group_size: 0, embeddings: false },
        QuantConfig { group_size: 16, embeddings: false },
        QuantConfig { group_size: 64, embeddings: false },
        QuantConfig { group_size: 0, embeddings: true },
    ]
}

fn logits(model: &OptModel<CpuBackend>, r: &Reference) -> Vec<f32> {
    let ids = r.u32s("input_ids");
    let mask = r.mask("attention_mask");
    let b = r.shape("input_ids")[0];
    model.forward(&ids, b, Some(&mask), None, LogitsMode::All).expect("forward").to_f32_vec()
}

/// The f32 model whose matrices are the dequantized int8 ones (quantized here independently).
fn dequantized_twin(name: &str, qc: QuantConfig) -> OptModel<CpuBackend> {
    let f = load(name, DType::F32);
    let mut host = f.params_f32().expect("params");
    for s in f.layout.specs.iter().filter(|s| qc.quantizes(s)) {
        let w = &mut host[s.offset..s.offset + s.numel()];
        let m = Int8Matrix::quantize(w, s.shape[0], s.shape[1], qc.group_size).expect("quantize");
        w.copy_from_slice(&m.dequantize());
    }
    OptModel::from_params(CpuBackend::new(), f.cfg.clone(), &host, DType::F32).expect("twin")
}

fn greedy(model: &OptModel<CpuBackend>, prompt: &[u32], steps: usize) -> Vec<u32> {
    let v = model.cfg.vocab_size;
    let mut cache = KvCache::new(&model.backend, &model.cfg, 1, prompt.len() + steps).expect("cache");
    let mut last = model.forward(prompt, 1, None, Some(&mut cache), LogitsMode::Last).expect("prefill").to_f32_vec();
    let mut out = Vec::new();
    for _ in 0..steps {
        let next = argmax(&last[..v]);
        out.push(next);
        last = model.forward_step(&[next], &mut [&mut cache]).expect("step").to_f32_vec();
    }
    out
}

#[test]
fn int8_forward_equals_f32_forward_on_dequantized_weights() {
    for m in MODELS {
        let r = Reference::open(m);
        for qc in configs() {
            let q = load(m, DType::F32).quantize(qc).expect("quantize");
            let want = logits(&dequantized_twin(m, qc), &r);
            let got = logits(&q, &r);
            let d = max_abs_diff_rows(&got, &want, q.cfg.vocab_size, |_| true);
            assert!(d <= 1e-4, "{m} {qc:?}: max |Δ| = {d:e}");
        }
    }
}

/// Next-token argmax at every position of `seq` (teacher forcing).
fn argmaxes(model: &OptModel<CpuBackend>, seq: &[u32]) -> Vec<u32> {
    let v = model.cfg.vocab_size;
    let l = model.forward(seq, 1, None, None, LogitsMode::All).expect("forward").to_f32_vec();
    l.chunks(v).map(argmax).collect()
}

#[test]
fn int8_logits_stay_close_to_f32_and_greedy_tokens_agree() {
    for m in MODELS {
        let r = Reference::open(m);
        let f = load(m, DType::F32);
        let want = logits(&f, &r);
        let prompt = r.u32s("greedy_prompt");
        let steps = 24;
        let ref_tokens = greedy(&f, &prompt, steps);
        let seq: Vec<u32> = prompt.iter().chain(&ref_tokens).copied().collect();
        let ref_next = argmaxes(&f, &seq);
        for qc in configs() {
            let q = load(m, DType::F32).quantize(qc).expect("quantize");
            // Relative L2 error of all logits (random-weight fixtures, weights N(0, 0.02)).
            let e = rel_l2(&logits(&q, &r), &want);
            // Greedy decoding from the prompt: the first tokens are identical (after the first
            // near-tie the two continuations are different texts, so a count over all 24 steps
            // says little)...
            let toks = greedy(&q, &prompt, steps);
            let same_prefix = toks.iter().zip(&ref_tokens).take_while(|(a, b)| a == b).count();
            // ...and on the f32 model's continuation, the next-token choice agrees at most
            // positions (teacher forcing).
            let next = argmaxes(&q, &seq);
            let agree = next.iter().zip(&ref_next).filter(|(a, b)| a == b).count();
            // Measured (deterministic): rel L2 7.0e-3..1.7e-2, greedy prefix 4..24 tokens,
            // argmax agreement 27..29 of 29 positions.
            eprintln!("{m} {qc:?}: rel L2 {e:.2e}, greedy prefix {same_prefix}/{steps}, argmax {agree}/{}", seq.len());
            assert!(e <= 3e-2, "{m} {qc:?}: relative L2 error {e:e}");
            assert!(same_prefix >= 4, "{m} {qc:?}: greedy diverges after {same_prefix} tokens");
            assert!(agree * 10 >= seq.len() * 9, "{m} {qc:?}: argmax agrees at {agree}/{} positions", seq.len());
        }
    }
}

#[test]
fn quantized_model_holds_fewer_bytes() {
    let f = load("pre_ln", DType::F32);
    let before = f.weight_bytes();
    let q = f.quantize(QuantConfig::default()).expect("quantize");
    let qw = q.quant.as_ref().expect("quant");
    // 2 layers × 6 matrices, each [out, in] → out·in bytes + 4·out for the scales.
    assert_eq!(qw.len(), 12);
    let (c, f_) = (64usize, 256usize);
    let per_layer = 4 * (c * c + 4 * c) + (f_ * c + 4 * f_) + (c * f_ + 4 * c);
    assert_eq!(qw.size_in_bytes(), 2 * per_layer);
    let matrix_f32 = 2 * (4 * c * c + 2 * c * f_) * 4;
    assert_eq!(before - q.weight_bytes(), matrix_f32 - 2 * per_layer);
}

#[test]
fn save_then_load_is_bit_exact() {
    let r = Reference::open("no_final_ln");
    for qc in configs() {
        for dtype in [DType::F32, DType::BF16] {
            let q = load("no_final_ln", dtype).quantize(qc).expect("quantize");
            let dir = tempfile::tempdir().expect("tempdir");
            q.save_hf(dir.path()).expect("save");
            let back = OptModel::from_folder(CpuBackend::new(), dir.path(), dtype).expect("load");
            assert_eq!(back.quant, q.quant, "{qc:?} {dtype}: int8 matrices");
            assert_eq!(back.layout, q.layout);
            assert_eq!(back.params, q.params, "{qc:?} {dtype}: other parameters");
            let (a, b) = (logits(&q, &r), logits(&back, &r));
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{qc:?} {dtype}: logits");
            let text = fs::read_to_string(dir.path().join("config.json")).expect("config");
            let v: serde_json::Value = serde_json::from_str(&text).expect("json");
            assert_eq!(v["quantization_config"]["quant_method"], "opt-rs-int8");
            assert_eq!(v["quantization_config"]["group_size"], qc.group_size);
            let ck = Checkpoint::open(dir.path()).expect("open");
            let t = ck.tensor("model.decoder.layers.0.fc1.weight").expect("fc1");
            assert_eq!(t.dtype, FileDType::I8);
            let s = ck.tensor("model.decoder.layers.0.fc1.weight_scale").expect("scale");
            let want: Vec<usize> = match 64usize.checked_div(qc.group_size) {
                None => vec![256],
                Some(groups) => vec![256, groups],
            };
            assert_eq!(s.shape, want.as_slice());
            assert_eq!(ck.contains("lm_head.weight_scale"), qc.embeddings);
        }
    }
}

#[test]
fn training_a_quantized_model_is_refused() {
    let q = load("pre_ln", DType::F32).quantize(QuantConfig::default()).expect("quantize");
    let ids = vec![2u32, 5, 9, 11];
    let mask = vec![1u8; 4];
    let targets = causal_targets(&ids, &mask, 1, 4);
    let batch = TrainBatch { ids: &ids, mask: &mask, targets: &targets, batch: 1, seq: 4 };
    let mut st = TrainState::new(&q, 1, 4).expect("state");
    let mut grads = q.backend.zeros(DType::F32, q.params.len()).expect("grads");
    let e = q.forward_backward(&batch, &mut st, &mut grads, None, None).unwrap_err().to_string();
    assert!(e.contains("inference only"), "{e}");
    let e = q.quantize(QuantConfig::default()).err().expect("twice").to_string();
    assert!(e.contains("already quantized"), "{e}");
}

/// Save a quantized pre_ln to `dir`, then rewrite its safetensors with `edit` applied to the
/// list of (name, dtype, shape, bytes).
fn broken(dir: &Path, edit: impl Fn(&mut Vec<(String, FileDType, Vec<usize>, Vec<u8>)>)) -> String {
    let q = load("pre_ln", DType::F32).quantize(QuantConfig { group_size: 16, embeddings: false }).expect("q");
    q.save_hf(dir).expect("save");
    let mut ts: Vec<(String, FileDType, Vec<usize>, Vec<u8>)> = {
        let ck = Checkpoint::open(dir).expect("open");
        ck.names()
            .into_iter()
            .map(|n| {
                let t = ck.tensor(n).expect("tensor");
                (n.to_string(), t.dtype, t.shape.to_vec(), t.bytes.to_vec())
            })
            .collect()
    };
    edit(&mut ts);
    let w: Vec<RawTensorWrite<'_>> = ts
        .iter()
        .map(|(n, d, s, b)| RawTensorWrite { name: n.clone(), dtype: *d, shape: s.clone(), bytes: b })
        .collect();
    opt_checkpoint::save_safetensors_raw(&dir.join("model.safetensors"), &w).expect("rewrite");
    match OptModel::from_folder(CpuBackend::new(), dir, DType::F32) {
        Ok(_) => panic!("a broken folder loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_quantized_folders_name_the_tensor() {
    const FC1: &str = "model.decoder.layers.1.fc1.weight";
    let scale = format!("{FC1}_scale");
    let d = tempfile::tempdir().expect("tempdir");
    let e = broken(d.path(), |ts| ts.retain(|t| t.0 != scale));
    assert!(e.contains(&scale) && e.contains("not found"), "missing scale: {e}");

    let d = tempfile::tempdir().expect("tempdir");
    let e = broken(d.path(), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == scale).expect("scale");
        t.2 = vec![256 * 4];
    });
    assert!(e.contains(&scale) && e.contains("[1024]") && e.contains("[256, 4]"), "scale shape: {e}");

    let d = tempfile::tempdir().expect("tempdir");
    let e = broken(d.path(), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == scale).expect("scale");
        t.3[0..4].copy_from_slice(&(-1.0f32).to_le_bytes());
    });
    assert!(e.contains(&scale) && e.contains("-1"), "negative scale: {e}");

    let d = tempfile::tempdir().expect("tempdir");
    let e = broken(d.path(), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == FC1).expect("fc1");
        t.1 = FileDType::U8;
    });
    assert!(e.contains(FC1) && e.contains("U8") && e.contains("I8"), "codes dtype: {e}");

    let d = tempfile::tempdir().expect("tempdir");
    let e = broken(d.path(), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == FC1).expect("fc1");
        t.1 = FileDType::I16;
        t.2 = vec![256, 32];
    });
    assert!(e.contains(FC1), "codes shape: {e}");

    // config.json problems name the file and the field.
    for (key, value, want) in [
        ("bits", serde_json::json!(4), "quantization_config.bits"),
        ("group_size", serde_json::json!(24), "multiple of 16"),
        ("quant_method", serde_json::json!("gptq"), "gptq"),
    ] {
        let d = tempfile::tempdir().expect("tempdir");
        broken(d.path(), |ts| ts.retain(|t| t.0 != scale));
        let path = d.path().join("config.json");
        let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).expect("read")).expect("json");
        v["quantization_config"][key] = value;
        fs::write(&path, v.to_string()).expect("write");
        let e = OptModel::from_folder(CpuBackend::new(), d.path(), DType::F32).err().expect("bad config").to_string();
        assert!(e.contains("config.json") && e.contains(want), "{key}: {e}");
    }
}
