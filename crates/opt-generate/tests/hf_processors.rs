//! Each logits processor keeps exactly the tokens HF's keeps, with the same renormalised
//! probabilities (|Δ| ≤ 1e-6). Inputs and HF outputs: `fixtures/generation/processors.*`.

mod common;

use std::collections::HashMap;

use common::*;
use opt_checkpoint::Checkpoint;
use opt_generate::processors::{softmax, Processors, SeqContext};

fn processors_for(params: &serde_json::Value) -> (Processors, usize) {
    let f = |k: &str| params.get(k).and_then(|x| x.as_f64());
    let u = |k: &str| params.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
    let p = Processors {
        repetition_penalty: f("repetition_penalty").map(|x| x as f32),
        no_repeat_ngram_size: u("no_repeat_ngram_size").unwrap_or(0),
        min_new_tokens: u("min_new_tokens").unwrap_or(0),
        eos: u("eos_token_id").map(|x| x as u32),
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        temperature: f("temperature").map(|x| x as f32),
        top_k: u("top_k").unwrap_or(0),
        top_p: f("top_p").map_or(1.0, |x| x as f32),
        typical_p: f("typical_p").map_or(1.0, |x| x as f32),
    };
    (p, u("prompt_len").unwrap_or(0))
}

#[test]
fn processors_keep_what_hf_keeps_with_the_same_probabilities() {
    let ck = Checkpoint::open(&fixture("generation/processors.safetensors")).expect("processors.safetensors");
    let meta = read_json("generation/processors.json");
    let f32s = |k: &str| ck.tensor(k).unwrap_or_else(|e| panic!("{k}: {e}")).to_f32_vec().expect("f32");
    let scores = f32s("scores");
    let ids_t = ck.tensor("input_ids").expect("input_ids");
    let hist_len = ids_t.shape[1];
    let hist: Vec<u32> =
        ids_t.bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as u32).collect();
    let rows = meta["rows"].as_u64().expect("rows") as usize;
    let v = scores.len() / rows;
    let cases = meta["cases"].as_object().expect("cases");
    assert_eq!(cases.len(), 18);
    let counts = HashMap::new();
    for (name, case) in cases {
        let (procs, prompt_len) = processors_for(&case["params"]);
        let want_scores = f32s(&format!("{name}.scores"));
        let want_probs = f32s(&format!("{name}.probs"));
        for r in 0..rows {
            let mut row = scores[r * v..(r + 1) * v].to_vec();
            let history = &hist[r * hist_len..(r + 1) * hist_len];
            procs.apply(&mut row, &SeqContext { history, generated: hist_len - prompt_len, counts: &counts });
            let theirs = &want_scores[r * v..(r + 1) * v];
            let kept: Vec<usize> = (0..v).filter(|&i| row[i].is_finite()).collect();
            let hf_kept: Vec<usize> = (0..v).filter(|&i| theirs[i].is_finite()).collect();
            assert_eq!(kept, hf_kept, "{name} row {r}: kept tokens differ");
            assert_eq!(kept.len() as u64, case["kept_per_row"][r].as_u64().expect("kept"), "{name} row {r}");
            for &i in &kept {
                assert!(
                    (row[i] - theirs[i]).abs() <= 1e-5 * theirs[i].abs().max(1.0),
                    "{name} row {r} token {i}: {} vs {}",
                    row[i],
                    theirs[i]
                );
            }
            let probs = softmax(&row);
            let hf_probs = &want_probs[r * v..(r + 1) * v];
            let d = probs.iter().zip(hf_probs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d <= 1e-6, "{name} row {r}: max |Δp| = {d:e}");
        }
    }
}
