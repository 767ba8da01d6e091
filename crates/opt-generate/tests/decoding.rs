//! Behaviour of the generator beyond HF parity: seeded sampling, batching, stop strings,
//! streaming, log-probs, echo, context limits and option validation.

mod common;

use std::ops::ControlFlow;

use common::*;
use opt_generate::{FinishReason, GenerateError, GenerateOutput, GenerateRequest, Generator, Prompt, SamplingParams};
use opt_model::score_sequence;
use opt_tokenizer::OptTokenizer;

fn ids(v: &[u32]) -> Prompt {
    Prompt::Ids(v.to_vec())
}

fn prompts() -> Vec<Prompt> {
    vec![ids(&[2, 17, 300, 45, 9, 81, 200]), ids(&[2, 5]), ids(&[2, 400, 33, 12])]
}

fn run(gen: &Generator<'_, opt_tensor::CpuBackend>, prompts: Vec<Prompt>, params: SamplingParams) -> GenerateOutput {
    gen.generate(&GenerateRequest::new(prompts, params)).expect("generate")
}

fn token_ids(out: &GenerateOutput) -> Vec<Vec<Vec<u32>>> {
    out.prompts.iter().map(|p| p.choices.iter().map(|c| c.token_ids.clone()).collect()).collect()
}

fn sampling(seed: u64) -> SamplingParams {
    SamplingParams {
        max_new_tokens: 20,
        temperature: Some(0.9),
        top_k: Some(100),
        top_p: Some(0.95),
        presence_penalty: 0.3,
        frequency_penalty: 0.2,
        repetition_penalty: Some(1.1),
        n: 3,
        seed: Some(seed),
        ..Default::default()
    }
}

#[test]
fn seeded_sampling_repeats_exactly() {
    let model = load("pre_ln");
    let gen = Generator::new(&model, None).with_eos(None);
    let a = run(&gen, prompts(), sampling(1234));
    let b = run(&gen, prompts(), sampling(1234));
    assert_eq!(a, b, "same seed, same output");
    assert_eq!(a.seed, Some(1234));
    let c = run(&gen, prompts(), sampling(99));
    assert_ne!(token_ids(&a), token_ids(&c), "another seed gives another sample");
    for p in &a.prompts {
        assert_eq!(p.choices.len(), 3);
        assert!(p.choices.iter().all(|c| c.token_ids.len() == 20 && c.finish_reason == FinishReason::Length));
        // The n samples of one prompt use different streams.
        assert_ne!(p.choices[0].token_ids, p.choices[1].token_ids);
    }
    // Without a seed one is drawn and reported; reusing it reproduces the run.
    let d = run(&gen, prompts(), SamplingParams { seed: None, ..sampling(0) });
    let e = run(&gen, prompts(), sampling(d.seed.expect("seed reported")));
    assert_eq!(token_ids(&d), token_ids(&e));
}

#[test]
fn batched_left_padded_generation_equals_each_prompt_alone() {
    let model = load("pre_ln");
    let gen = Generator::new(&model, None).with_eos(Some(132));
    let modes = [
        SamplingParams { max_new_tokens: 16, ..SamplingParams::greedy(16) },
        SamplingParams { min_new_tokens: 3, no_repeat_ngram_size: 2, ..sampling(7) },
        SamplingParams {
            num_beams: 3,
            n: 2,
            length_penalty: 1.3,
            greedy: true,
            max_new_tokens: 10,
            ..Default::default()
        },
    ];
    for params in modes {
        let batched = run(&gen, prompts(), params.clone());
        for (i, p) in prompts().into_iter().enumerate() {
            let alone = run(&gen, vec![p], params.clone());
            // Same tokens; log-probs agree to float rounding (the batch shape changes the
            // matmul blocking, so logits may differ in the last bits).
            let (a, b) = (&alone.prompts[0].choices, &batched.prompts[i].choices);
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                assert_eq!(
                    (&x.token_ids, x.finish_reason),
                    (&y.token_ids, y.finish_reason),
                    "prompt {i} with {params:?}"
                );
                assert!((x.cumulative_logprob - y.cumulative_logprob).abs() < 1e-4);
                assert!((x.score.unwrap_or(0.0) - y.score.unwrap_or(0.0)).abs() < 1e-4);
            }
        }
    }
}

#[test]
fn logprobs_and_echo_agree_with_scoring_the_sequence() {
    let model = load("galactica");
    let gen = Generator::new(&model, None).with_eos(None);
    let params = SamplingParams { logprobs: Some(3), echo: true, ..SamplingParams::greedy(8) };
    let out = run(&gen, vec![ids(&[2, 40, 41, 300])], params);
    let p = &out.prompts[0];
    let c = &p.choices[0];
    let full: Vec<u32> = p.prompt_token_ids.iter().chain(&c.token_ids).copied().collect();
    let scored = score_sequence(&model, &full, 3).expect("score");
    let prompt_lps = p.prompt_logprobs.as_ref().expect("echo log-probs");
    assert_eq!(prompt_lps.len(), 4);
    assert_eq!(prompt_lps[0].logprob, None);
    let gen_lps = c.logprobs.as_ref().expect("log-probs");
    assert_eq!(gen_lps.len(), 8);
    for (i, lp) in prompt_lps.iter().chain(gen_lps).enumerate().skip(1) {
        assert_eq!(lp.id, full[i]);
        let want = scored.token_logprobs[i].expect("scored");
        let got = lp.logprob.expect("logprob");
        assert!((got - want).abs() < 1e-4, "position {i}: {got} vs {want}");
        assert_eq!(lp.top.len(), 3);
        let want_top = scored.top_logprobs[i].as_ref().expect("top");
        for ((a, x), (b, y)) in lp.top.iter().zip(want_top) {
            assert_eq!(a, b);
            assert!((x - y).abs() < 1e-4);
        }
    }
    // Greedy picks the most likely token, so it is its own top alternative.
    assert!(gen_lps.iter().all(|l| l.top[0].0 == l.id));
    let sum: f64 = gen_lps.iter().map(|l| l.logprob.expect("lp") as f64).sum();
    assert!((sum - c.cumulative_logprob).abs() < 1e-4);
}

/// Greedy text of a random model with OPT's vocabulary, and the bytes of each token.
fn reference_text(
    gen: &Generator<'_, opt_tensor::CpuBackend>,
    tok: &OptTokenizer,
    prompt: &str,
    n: usize,
) -> (Vec<u32>, Vec<Vec<u8>>) {
    let out = run(gen, vec![Prompt::Text(prompt.into())], SamplingParams::greedy(n));
    let toks = out.prompts[0].choices[0].token_ids.clone();
    let bytes = toks.iter().map(|&t| tok.token_bytes(t).expect("known token")).collect();
    (toks, bytes)
}

#[test]
fn stop_strings_spanning_tokens_stop_at_the_right_place() {
    let tok = OptTokenizer::bundled().expect("bundled tokenizer");
    let model = tiny_random(5);
    let gen = Generator::new(&model, Some(&tok)).with_eos(None);
    let prompt = "The quick brown fox";
    let (toks, bytes) = reference_text(&gen, &tok, prompt, 40);
    let full: Vec<u8> = bytes.concat();
    // A boundary between two ASCII tokens of ≥ 2 bytes, after a few tokens.
    let i = (3..toks.len() - 1)
        .find(|&i| bytes[..=i + 1].iter().all(|b| b.is_ascii()) && bytes[i].len() >= 2 && bytes[i + 1].len() >= 2)
        .expect("two ASCII tokens in the greedy text");
    let end_i: usize = bytes[..=i].iter().map(Vec::len).sum();
    let stop = String::from_utf8(full[end_i - 2..end_i + 2].to_vec()).expect("ascii");
    let text = String::from_utf8_lossy(&full).into_owned();
    let at = text.find(&stop).expect("stop occurs");
    // The token that completes the first occurrence.
    let mut acc = 0;
    let completes = bytes.iter().position(|b| {
        acc += b.len();
        acc >= at + stop.len()
    });
    let completes = completes.expect("completing token");

    let params = SamplingParams { stop: vec![stop.clone()], ..SamplingParams::greedy(40) };
    let mut streamed = String::new();
    let out = gen
        .generate_stream(&GenerateRequest::new(vec![Prompt::Text(prompt.into())], params), |e| {
            assert!(!e.text.contains(&stop), "a streamed delta shows the stop string");
            streamed.push_str(&e.text);
            ControlFlow::Continue(())
        })
        .expect("generate");
    let c = &out.prompts[0].choices[0];
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!(c.text.as_deref(), Some(&text[..at]));
    assert_eq!(streamed, text[..at]);
    assert_eq!(c.token_ids, toks[..=completes].to_vec());
    // The match starts before the completing token does: it spans a token boundary.
    let start_of_completing: usize = bytes[..completes].iter().map(Vec::len).sum();
    assert!(
        at < start_of_completing,
        "stop {stop:?} at {at} does not span tokens (token {completes} starts at {start_of_completing})"
    );

    // The same stop string ends beam hypotheses too, and sampling.
    let beam = SamplingParams { stop: vec![stop.clone()], num_beams: 2, greedy: true, ..SamplingParams::greedy(40) };
    let out = run(&gen, vec![Prompt::Text(prompt.into())], beam);
    for c in &out.prompts[0].choices {
        assert!(!c.text.as_deref().unwrap_or_default().contains(&stop));
    }
}

#[test]
fn streamed_deltas_add_up_to_the_final_text() {
    let tok = OptTokenizer::bundled().expect("bundled tokenizer");
    let model = tiny_random(11);
    let gen = Generator::new(&model, Some(&tok));
    let params =
        SamplingParams { max_new_tokens: 30, n: 2, seed: Some(3), temperature: Some(1.5), ..Default::default() };
    let req = GenerateRequest::new(vec![Prompt::Text("Hello".into()), Prompt::Text("Ünïcödé ☃ text".into())], params);
    let mut deltas = vec![vec![String::new(); 2]; 2];
    let mut finishes = 0;
    let out = gen
        .generate_stream(&req, |e| {
            deltas[e.prompt][e.choice].push_str(&e.text);
            finishes += usize::from(e.finish_reason.is_some());
            ControlFlow::Continue(())
        })
        .expect("generate");
    assert_eq!(finishes, 4);
    for (p, po) in out.prompts.iter().enumerate() {
        for (c, choice) in po.choices.iter().enumerate() {
            assert_eq!(choice.text.as_deref(), Some(deltas[p][c].as_str()));
            // Same as decoding the ids (EOS skipped) with the tokenizer.
            assert_eq!(deltas[p][c], tok.decode(&choice.token_ids, true).expect("decode"));
        }
    }
    // Cancelling from the callback stops the request.
    let err = gen.generate_stream(&req, |_| ControlFlow::Break(())).expect_err("cancelled");
    assert!(matches!(err, GenerateError::Cancelled));
}

#[test]
fn empty_prompt_starts_from_bos() {
    let tok = OptTokenizer::bundled().expect("bundled tokenizer");
    let model = tiny_random(2);
    let gen = Generator::new(&model, Some(&tok)).with_eos(None);
    let a = run(&gen, vec![Prompt::Text(String::new())], SamplingParams::greedy(5));
    let b = run(&gen, vec![ids(&[])], SamplingParams::greedy(5));
    let c = run(&gen, vec![ids(&[2])], SamplingParams::greedy(5));
    assert_eq!(a.prompts[0].prompt_token_ids, vec![2]);
    assert_eq!(b.prompts[0].prompt_token_ids, vec![2]);
    assert_eq!(token_ids(&a), token_ids(&c));
    assert_eq!(token_ids(&b), token_ids(&c));
}

#[test]
fn best_of_returns_the_n_most_likely_samples() {
    let model = load("pre_ln");
    let gen = Generator::new(&model, None).with_eos(None);
    let params = SamplingParams { n: 2, best_of: Some(6), seed: Some(5), max_new_tokens: 12, ..Default::default() };
    let out = run(&gen, vec![ids(&[2, 7, 8])], params.clone());
    let choices = &out.prompts[0].choices;
    assert_eq!(choices.len(), 2);
    let mean = |c: &opt_generate::Completion| c.cumulative_logprob / c.token_ids.len() as f64;
    assert!(mean(&choices[0]) >= mean(&choices[1]));
    // They are the best two of the six samples that n = 6 draws with the same seed.
    let all = run(&gen, vec![ids(&[2, 7, 8])], SamplingParams { n: 6, best_of: None, ..params });
    let mut means: Vec<f64> = all.prompts[0].choices.iter().map(mean).collect();
    means.sort_by(|a, b| b.partial_cmp(a).expect("finite"));
    assert!((means[0] - mean(&choices[0])).abs() < 1e-9 && (means[1] - mean(&choices[1])).abs() < 1e-9);
}

#[test]
fn context_limits_error_truncate_or_shorten() {
    let model = load("pre_ln"); // 64 positions
    let gen = Generator::new(&model, None).with_eos(None);
    let long: Vec<u32> = (0..70).map(|i| 3 + i % 500).collect();
    let err = gen.generate(&GenerateRequest::new(vec![ids(&long)], SamplingParams::greedy(10))).expect_err("too long");
    assert!(matches!(err, GenerateError::Prompt { index: 0, .. }), "{err}");
    assert!(err.to_string().contains("context of 64"), "{err}");

    let params = SamplingParams { truncate: true, ..SamplingParams::greedy(10) };
    let out = run(&gen, vec![ids(&long)], params);
    assert_eq!(out.prompts[0].prompt_token_ids, long[70 - 55..].to_vec(), "keeps the last 64 - 9 tokens");
    assert_eq!(out.prompts[0].choices[0].token_ids.len(), 10);
    assert!(out.warnings.iter().any(|w| w.contains("kept the last 55")), "{:?}", out.warnings);

    // A prompt that fits but leaves less room than asked stops at the context with `length`.
    let out = run(&gen, vec![ids(&long[..60])], SamplingParams::greedy(10));
    let c = &out.prompts[0].choices[0];
    assert_eq!((c.token_ids.len(), c.finish_reason), (5, FinishReason::Length));
}

#[test]
fn invalid_options_are_errors_naming_the_option() {
    let model = load("pre_ln");
    let gen = Generator::new(&model, None);
    let base = SamplingParams::default;
    let cases: Vec<(&str, SamplingParams)> = vec![
        ("temperature", SamplingParams { temperature: Some(-0.5), ..base() }),
        ("temperature", SamplingParams { temperature: Some(f32::NAN), ..base() }),
        ("top_p", SamplingParams { top_p: Some(0.0), ..base() }),
        ("top_p", SamplingParams { top_p: Some(1.5), ..base() }),
        ("typical_p", SamplingParams { typical_p: Some(0.0), ..base() }),
        ("repetition_penalty", SamplingParams { repetition_penalty: Some(0.0), ..base() }),
        ("presence_penalty", SamplingParams { presence_penalty: 2.5, ..base() }),
        ("frequency_penalty", SamplingParams { frequency_penalty: -3.0, ..base() }),
        ("n", SamplingParams { n: 0, ..base() }),
        ("n", SamplingParams { n: 2, greedy: true, ..base() }),
        ("n", SamplingParams { n: 5, num_beams: 4, ..base() }),
        ("best_of", SamplingParams { n: 3, best_of: Some(2), ..base() }),
        ("best_of", SamplingParams { num_beams: 3, best_of: Some(4), ..base() }),
        ("num_beams", SamplingParams { num_beams: 0, ..base() }),
        ("num_beams", SamplingParams { num_beams: 2, top_p: Some(0.9), ..base() }),
        ("min_new_tokens", SamplingParams { min_new_tokens: 20, max_new_tokens: 10, ..base() }),
        ("length_penalty", SamplingParams { length_penalty: f32::INFINITY, num_beams: 2, ..base() }),
        ("logprobs", SamplingParams { logprobs: Some(100_000), ..base() }),
        ("stop", SamplingParams { stop: vec![String::new()], ..base() }),
    ];
    for (option, params) in cases {
        let err = gen.generate(&GenerateRequest::new(vec![ids(&[2, 3])], params.clone())).expect_err(option);
        match &err {
            GenerateError::Option { option: got, .. } => assert_eq!(*got, option, "{params:?}"),
            other => panic!("{option}: expected an option error, got {other}"),
        }
        assert!(err.to_string().contains(option), "{err}");
    }
    // Text needs a tokenizer; so do stop strings.
    let err = gen.generate(&GenerateRequest::new(vec![Prompt::Text("hi".into())], base())).expect_err("no tokenizer");
    assert!(matches!(err, GenerateError::NoTokenizer(_)), "{err}");
    let err = gen
        .generate(&GenerateRequest::new(vec![ids(&[2])], SamplingParams { stop: vec!["x".into()], ..base() }))
        .expect_err("stop");
    assert!(err.to_string().contains("stop"), "{err}");
    let err = gen.generate(&GenerateRequest::new(vec![ids(&[2, 600])], base())).expect_err("vocab");
    assert!(err.to_string().contains("600"), "{err}");
}

#[test]
fn rows_that_finish_early_leave_the_batch_without_disturbing_the_rest() {
    let model = load("post_ln_proj");
    // Make prompt 1's third greedy token the EOS, so that row stops early while the others go on.
    let probe =
        run(&Generator::new(&model, None).with_eos(None), vec![prompts()[1].clone()], SamplingParams::greedy(12));
    let eos = probe.prompts[0].choices[0].token_ids[2];
    let gen = Generator::new(&model, None).with_eos(Some(eos));
    for params in [SamplingParams::greedy(12), SamplingParams { n: 2, ..sampling(21) }] {
        let batched = run(&gen, prompts(), params.clone());
        let lens: Vec<usize> = batched.prompts.iter().flat_map(|p| &p.choices).map(|c| c.token_ids.len()).collect();
        if params.greedy {
            assert!(lens.iter().min() < lens.iter().max(), "rows should finish at different steps: {lens:?}");
        }
        for (i, p) in prompts().into_iter().enumerate() {
            let alone = run(&gen, vec![p], params.clone());
            let a: Vec<_> = alone.prompts[0].choices.iter().map(|c| (&c.token_ids, c.finish_reason)).collect();
            let b: Vec<_> = batched.prompts[i].choices.iter().map(|c| (&c.token_ids, c.finish_reason)).collect();
            assert_eq!(a, b, "prompt {i}");
        }
        if params.greedy {
            assert_eq!(batched.prompts[1].choices[0].finish_reason, FinishReason::Eos);
        }
    }
}
