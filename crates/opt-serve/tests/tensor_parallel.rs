//! Tensor-parallel serving in-process: a tp = 2 leader (rank 0: HTTP server and engine) and a
//! follower (rank 1, `opt_serve::follow`) as threads joined by opt-dist's TCP rendezvous, as
//! `mpirun -np 2 opt-rs serve --tp 2` runs them as processes. Concurrent requests must get the
//! answers of a one-process server; a dead follower must stop the leader instead of hanging.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use opt_dist::tcp::TcpComm;
use opt_dist::{parallelize, Communicator};
use opt_serve::{follow, Followers, ServeError, Server, ServerOptions};
use serde_json::{json, Value};

const CONTEXT: usize = 64;

/// The leader's broadcast over the communicator (what `opt-rs serve --tp` uses too).
struct CommFollowers(Arc<dyn Communicator>);

impl Followers for CommFollowers {
    fn broadcast(&mut self, msg: &[u8]) -> Result<(), String> {
        self.0.broadcast_bytes(&mut msg.to_vec(), 0).map_err(|e| e.to_string())
    }
    // Short, so that the idle heartbeat runs during the test.
    fn heartbeat(&self) -> Duration {
        Duration::from_millis(100)
    }
}

/// Join a two-rank group: returns rank 0's communicator, and runs `rank1` on rank 1's in a thread.
fn pair<T: Send + 'static>(
    rank1: impl FnOnce(Arc<dyn Communicator>) -> T + Send + 'static,
) -> (Arc<dyn Communicator>, JoinHandle<T>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let a = addr.clone();
    let follower = std::thread::spawn(move || {
        let comm = TcpComm::rendezvous(1, 2, &a, None, Duration::from_secs(60)).expect("rank 1 rendezvous");
        rank1(Arc::new(comm))
    });
    let comm = TcpComm::rendezvous(0, 2, &addr, Some(listener), Duration::from_secs(60)).expect("rank 0 rendezvous");
    (Arc::new(comm), follower)
}

fn bodies() -> Vec<Value> {
    vec![
        json!({"prompt": "Hello there", "max_tokens": 8, "temperature": 0, "logprobs": 2}),
        json!({"prompt": ["The cat", "A dog sat on the"], "max_tokens": 6, "temperature": 0, "logprobs": 1}),
        json!({"prompt": "Once upon", "max_tokens": 7, "temperature": 0.9, "top_p": 0.95, "seed": 11, "n": 2,
               "logprobs": 1}),
        json!({"prompt": "Ranked samples", "max_tokens": 5, "seed": 3, "best_of": 3, "n": 2, "logprobs": 1}),
        json!({"prompt": "Beam search", "max_tokens": 5, "temperature": 0, "best_of": 2, "logprobs": 1}),
        json!({"prompt": "Score me please", "max_tokens": 0, "echo": true, "logprobs": 1}),
        json!({"prompt": [2, 100, 200, 300], "max_tokens": 6, "temperature": 0, "echo": true, "logprobs": 1,
               "stop": ["\n"]}),
    ]
}

/// Post every body at once (one thread each); the responses in body order.
fn post_all(server: &TestServer, bodies: &[Value]) -> Vec<(u16, Value)> {
    std::thread::scope(|s| {
        let hs: Vec<_> = bodies.iter().map(|b| s.spawn(move || server.post("/v1/completions", b))).collect();
        hs.into_iter().map(|h| h.join().expect("client thread")).collect()
    })
}

/// Texts, finish reasons and logprob tokens must be equal; log-probs equal up to the summation
/// order of the tensor-parallel reductions.
fn assert_same(i: usize, got: &Value, want: &Value) {
    let (g, w) = (got["choices"].as_array().expect("choices"), want["choices"].as_array().expect("choices"));
    assert_eq!(g.len(), w.len(), "request {i}: number of choices");
    for (k, (a, b)) in g.iter().zip(w).enumerate() {
        assert_eq!(a["text"], b["text"], "request {i} choice {k}: text");
        assert_eq!(a["finish_reason"], b["finish_reason"], "request {i} choice {k}: finish_reason");
        assert_eq!(a["logprobs"]["tokens"], b["logprobs"]["tokens"], "request {i} choice {k}: tokens");
        assert_eq!(a["logprobs"]["text_offset"], b["logprobs"]["text_offset"], "request {i} choice {k}");
        let lp = |v: &Value| -> Vec<Option<f64>> {
            v["logprobs"]["token_logprobs"]
                .as_array()
                .map(|a| a.iter().map(Value::as_f64).collect())
                .unwrap_or_default()
        };
        let (la, lb) = (lp(a), lp(b));
        assert_eq!(la.len(), lb.len(), "request {i} choice {k}: log-probs");
        for (x, y) in la.iter().zip(&lb) {
            match (x, y) {
                (Some(x), Some(y)) => assert!((x - y).abs() < 1e-4, "request {i} choice {k}: log-prob {x} vs {y}"),
                _ => assert_eq!(x, y, "request {i} choice {k}"),
            }
        }
    }
    assert_eq!(got["usage"], want["usage"], "request {i}: usage");
}

#[test]
fn tp2_server_answers_like_one_process() {
    let bodies = bodies();
    let want = {
        let single = TestServer::start(CONTEXT, |_| {});
        bodies.iter().map(|b| single.post("/v1/completions", b)).collect::<Vec<_>>()
    };
    for (i, (status, v)) in want.iter().enumerate() {
        assert_eq!(*status, 200, "one process, request {i}: {v}");
    }

    let (comm, follower) = pair(|comm| {
        let model = parallelize(tiny_model(CONTEXT), comm.clone()).expect("rank 1 shard");
        follow(model, &tokenizer(), || {
            let mut b = Vec::new();
            comm.broadcast_bytes(&mut b, 0).map(|_| b).map_err(|e| e.to_string())
        })
    });
    let model = parallelize(tiny_model(CONTEXT), comm.clone()).expect("rank 0 shard");
    let server =
        Server::new_tp_leader(model, tokenizer(), ServerOptions::new(MODEL_NAME), Box::new(CommFollowers(comm)))
            .expect("leader");
    let server = TestServer::run(server);
    assert_eq!(server.get("/health").status, 200);
    // Twice: all at once (continuous batching, forks and releases on both ranks), then again
    // after an idle pause long enough for heartbeats.
    for round in 0..2 {
        let got = post_all(&server, &bodies);
        for (i, ((s, g), (_, w))) in got.iter().zip(&want).enumerate() {
            assert_eq!(*s, 200, "round {round}, tp = 2, request {i}: {g}");
            assert_same(i, g, w);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // A streamed request ends like the non-streamed one.
    let r = common::request(
        server.addr,
        "POST",
        "/v1/completions",
        &[],
        Some(
            json!({"prompt": "Hello there", "max_tokens": 8, "temperature": 0, "stream": true}).to_string().as_bytes(),
        ),
    );
    let (texts, _) = stream_texts(&r.sse_data(), 1);
    assert_eq!(texts[0], want[0].1["choices"][0]["text"].as_str().expect("text"));
    // Stopping the server ends the engine, which tells the follower to stop.
    drop(server);
    follower.join().expect("follower thread").expect("the follower ends cleanly on Shutdown");
}

#[test]
fn a_dead_follower_stops_the_leader() {
    // Rank 1 joins, then exits at once (closing its sockets), as a crashed process would.
    let (comm, follower) = pair(drop);
    follower.join().expect("rank 1");
    let model = parallelize(tiny_model(CONTEXT), comm.clone()).expect("rank 0 shard");
    let server =
        Server::new_tp_leader(model, tokenizer(), ServerOptions::new(MODEL_NAME), Box::new(CommFollowers(comm)))
            .expect("leader");
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let serving = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addr_tx.send(listener.local_addr().expect("addr")).expect("send");
            server.serve(listener, std::future::pending()).await
        })
    });
    let addr = addr_rx.recv().expect("address");
    let body = json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}).to_string();
    let r = common::request(addr, "POST", "/v1/completions", &[], Some(body.as_bytes()));
    assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
    let msg = r.json()["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("rank 1"), "the error names the lost rank: {msg}");
    // The server stops by itself (no shutdown signal was given) and says why.
    match serving.join().expect("server thread") {
        Err(ServeError::EngineStopped(why)) => assert!(why.contains("tensor-parallel"), "{why}"),
        other => panic!("expected the engine to stop, got {other:?}"),
    }
}
