//! Greedy, min_new_tokens and beam-search outputs identical to HF transformers' `generate()` on
//! the four fixture models (`fixtures/generation/generation.json`).

mod common;

use common::*;
use opt_generate::{GenerateRequest, Generator, Prompt, SamplingParams};

fn run_case(case: &serde_json::Value) {
    let model_name = case["model"].as_str().expect("model");
    let name = case["name"].as_str().expect("name");
    let model = load(model_name);
    let eos = case["eos_token_id"].as_u64().map(|x| x as u32);
    let mut params: SamplingParams = serde_json::from_value(case["options"].clone()).expect("options");
    params.greedy = true;
    let prompts: Vec<Prompt> =
        case["prompts"].as_array().expect("prompts").iter().map(|p| Prompt::Ids(u32s(p))).collect();
    let gen = Generator::new(&model, None).with_eos(eos);
    let out =
        gen.generate(&GenerateRequest::new(prompts, params)).unwrap_or_else(|e| panic!("{model_name}/{name}: {e}"));
    let want = case["outputs"].as_array().expect("outputs");
    assert_eq!(out.prompts.len(), want.len());
    for (pi, (got, want)) in out.prompts.iter().zip(want).enumerate() {
        let want: Vec<Vec<u32>> = want.as_array().expect("seqs").iter().map(u32s).collect();
        let got_ids: Vec<Vec<u32>> = got.choices.iter().map(|c| c.token_ids.clone()).collect();
        assert_eq!(got_ids, want, "{model_name}/{name}: prompt {pi}");
        for c in &got.choices {
            let expect = if c.token_ids.last().copied() == eos && eos.is_some() { "eos" } else { "length" };
            assert_eq!(c.finish_reason.as_str(), expect, "{model_name}/{name}: finish reason");
        }
        if let Some(scores) = case.get("scores") {
            let scores: Vec<f64> =
                scores[pi].as_array().expect("scores").iter().map(|x| x.as_f64().expect("score")).collect();
            for (c, s) in got.choices.iter().zip(&scores) {
                let ours = c.score.expect("beam score") as f64;
                assert!((ours - s).abs() <= 1e-4 * s.abs().max(1.0), "{model_name}/{name}: score {ours} vs HF {s}");
            }
        }
    }
}

fn cases(kind: &str) -> Vec<serde_json::Value> {
    let doc = read_json("generation/generation.json");
    doc["cases"].as_array().expect("cases").iter().filter(|c| c["kind"] == kind).cloned().collect()
}

#[test]
fn greedy_and_min_new_tokens_match_hf() {
    let cs = cases("greedy");
    assert_eq!(cs.len(), 6 * MODELS.len());
    for c in &cs {
        run_case(c);
    }
}

#[test]
fn beam_search_matches_hf() {
    let cs = cases("beam");
    assert_eq!(cs.len(), 8 * MODELS.len());
    // The fixtures must exercise finished hypotheses (EOS inside the beams) somewhere.
    let eos_hyps: usize = cs
        .iter()
        .map(|c| {
            let eos = c["eos_token_id"].as_u64().expect("eos") as u32;
            c["outputs"]
                .as_array()
                .expect("o")
                .iter()
                .flat_map(|r| r.as_array().expect("r").iter())
                .filter(|s| u32s(s).last() == Some(&eos))
                .count()
        })
        .sum();
    assert!(eos_hyps >= 10, "only {eos_hyps} EOS-terminated hypotheses");
    for c in &cs {
        run_case(c);
    }
}
