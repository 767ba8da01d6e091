//! `opt-rs serve` end to end: the built binary on a fixture model, over loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

/// Kills the server when the test ends, whatever happens.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One request on a fresh connection; returns (status, body).
fn http(addr: &str, method: &str, path: &str, auth: Option<&str>, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if let Some(k) = auth {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body.as_bytes()).expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status");
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[test]
fn serve_answers_with_the_key_from_the_environment() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_opt-rs"))
        .args(["serve", "--model"])
        .arg(fixture("eval_model"))
        .args(["--port", "0", "--served-model-name", "m"])
        .env("OPT_RS_API_KEY", "k1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn opt-rs serve");
    let stdout = child.stdout.take().expect("stdout");
    let server = Server(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read the address line");
    let addr =
        line.trim().strip_prefix("listening on http://").unwrap_or_else(|| panic!("unexpected first line {line:?}"));

    let (status, body) = http(addr, "GET", "/health", None, "");
    assert_eq!(status, 200, "{body}");
    let req = r#"{"model": "m", "prompt": "Hello", "max_tokens": 3, "temperature": 0}"#;
    assert_eq!(http(addr, "POST", "/v1/completions", None, req).0, 401);
    let (status, body) = http(addr, "POST", "/v1/completions", Some("k1"), req);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["model"], "m");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    drop(server);
}

#[test]
fn serve_refuses_a_model_without_an_opt_vocabulary() {
    // The 512-token fixtures have no tokenizer; the bundled OPT one does not fit them.
    let out = Command::new(env!("CARGO_BIN_EXE_opt-rs"))
        .args(["serve", "--model"])
        .arg(fixture("pre_ln"))
        .args(["--port", "0"])
        .output()
        .expect("run opt-rs serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vocabulary is 512"), "{err}");
}
