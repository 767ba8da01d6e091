//! The server under load: many simultaneous clients (valid and malformed), results independent
//! of the batch, admission under a KV budget, a full queue, and clients that go away.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{request, stream_texts, Resp, TestServer};
use serde_json::{json, Value};

/// What a client saw: status and, for successes, the choices (text, finish, logprobs).
fn outcome(stream: bool, r: &Resp) -> (u16, Value) {
    if r.status != 200 {
        return (r.status, r.json()["error"]["param"].clone());
    }
    if stream {
        let data = r.sse_data();
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let (texts, finish) = stream_texts(&data, 1);
        (200, json!({"text": texts[0], "finish_reason": finish[0]}))
    } else {
        let v = r.json();
        let c = &v["choices"][0];
        (
            200,
            json!({"text": c["text"], "finish_reason": c["finish_reason"], "logprobs": c["logprobs"], "n": v["choices"].as_array().map(Vec::len)}),
        )
    }
}

/// Poll `/metrics` until `cond` holds (or fail after `secs`).
fn wait_for(server: &TestServer, secs: u64, what: &str, cond: impl Fn(&TestServer) -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        if cond(server) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

fn valid_requests() -> Vec<Value> {
    (0..56)
        .map(|i| match i % 4 {
            // Greedy, different prompts and lengths, so sequences join and leave at different steps.
            0 => json!({"prompt": format!("Request {i}: the weather today is"), "max_tokens": 4 + i % 9, "temperature": 0, "logprobs": 1}),
            1 => json!({"prompt": format!("Story {i} begins"), "max_tokens": 3 + i % 7, "temperature": 0, "stream": true}),
            // Seeded sampling: reproducible whatever runs beside it.
            2 => json!({"prompt": [2, 100 + i, 7, 9], "max_tokens": 6, "temperature": 0.8, "top_k": 40, "seed": i}),
            // Scoring (echo + logprobs, max_tokens 0).
            _ => json!({"prompt": [2, 50 + i, 60, 70, 80], "max_tokens": 0, "echo": true, "logprobs": 2}),
        })
        .collect()
}

fn malformed_requests() -> Vec<(Vec<u8>, Option<&'static str>)> {
    let v = |j: Value| j.to_string().into_bytes();
    vec![
        (b"{\"prompt\": ".to_vec(), None),
        (v(json!({"max_tokens": 3})), Some("prompt")),
        (v(json!({"prompt": []})), Some("prompt")),
        (v(json!({"prompt": "x", "temperature": -2})), Some("temperature")),
        (v(json!({"prompt": "x", "max_tokens": 100000})), Some("max_tokens")),
        (v(json!({"prompt": "x", "top_p": "high"})), Some("top_p")),
        (v(json!({"prompt": "x", "n": 0})), Some("n")),
        (v(json!({"prompt": "x", "logprobs": 99})), Some("logprobs")),
        (v(json!({"prompt": "x", "stop": [3]})), Some("stop")),
        (v(json!({"prompt": [[1, 2], [99999999]]})), Some("prompt")),
    ]
}

#[test]
fn many_simultaneous_clients_valid_and_malformed() {
    let server = TestServer::start(256, |_| {});
    let valid = valid_requests();
    let stream_of = |b: &Value| b["stream"].as_bool().unwrap_or(false);

    // Each valid request alone first: nothing else runs, so this is "greedy alone".
    let alone: Vec<(u16, Value)> = valid
        .iter()
        .map(|b| {
            outcome(stream_of(b), &request(server.addr, "POST", "/v1/completions", &[], Some(b.to_string().as_bytes())))
        })
        .collect();
    assert!(alone.iter().all(|(s, _)| *s == 200), "{alone:?}");

    // Then all at once, interleaved with malformed ones (76 clients released together).
    let malformed = malformed_requests();
    // (body, streamed, index of the valid request, or the param a malformed one must name)
    type Client = (Vec<u8>, bool, Option<usize>, Option<&'static str>);
    let mut jobs: Vec<Client> = Vec::new();
    for (i, b) in valid.iter().enumerate() {
        jobs.push((b.to_string().into_bytes(), stream_of(b), Some(i), None));
        if i % 3 == 0 {
            let (body, param) = &malformed[(i / 3) % malformed.len()];
            jobs.push((body.clone(), false, None, *param));
        }
    }
    assert!(jobs.len() >= 70);
    let steps_before = server.metric("opt_serve_decode_steps_total");
    let tokens_before = server.metric("opt_serve_generation_tokens_total");
    let barrier = Arc::new(Barrier::new(jobs.len()));
    let addr = server.addr;
    let started = Instant::now();
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|(body, stream, valid_index, param)| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let r = request(addr, "POST", "/v1/completions", &[], Some(&body));
                let took = started.elapsed();
                (valid_index, param, stream, r, took)
            })
        })
        .collect();
    let mut answered_valid = 0;
    let mut answered_bad = 0;
    for h in handles {
        let (valid_index, param, stream, r, took) = h.join().expect("client thread");
        assert!(took < Duration::from_secs(120), "a request took {took:?}");
        match valid_index {
            Some(i) => {
                assert_eq!(outcome(stream, &r), alone[i], "request {i} under load differs from alone: {}", valid[i]);
                answered_valid += 1;
            }
            None => {
                assert_eq!(r.status, 400, "malformed request answered {}", r.status);
                let e = r.json();
                assert_eq!(e["error"]["param"].as_str(), param, "{e}");
                answered_bad += 1;
            }
        }
    }
    assert_eq!(answered_valid, 56);
    assert!(answered_bad >= 19);
    // They really ran together: the batch held several sequences, and the decode steps were
    // fewer than the tokens they produced (first tokens come from the prefill, one per request).
    assert!(server.metric("opt_serve_running_sequences_peak") > 8.0);
    let steps = server.metric("opt_serve_decode_steps_total") - steps_before;
    let step_tokens = server.metric("opt_serve_generation_tokens_total") - tokens_before - 42.0;
    assert!(steps * 2.0 < step_tokens, "{steps} steps for {step_tokens} tokens: no batching");

    // Healthy afterwards: nothing queued or running, all KV cache returned, still answering.
    // (The gauges are published after the loop turn that answered the last request.)
    assert_eq!(server.get("/health").status, 200);
    wait_for(&server, 10, "an idle engine", |s| {
        s.metric("opt_serve_queue_depth") == 0.0
            && s.metric("opt_serve_running_sequences") == 0.0
            && s.metric("opt_serve_kv_cache_used_bytes") == 0.0
    });
    let again = outcome(false, &request(addr, "POST", "/v1/completions", &[], Some(valid[0].to_string().as_bytes())));
    assert_eq!(again, alone[0]);
}

#[test]
fn admission_waits_for_kv_budget_and_results_do_not_change() {
    // Room for about two of these sequences at a time (each reserves 20 + 39 positions of 1 KiB).
    let server = TestServer::start(256, |o| o.engine.kv_cache_bytes = 130 * 1024);
    let bodies: Vec<Value> = (0..8)
        .map(|i| json!({"prompt": vec![2u32 + i; 20], "max_tokens": 40, "min_tokens": 40, "temperature": 0}))
        .collect();
    let alone: Vec<Value> = bodies.iter().map(|b| server.post("/v1/completions", b).1["choices"].clone()).collect();
    let addr = server.addr;
    let handles: Vec<_> = bodies
        .iter()
        .map(|b| {
            let body = b.to_string();
            std::thread::spawn(move || request(addr, "POST", "/v1/completions", &[], Some(body.as_bytes())).json())
        })
        .collect();
    for (h, want) in handles.into_iter().zip(&alone) {
        let got = h.join().expect("client");
        assert_eq!(&got["choices"], want);
        assert_eq!(got["usage"]["completion_tokens"], 40);
    }
    wait_for(&server, 10, "the KV cache to be returned", |s| s.metric("opt_serve_kv_cache_used_bytes") == 0.0);
    // The budget held, and it was the limit: two sequences ran together, never three.
    let budget = server.metric("opt_serve_kv_cache_budget_bytes");
    let peak = server.metric("opt_serve_kv_cache_peak_bytes");
    assert!(peak <= budget, "{peak} > {budget}");
    assert_eq!(server.metric("opt_serve_running_sequences_peak"), 2.0);
}

#[test]
fn a_full_queue_answers_429() {
    let server = TestServer::start(2048, |o| {
        o.engine.max_queue = 2;
        o.engine.max_running = 1;
    });
    let addr = server.addr;
    let body = json!({"prompt": "x", "max_tokens": 800, "min_tokens": 800, "temperature": 0}).to_string();
    let barrier = Arc::new(Barrier::new(12));
    let handles: Vec<_> = (0..12)
        .map(|_| {
            let (barrier, body) = (barrier.clone(), body.clone());
            std::thread::spawn(move || {
                barrier.wait();
                request(addr, "POST", "/v1/completions", &[], Some(body.as_bytes()))
            })
        })
        .collect();
    let mut ok = 0;
    let mut busy = 0;
    for h in handles {
        let r = h.join().expect("client");
        match r.status {
            200 => {
                assert_eq!(r.json()["usage"]["completion_tokens"], 800);
                ok += 1;
            }
            429 => {
                let e = r.json();
                assert_eq!(e["error"]["type"], "server_overloaded");
                assert_eq!(e["error"]["code"], "queue_full");
                busy += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!(ok >= 1 && busy >= 1, "{ok} answered, {busy} refused");
    assert!(server.metric("opt_serve_rejected_queue_full_total") >= 1.0);
    assert_eq!(server.get("/health").status, 200);
}

fn send_raw(addr: std::net::SocketAddr, body: &Value) -> TcpStream {
    let body = body.to_string();
    let mut s = TcpStream::connect(addr).expect("connect");
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body.as_bytes()).expect("write");
    s
}

#[test]
fn a_client_that_disconnects_is_cancelled() {
    // 2000 tokens take seconds; a cancelled request must stop long before.
    let server = TestServer::start(2048, |_| {});
    let long = json!({"prompt": "Tell me everything", "max_tokens": 2000, "min_tokens": 2000, "temperature": 0});

    // Streaming: read the first event, then hang up.
    let mut body = long.clone();
    body["stream"] = json!(true);
    let mut s = send_raw(server.addr, &body);
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "server closed early");
        seen.extend_from_slice(&buf[..n]);
    }
    wait_for(&server, 10, "the stream to be running", |s| s.metric("opt_serve_running_sequences") == 1.0);
    drop(s);
    wait_for(&server, 10, "the stream's cancellation", |s| {
        s.metric("opt_serve_cancelled_total") >= 1.0 && s.metric("opt_serve_running_sequences") == 0.0
    });

    // Non-streaming: hang up while it is being generated.
    let s = send_raw(server.addr, &long);
    wait_for(&server, 10, "the request to run", |s| s.metric("opt_serve_running_sequences") == 1.0);
    s.shutdown(std::net::Shutdown::Both).expect("shutdown");
    drop(s);
    wait_for(&server, 10, "the request's cancellation", |s| {
        s.metric("opt_serve_cancelled_total") >= 2.0 && s.metric("opt_serve_running_sequences") == 0.0
    });
    let generated = server.metric("opt_serve_generation_tokens_total");
    assert!(generated < 4000.0, "cancelled requests ran to the end ({generated} tokens)");
    wait_for(&server, 10, "the KV cache to be returned", |s| s.metric("opt_serve_kv_cache_used_bytes") == 0.0);
    // And the server still answers.
    let (status, r) = server.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 3}));
    assert_eq!(status, 200, "{r}");
}
