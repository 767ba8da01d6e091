//! The completions API end to end over loopback: response shape, parity with `Generator` and
//! `score_sequence`, streaming, every refused request, authentication, the side routes.

mod common;

use common::{request, stream_texts, tiny_model, tokenizer, TestServer, MODEL_NAME};
use opt_generate::{GenerateRequest, Generator, Prompt, SamplingParams};
use opt_model::score_sequence;
use serde_json::{json, Value};

const CONTEXT: usize = 256;

fn f32s(v: &Value) -> Vec<Option<f32>> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().map(|f| f as f32)).collect()
}

fn generate_alone(prompt: &str, params: SamplingParams) -> opt_generate::GenerateOutput {
    let model = tiny_model(CONTEXT);
    let tok = tokenizer();
    let g = Generator::new(&model, Some(&tok));
    g.generate(&GenerateRequest::new(vec![Prompt::Text(prompt.into())], params)).expect("generate")
}

#[test]
fn greedy_completion_matches_the_generator() {
    let server = TestServer::start(CONTEXT, |_| {});
    let (status, r) = server.post(
        "/v1/completions",
        &json!({"model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "logprobs": 2}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["model"], MODEL_NAME);
    assert!(r["id"].as_str().is_some_and(|id| id.starts_with("cmpl-")));
    let choice = &r["choices"][0];
    assert_eq!(choice["index"], 0);

    let want =
        generate_alone("The capital of France is", SamplingParams { logprobs: Some(2), ..SamplingParams::greedy(12) });
    let c = &want.prompts[0].choices[0];
    assert_eq!(choice["text"], json!(c.text.clone().expect("text")));
    let finish = if c.finish_reason == opt_generate::FinishReason::Length { "length" } else { "stop" };
    assert_eq!(choice["finish_reason"], finish);
    let lps = c.logprobs.as_ref().expect("logprobs");
    let got = f32s(&choice["logprobs"]["token_logprobs"]);
    assert_eq!(got.len(), lps.len());
    for (g, w) in got.iter().zip(lps) {
        let (g, w) = (g.expect("logprob"), w.logprob.expect("logprob"));
        assert!((g - w).abs() < 1e-4, "{g} vs {w}");
    }
    let tok = tokenizer();
    let strings: Vec<String> = lps.iter().map(|l| opt_serve_display(&tok, l.id)).collect();
    assert_eq!(choice["logprobs"]["tokens"], json!(strings));
    // Offsets continue after the prompt's characters (OpenAI's convention without echo).
    assert_eq!(choice["logprobs"]["text_offset"][0], json!("The capital of France is".chars().count()));
    let prompt_tokens = tok.encode("The capital of France is", true).expect("encode").len();
    assert_eq!(
        r["usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": lps.len(), "total_tokens": prompt_tokens + lps.len()})
    );
}

/// The server's rule for `logprobs.tokens`: the token's text, `bytes:\xNN…` when it is not
/// UTF-8 on its own, `token_id:N` past the tokenizer's vocabulary.
fn opt_serve_display(tok: &opt_tokenizer::OptTokenizer, id: u32) -> String {
    match tok.token_bytes(id) {
        Some(b) => String::from_utf8(b.clone())
            .unwrap_or_else(|_| format!("bytes:{}", b.iter().map(|x| format!("\\x{x:02x}")).collect::<String>())),
        None => format!("token_id:{id}"),
    }
}

#[test]
fn echo_logprobs_equal_score_sequence() {
    let server = TestServer::start(CONTEXT, |_| {});
    let prompt = "Paris is the capital and largest city of France.";
    let tok = tokenizer();
    let ids = tok.encode(prompt, true).expect("encode");
    let model = tiny_model(CONTEXT);
    let want = score_sequence(&model, &ids, 3).expect("score");

    // lm-evaluation-harness's scoring request: echo, logprobs, max_tokens 0.
    let (status, r) =
        server.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 3}));
    assert_eq!(status, 200, "{r}");
    let c = &r["choices"][0];
    assert_eq!(c["text"], prompt);
    assert_eq!(c["finish_reason"], "length");
    let lp = &c["logprobs"];
    assert_eq!(lp["token_logprobs"][0], Value::Null);
    assert_eq!(lp["top_logprobs"][0], Value::Null);
    assert_eq!(f32s(&lp["token_logprobs"]), want.token_logprobs, "max_tokens 0 is exactly score_sequence");
    for (i, alts) in want.top_logprobs.iter().enumerate().skip(1) {
        let got = lp["top_logprobs"][i].as_object().expect("top map");
        for (id, x) in alts.as_ref().expect("alternatives") {
            let key = tok.token_bytes(*id).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            if let Some(v) = got.get(&key) {
                assert_eq!(v.as_f64().map(|v| v as f32), Some(*x), "position {i} alternative {key:?}");
            }
        }
        assert!(got.len() == 3 || got.len() == 4, "top-3 plus possibly the chosen token: {got:?}");
    }
    let offsets: Vec<u64> =
        lp["text_offset"].as_array().expect("offsets").iter().map(|x| x.as_u64().expect("int")).collect();
    assert_eq!(offsets[0], 0);
    assert_eq!(offsets[1], 0, "the BOS adds no text");
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(r["usage"]["completion_tokens"], 0);
    assert_eq!(r["usage"]["prompt_tokens"], ids.len());

    // lm-eval's older form (max_tokens 1): the prompt part agrees with the scorer too.
    let (status, r) = server.post(
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 1, "echo": true, "logprobs": 1, "temperature": 0}),
    );
    assert_eq!(status, 200, "{r}");
    let got = f32s(&r["choices"][0]["logprobs"]["token_logprobs"]);
    assert_eq!(got.len(), ids.len() + 1);
    for (g, w) in got.iter().zip(&want.token_logprobs).skip(1) {
        let (g, w) = (g.expect("lp"), w.expect("lp"));
        assert!((g - w).abs() < 1e-4, "{g} vs {w}");
    }
    assert!(r["choices"][0]["text"].as_str().expect("text").starts_with(prompt));
}

#[test]
fn streaming_equals_non_streaming_for_greedy() {
    let server = TestServer::start(CONTEXT, |_| {});
    let body = json!({"prompt": ["Once upon a time", "In a galaxy"], "max_tokens": 20, "temperature": 0});
    let (status, whole) = server.post("/v1/completions", &body);
    assert_eq!(status, 200, "{whole}");
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let r = request(server.addr, "POST", "/v1/completions", &[], Some(sbody.to_string().as_bytes()));
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").is_some_and(|t| t.starts_with("text/event-stream")));
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert!(data.len() > 4, "token by token: {data:?}");
    let (texts, finish) = stream_texts(&data, 2);
    for i in 0..2 {
        assert_eq!(json!(texts[i]), whole["choices"][i]["text"]);
        assert_eq!(json!(finish[i]), whole["choices"][i]["finish_reason"]);
    }
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).expect("usage chunk");
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).expect("chunk");
        assert_eq!(v["object"], "text_completion");
    }

    // Echo + logprobs streamed: the prompt first, then one chunk per token, offsets increasing.
    let r = request(
        server.addr,
        "POST",
        "/v1/completions",
        &[],
        Some(json!({"prompt": "Hello there", "max_tokens": 5, "temperature": 0, "echo": true, "logprobs": 1, "stream": true}).to_string().as_bytes()),
    );
    let (status, whole) = server.post(
        "/v1/completions",
        &json!({"prompt": "Hello there", "max_tokens": 5, "temperature": 0, "echo": true, "logprobs": 1}),
    );
    assert_eq!(status, 200);
    let data = r.sse_data();
    let (texts, _) = stream_texts(&data, 1);
    assert_eq!(json!(texts[0]), whole["choices"][0]["text"]);
    let mut tokens = Vec::new();
    let mut offsets = Vec::new();
    let mut lps = Vec::new();
    for d in data.iter().filter(|d| *d != "[DONE]") {
        let v: Value = serde_json::from_str(d).expect("chunk");
        let lp = &v["choices"][0]["logprobs"];
        tokens.extend(lp["tokens"].as_array().expect("tokens").iter().cloned());
        offsets.extend(lp["text_offset"].as_array().expect("offsets").iter().cloned());
        lps.extend(lp["token_logprobs"].as_array().expect("lps").iter().cloned());
    }
    let w = &whole["choices"][0]["logprobs"];
    assert_eq!(json!(tokens), w["tokens"]);
    assert_eq!(json!(offsets), w["text_offset"]);
    assert_eq!(json!(lps), w["token_logprobs"]);
}

#[test]
fn sampling_n_best_of_beams_and_stop_match_the_generator() {
    let server = TestServer::start(CONTEXT, |_| {});
    let model = tiny_model(CONTEXT);
    let tok = tokenizer();
    let g = Generator::new(&model, Some(&tok));
    let prompts = vec![vec![2u32, 100, 200, 300], vec![2, 400]];
    let gen = |params: SamplingParams| {
        g.generate(&GenerateRequest::new(prompts.iter().cloned().map(Prompt::Ids).collect(), params)).expect("generate")
    };
    let texts = |r: &Value| -> Vec<String> {
        r["choices"]
            .as_array()
            .expect("choices")
            .iter()
            .map(|c| c["text"].as_str().expect("text").to_string())
            .collect()
    };
    let want_texts = |out: &opt_generate::GenerateOutput| -> Vec<String> {
        out.prompts.iter().flat_map(|p| p.choices.iter().map(|c| c.text.clone().unwrap_or_default())).collect()
    };

    // n = 2 seeded samples of each prompt: choice index = prompt · n + i.
    let body =
        json!({"prompt": prompts, "n": 2, "max_tokens": 8, "seed": 11, "temperature": 0.9, "top_p": 0.95, "top_k": 50});
    let (status, r) = server.post("/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    let idx: Vec<u64> =
        r["choices"].as_array().expect("choices").iter().map(|c| c["index"].as_u64().expect("i")).collect();
    assert_eq!(idx, vec![0, 1, 2, 3]);
    let want = gen(SamplingParams {
        n: 2,
        max_new_tokens: 8,
        seed: Some(11),
        temperature: Some(0.9),
        top_p: Some(0.95),
        top_k: Some(50),
        ..Default::default()
    });
    assert_eq!(texts(&r), want_texts(&want));
    assert_eq!(r["usage"]["prompt_tokens"], 6);
    let (_, again) = server.post("/v1/completions", &body);
    assert_eq!(texts(&again), texts(&r), "the same seed gives the same samples");

    // best_of with sampling: the n best of best_of by mean log-prob (ranked in the engine).
    let body = json!({"prompt": prompts, "n": 1, "best_of": 3, "max_tokens": 6, "seed": 5, "presence_penalty": 0.5});
    let (status, r) = server.post("/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    let want = gen(SamplingParams {
        best_of: Some(3),
        max_new_tokens: 6,
        seed: Some(5),
        presence_penalty: 0.5,
        ..Default::default()
    });
    assert_eq!(texts(&r), want_texts(&want));

    // best_of without sampling is beam search (metaseq), run through the Generator.
    let body = json!({"prompt": prompts, "n": 2, "best_of": 3, "temperature": 0, "max_tokens": 5, "logprobs": 0});
    let (status, r) = server.post("/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    let want = gen(SamplingParams {
        n: 2,
        best_of: Some(3),
        greedy: true,
        max_new_tokens: 5,
        logprobs: Some(0),
        ..Default::default()
    });
    assert_eq!(texts(&r), want_texts(&want));
    assert_eq!(r["choices"].as_array().map(Vec::len), Some(4));

    // A stop string cuts the text before it, with finish_reason "stop".
    let (_, free) = server.post("/v1/completions", &json!({"prompt": "It was", "max_tokens": 16, "temperature": 0}));
    let free_text = free["choices"][0]["text"].as_str().expect("text").to_string();
    let words: Vec<&str> = free_text.split_inclusive(' ').collect();
    assert!(words.len() >= 3, "{free_text:?}");
    let stop = words[2].trim_end().to_string();
    assert!(!stop.is_empty());
    let cut = free_text.find(&stop).expect("stop in text");
    let (status, r) = server.post(
        "/v1/completions",
        &json!({"prompt": "It was", "max_tokens": 16, "temperature": 0, "stop": [stop, "\u{1F600}"]}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], json!(&free_text[..cut]));
    assert_eq!(r["choices"][0]["finish_reason"], "stop");

    // min_tokens and repetition controls are accepted.
    let (status, r) = server.post(
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 4, "min_tokens": 4, "frequency_penalty": 1.0, "temperature": 0, "user": "u1"}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 4);
}

#[test]
fn metaseq_aliases_answer_like_v1() {
    let server = TestServer::start(CONTEXT, |_| {});
    let body = json!({"prompt": "Hi", "max_tokens": 3, "temperature": 0});
    let (s0, a) = server.post("/v1/completions", &body);
    let (s1, b) = server.post("/completions", &body);
    let (s2, c) = server.post(&format!("/v1/engines/{MODEL_NAME}/completions"), &body);
    assert_eq!((s0, s1, s2), (200, 200, 200));
    assert_eq!(a["choices"], b["choices"]);
    assert_eq!(a["choices"], c["choices"]);
    let (s, e) = server.post("/v1/engines/davinci/completions", &body);
    assert_eq!(s, 404);
    assert_eq!(e["error"]["param"], "model");
    assert_eq!(e["error"]["code"], "model_not_found");
}

/// Every refused request: status, error JSON shape and the field it names.
#[test]
fn bad_requests_get_4xx_naming_the_field() {
    let server = TestServer::start(CONTEXT, |o| {
        o.max_body_bytes = 64 * 1024;
        o.engine.kv_cache_bytes = 8 << 20;
    });
    let long: Vec<u32> = vec![100; CONTEXT + 1];
    let cases: Vec<(Value, u16, Option<&str>)> = vec![
        (json!({"max_tokens": 5}), 400, Some("prompt")),
        (json!({"prompt": null}), 400, Some("prompt")),
        (json!({"prompt": []}), 400, Some("prompt")),
        (json!({"prompt": [[]]}), 400, Some("prompt")),
        (json!({"prompt": [[1, 2], "x"]}), 400, Some("prompt")),
        (json!({"prompt": 42}), 400, Some("prompt")),
        (json!({"prompt": [1, -2]}), 400, Some("prompt")),
        (json!({"prompt": [60000]}), 400, Some("prompt")),
        (json!({"prompt": long}), 400, Some("prompt")),
        (json!({"prompt": "hi", "max_tokens": CONTEXT}), 400, Some("max_tokens")),
        (json!({"prompt": "hi", "max_tokens": -1}), 400, Some("max_tokens")),
        (json!({"prompt": "hi", "max_tokens": "ten"}), 400, Some("max_tokens")),
        (json!({"prompt": "hi", "min_tokens": 9, "max_tokens": 3}), 400, Some("min_tokens")),
        (json!({"prompt": "hi", "temperature": -1}), 400, Some("temperature")),
        (json!({"prompt": "hi", "temperature": "hot"}), 400, Some("temperature")),
        (json!({"prompt": "hi", "top_p": 0}), 400, Some("top_p")),
        (json!({"prompt": "hi", "top_p": 2}), 400, Some("top_p")),
        (json!({"prompt": "hi", "top_k": -5}), 400, Some("top_k")),
        (json!({"prompt": "hi", "n": 0}), 400, Some("n")),
        (json!({"prompt": "hi", "n": 1000}), 400, Some("n")),
        (json!({"prompt": "hi", "n": 2, "temperature": 0}), 400, Some("n")),
        (json!({"prompt": "hi", "n": 3, "best_of": 2}), 400, Some("best_of")),
        (json!({"prompt": "hi", "best_of": 100}), 400, Some("best_of")),
        (json!({"prompt": "hi", "logprobs": 50}), 400, Some("logprobs")),
        (json!({"prompt": "hi", "logprobs": -1}), 400, Some("logprobs")),
        (json!({"prompt": "hi", "echo": 1}), 400, Some("echo")),
        (json!({"prompt": "hi", "stop": ""}), 400, Some("stop")),
        (json!({"prompt": "hi", "stop": [1]}), 400, Some("stop")),
        (json!({"prompt": "hi", "stop": vec!["a"; 17]}), 400, Some("stop")),
        (json!({"prompt": "hi", "presence_penalty": 2.5}), 400, Some("presence_penalty")),
        (json!({"prompt": "hi", "frequency_penalty": -3}), 400, Some("frequency_penalty")),
        (json!({"prompt": "hi", "seed": 1.5}), 400, Some("seed")),
        (json!({"prompt": "hi", "stream": "yes"}), 400, Some("stream")),
        (json!({"prompt": "hi", "stream_options": {"include_usage": true}}), 400, Some("stream_options")),
        (json!({"prompt": "hi", "user": ["x"]}), 400, Some("user")),
        (json!({"prompt": "hi", "suffix": "tail"}), 400, Some("suffix")),
        (json!({"prompt": "hi", "logit_bias": {"5": 10}}), 400, Some("logit_bias")),
        (json!({"prompt": "hi", "model": "gpt-4"}), 404, Some("model")),
        (json!({"prompt": "hi", "model": 5}), 400, Some("model")),
        // Over the server's limits: 8 MiB of KV cache, 64 sequences at once.
        (json!({"prompt": vec![vec![5u32; 200]; 40], "max_tokens": 50}), 400, Some("max_tokens")),
        (json!({"prompt": "hi", "n": 65, "max_tokens": 1}), 400, Some("n")),
        (json!([1, 2, 3]), 400, None),
        (json!("just a string"), 400, None),
    ];
    for (body, status, param) in &cases {
        let (got, e) = server.post("/v1/completions", body);
        assert_eq!(got, *status, "{body}: {e}");
        assert_eq!(e["error"]["param"].as_str(), *param, "{body}: {e}");
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        assert!(e["error"]["type"].is_string(), "{e}");
    }
    // Bodies that are not JSON at all, or too large, or sent the wrong way.
    for raw in [&b"{\"prompt\": \"hi\""[..], b"", b"\xff\xfe", b"prompt=hi"] {
        let r = request(server.addr, "POST", "/v1/completions", &[], Some(raw));
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(raw));
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }
    let big = json!({"prompt": "x".repeat(100 * 1024)}).to_string();
    let r = request(server.addr, "POST", "/v1/completions", &[], Some(big.as_bytes()));
    assert_eq!(r.status, 413);
    assert!(r.json()["error"]["message"].is_string());
    let r = request(server.addr, "GET", "/v1/completions", &[], None);
    assert_eq!(r.status, 405);
    assert!(r.json()["error"].is_object());
    let r = request(server.addr, "GET", "/v2/nothing", &[], None);
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].is_object());
    // Still serving after all that.
    let (status, _) = server.post("/v1/completions", &json!({"prompt": "ok", "max_tokens": 2}));
    assert_eq!(status, 200);
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn api_key_is_required_when_set() {
    let server = TestServer::start(CONTEXT, |o| o.api_key = Some("sekrit".into()));
    let body = json!({"prompt": "hi", "max_tokens": 2}).to_string();
    let post =
        |headers: &[(&str, &str)]| request(server.addr, "POST", "/v1/completions", headers, Some(body.as_bytes()));
    let r = post(&[]);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    assert_eq!(post(&[("Authorization", "Bearer wrong")]).status, 401);
    assert_eq!(post(&[("Authorization", "Basic sekrit")]).status, 401);
    assert_eq!(post(&[("Authorization", "Bearer sekrit")]).status, 200);
    assert_eq!(post(&[("authorization", "bearer sekrit")]).status, 200);
    assert_eq!(request(server.addr, "GET", "/v1/models", &[], None).status, 401);
    assert_eq!(request(server.addr, "GET", "/v1/models", &[("Authorization", "Bearer sekrit")], None).status, 200);
    // The page, health and metrics stay open.
    assert_eq!(server.get("/health").status, 200);
    assert_eq!(server.get("/metrics").status, 200);
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn models_health_metrics_and_playground() {
    let server = TestServer::start(CONTEXT, |_| {});
    let m = server.get("/v1/models").json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], MODEL_NAME);
    assert_eq!(m["data"][0]["max_model_len"], CONTEXT);
    assert_eq!(server.get(&format!("/v1/models/{MODEL_NAME}")).json()["id"], MODEL_NAME);
    assert_eq!(server.get("/v1/models/other").status, 404);
    assert_eq!(server.get("/health").json()["status"], "ok");

    let (status, _) = server.post("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 5, "min_tokens": 5}));
    assert_eq!(status, 200);
    let metrics = String::from_utf8(server.get("/metrics").body).expect("utf-8");
    for needle in [
        "opt_serve_requests_total{route=\"/v1/completions\",status=\"200\"} 1",
        "opt_serve_generation_tokens_total 5",
        "opt_serve_request_duration_seconds_count 1",
        "opt_serve_time_to_first_token_seconds_count 1",
        "opt_serve_queue_depth 0",
        "# TYPE opt_serve_request_duration_seconds histogram",
        "opt_serve_generation_tokens_per_second",
    ] {
        assert!(metrics.contains(needle), "missing {needle:?} in\n{metrics}");
    }
    assert!(server.metric("opt_serve_generation_tokens_per_second") > 0.0);

    let page = server.get("/");
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").is_some_and(|t| t.starts_with("text/html")));
    let html = String::from_utf8(page.body).expect("utf-8");
    for id in ["id=\"prompt\"", "id=\"generate\"", "id=\"output\"", "id=\"tokens\"", "id=\"temperature\""] {
        assert!(html.contains(id), "playground lacks {id}");
    }
    // Self-contained: nothing fetched from elsewhere.
    assert!(!html.contains("http://") && !html.contains("https://"), "the playground must not load external resources");
}

/// Random bodies (every field given values of every JSON type, in range and out) never get a
/// 5xx or break the server: each is answered 200 or a 4xx with OpenAI's error JSON.
#[test]
fn random_bodies_never_fail_the_server() {
    let server = TestServer::start(CONTEXT, |_| {});
    let values = [
        json!(null),
        json!(true),
        json!(false),
        json!(0),
        json!(1),
        json!(2),
        json!(-1),
        json!(0.5),
        json!(1.5),
        json!(-0.5),
        json!(1e300),
        json!(u64::MAX),
        json!(i64::MIN),
        json!("text"),
        json!(""),
        json!("\u{0}\u{FFFD}é😀"),
        json!([]),
        json!([1, 2]),
        json!([[2, 3], [4]]),
        json!(["a", "b"]),
        json!({"a": 1}),
        json!({"include_usage": true}),
    ];
    let prompts = [
        json!("Hello"),
        json!(""),
        json!(["a", "b c"]),
        json!([2, 5, 7]),
        json!([[2], [3, 4]]),
        json!([[]]),
        json!([2, "x"]),
        json!([[2], 3]),
        json!({"prompt": 1}),
        json!([-5]),
        json!([50271]),
        json!([50272]),
    ];
    let fields = [
        "max_tokens",
        "min_tokens",
        "temperature",
        "top_p",
        "top_k",
        "n",
        "best_of",
        "logprobs",
        "echo",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "stream",
        "stream_options",
        "user",
        "model",
        "typical_p",
        "repetition_penalty",
        "no_repeat_ngram_size",
        "num_beams",
        "length_penalty",
        "early_stopping",
        "suffix",
        "logit_bias",
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: usize| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n
    };
    let mut counts = [0usize; 2];
    for _ in 0..160 {
        let mut body = serde_json::Map::new();
        body.insert("prompt".into(), prompts[next(prompts.len())].clone());
        for _ in 0..next(5) {
            body.insert(fields[next(fields.len())].into(), values[next(values.len())].clone());
        }
        // Keep generations short so that the valid ones are quick.
        if !body.contains_key("max_tokens") || next(2) == 0 {
            body.insert("max_tokens".into(), json!(next(6)));
        }
        let text = Value::Object(body).to_string();
        let r = request(server.addr, "POST", "/v1/completions", &[], Some(text.as_bytes()));
        match r.status {
            200 => {
                counts[0] += 1;
                if r.header("content-type").is_some_and(|t| t.starts_with("text/event-stream")) {
                    assert_eq!(r.sse_data().last().map(String::as_str), Some("[DONE]"), "{text}");
                } else {
                    assert_eq!(r.json()["object"], "text_completion", "{text}");
                }
            }
            400 | 404 => {
                counts[1] += 1;
                let e = r.json();
                assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{text}: {e}");
            }
            s => panic!("status {s} for {text}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    assert!(counts[0] >= 10 && counts[1] >= 10, "answered {counts:?}: the mix should have both kinds");
    assert_eq!(server.get("/health").status, 200);
}
