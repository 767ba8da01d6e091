//! A real server on loopback (in-process, port 0) and a minimal blocking HTTP/1.1 client, so the
//! tests exercise the same sockets, framing and SSE bytes a client sees without pulling in an
//! HTTP client crate.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use opt_model::{OptConfig, OptModel};
use opt_serve::{Server, ServerOptions};
use opt_tensor::{CpuBackend, DType};
use opt_tokenizer::OptTokenizer;
use serde_json::Value;

pub const MODEL_NAME: &str = "tiny-test";

/// A random-weight model with OPT's real vocabulary (so the bundled tokenizer fits), with a
/// context of `context` positions. The same seed always gives the same weights, so a test can
/// build a second copy as its reference.
pub fn tiny_model(context: usize) -> OptModel<CpuBackend> {
    let mut cfg = OptConfig::preset("tiny").expect("tiny preset");
    cfg.max_position_embeddings = context;
    OptModel::new_random(CpuBackend::new(), cfg, DType::F32, 0.02, 7).expect("random model")
}

pub fn tokenizer() -> OptTokenizer {
    OptTokenizer::bundled().expect("bundled tokenizer")
}

/// A server running on a background thread until dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(context: usize, configure: impl FnOnce(&mut ServerOptions)) -> Self {
        let mut opts = ServerOptions::new(MODEL_NAME);
        configure(&mut opts);
        Self::run(Server::new(tiny_model(context), tokenizer(), opts).expect("server"))
    }

    /// Serve an already built server (e.g. a tensor-parallel leader).
    pub fn run(server: Server) -> Self {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                addr_tx.send(listener.local_addr().expect("addr")).expect("send addr");
                server
                    .serve(listener, async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .expect("serve");
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(30)).expect("server address");
        TestServer { addr, shutdown: Some(stop_tx), thread: Some(thread) }
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = request(self.addr, "POST", path, &[], Some(body.to_string().as_bytes()));
        (r.status, r.json())
    }

    pub fn get(&self, path: &str) -> Resp {
        request(self.addr, "GET", path, &[], None)
    }

    /// `/metrics` value of an unlabelled metric.
    pub fn metric(&self, name: &str) -> f64 {
        let text = String::from_utf8_lossy(&self.get("/metrics").body).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing in\n{text}"))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("status {}: body is not JSON ({e}): {}", self.status, String::from_utf8_lossy(&self.body))
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of an SSE body, in order.
    pub fn sse_data(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .split("\n\n")
            .flat_map(|event| {
                event.lines().filter_map(|l| l.strip_prefix("data: ").map(str::to_string)).collect::<Vec<_>>()
            })
            .collect()
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), read to the end.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(300))).expect("timeout");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("write head");
    if let Some(b) = body {
        s.write_all(b).expect("write body");
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> Resp {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status: u16 = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status code");
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))).collect();
    let rest = &raw[split + 4..];
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked { dechunk(rest) } else { rest.to_vec() };
    Resp { status, headers, body }
}

/// Decode `Transfer-Encoding: chunked`.
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).expect("chunk size");
        data = &data[eol + 2..];
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
    out
}

/// The concatenated text of each choice of a list of SSE chunks, and the finish reasons.
pub fn stream_texts(data: &[String], choices: usize) -> (Vec<String>, Vec<Option<String>>) {
    let mut texts = vec![String::new(); choices];
    let mut finish = vec![None; choices];
    for d in data {
        if d == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(d).unwrap_or_else(|e| panic!("chunk is not JSON ({e}): {d}"));
        for c in v["choices"].as_array().expect("choices") {
            let i = c["index"].as_u64().expect("index") as usize;
            texts[i].push_str(c["text"].as_str().expect("text"));
            if let Some(f) = c["finish_reason"].as_str() {
                finish[i] = Some(f.to_string());
            }
        }
    }
    (texts, finish)
}
