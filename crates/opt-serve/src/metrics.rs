//! Server metrics in the Prometheus text format (`GET /metrics`), without a metrics crate: a
//! handful of counters, gauges and fixed-bucket histograms behind one mutex. Updates are a few
//! per request and one per decode step, so the lock is never contended enough to matter.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Latency buckets (seconds): 5 ms to 2 min, roughly ×2.5 apart.
const BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Window over which `opt_serve_generation_tokens_per_second` is measured.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (c, &b) in self.counts.iter_mut().zip(BUCKETS.iter()) {
            if secs <= b {
                *c += 1;
            }
        }
        self.sum += secs;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(BUCKETS.iter()) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// (route, status) → count.
    requests: BTreeMap<(&'static str, u16), u64>,
    prompt_tokens: u64,
    generated_tokens: u64,
    cancelled: u64,
    rejected_full: u64,
    decode_steps: u64,
    request_latency: Histogram,
    first_token: Histogram,
    queue_wait: Histogram,
    decode_step: Histogram,
    /// (time, tokens) of recent decode steps, for the tokens/s gauge.
    recent: VecDeque<(Instant, usize)>,
}

/// Everything `/metrics` shows. Gauges that the engine owns are atomics, read at render time.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
    /// Requests submitted and not yet admitted to the running batch (the queue).
    pub queued: AtomicUsize,
    pub running_requests: AtomicUsize,
    pub running_sequences: AtomicUsize,
    pub kv_used_bytes: AtomicUsize,
    pub kv_budget_bytes: AtomicUsize,
    /// High-water marks since start: how close the server came to its limits.
    pub kv_peak_bytes: AtomicUsize,
    pub running_sequences_peak: AtomicUsize,
    /// False once the engine thread has stopped.
    pub engine_alive: AtomicBool,
}

impl Metrics {
    pub fn new(kv_budget: usize) -> Self {
        Metrics {
            inner: Mutex::new(Inner::default()),
            queued: AtomicUsize::new(0),
            running_requests: AtomicUsize::new(0),
            running_sequences: AtomicUsize::new(0),
            kv_used_bytes: AtomicUsize::new(0),
            kv_budget_bytes: AtomicUsize::new(kv_budget),
            kv_peak_bytes: AtomicUsize::new(0),
            running_sequences_peak: AtomicUsize::new(0),
            engine_alive: AtomicBool::new(true),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic while holding the lock cannot leave the counters inconsistent in a way that
        // matters, so a poisoned lock is used as is.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn request(&self, route: &'static str, status: u16) {
        self.with(|m| *m.requests.entry((route, status)).or_insert(0) += 1);
    }

    pub fn completion_done(&self, latency: Duration, prompt_tokens: usize) {
        self.with(|m| {
            m.request_latency.observe(latency.as_secs_f64());
            m.prompt_tokens += prompt_tokens as u64;
        });
    }

    pub fn first_token(&self, after: Duration) {
        self.with(|m| m.first_token.observe(after.as_secs_f64()));
    }

    pub fn queue_wait(&self, wait: Duration) {
        self.with(|m| m.queue_wait.observe(wait.as_secs_f64()));
    }

    pub fn cancelled(&self) {
        self.with(|m| m.cancelled += 1);
    }

    pub fn rejected_full(&self) {
        self.with(|m| m.rejected_full += 1);
    }

    /// `tokens` new tokens were produced (a decode step, or the first tokens after a prefill).
    pub fn tokens(&self, tokens: usize, step: Option<Duration>) {
        let now = Instant::now();
        self.with(|m| {
            m.generated_tokens += tokens as u64;
            if let Some(d) = step {
                m.decode_steps += 1;
                m.decode_step.observe(d.as_secs_f64());
            }
            m.recent.push_back((now, tokens));
            while m.recent.front().is_some_and(|&(t, _)| now.duration_since(t) > RATE_WINDOW) {
                m.recent.pop_front();
            }
        });
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let now = Instant::now();
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let ld = |a: &AtomicUsize| a.load(Ordering::Relaxed) as f64;
        gauge(&mut out, "opt_serve_queue_depth", "Requests waiting to join the running batch.", ld(&self.queued));
        gauge(&mut out, "opt_serve_running_requests", "Requests in the running batch.", ld(&self.running_requests));
        gauge(
            &mut out,
            "opt_serve_running_sequences",
            "Sequences decoded at each step (continuous batch size).",
            ld(&self.running_sequences),
        );
        gauge(
            &mut out,
            "opt_serve_kv_cache_used_bytes",
            "KV-cache memory reserved by running sequences.",
            ld(&self.kv_used_bytes),
        );
        gauge(
            &mut out,
            "opt_serve_kv_cache_budget_bytes",
            "KV-cache memory budget for admission.",
            ld(&self.kv_budget_bytes),
        );
        gauge(
            &mut out,
            "opt_serve_kv_cache_peak_bytes",
            "Most KV-cache memory reserved at once since start.",
            ld(&self.kv_peak_bytes),
        );
        gauge(
            &mut out,
            "opt_serve_running_sequences_peak",
            "Largest continuous batch since start.",
            ld(&self.running_sequences_peak),
        );
        gauge(
            &mut out,
            "opt_serve_engine_up",
            "1 while the engine thread runs.",
            if self.engine_alive.load(Ordering::Relaxed) { 1.0 } else { 0.0 },
        );
        self.with(|m| {
            while m.recent.front().is_some_and(|&(t, _)| now.duration_since(t) > RATE_WINDOW) {
                m.recent.pop_front();
            }
            let recent: usize = m.recent.iter().map(|&(_, n)| n).sum();
            gauge(
                &mut out,
                "opt_serve_generation_tokens_per_second",
                "Generated tokens per second over the last 10 s.",
                recent as f64 / RATE_WINDOW.as_secs_f64(),
            );
            let _ = writeln!(
                out,
                "# HELP opt_serve_requests_total HTTP requests by route and status.\n# TYPE opt_serve_requests_total counter"
            );
            for ((route, status), n) in &m.requests {
                let _ = writeln!(out, "opt_serve_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
            }
            counter(&mut out, "opt_serve_prompt_tokens_total", "Prompt tokens of completed requests.", m.prompt_tokens);
            counter(&mut out, "opt_serve_generation_tokens_total", "Generated tokens.", m.generated_tokens);
            counter(&mut out, "opt_serve_decode_steps_total", "Decode steps of the continuous batch.", m.decode_steps);
            counter(&mut out, "opt_serve_cancelled_total", "Requests cancelled because the client went away.", m.cancelled);
            counter(&mut out, "opt_serve_rejected_queue_full_total", "Requests refused with 429 (queue full).", m.rejected_full);
            m.request_latency.render(&mut out, "opt_serve_request_duration_seconds", "Completion request latency, end to end.");
            m.first_token.render(&mut out, "opt_serve_time_to_first_token_seconds", "Time from request to its first generated token.");
            m.queue_wait.render(&mut out, "opt_serve_queue_wait_seconds", "Time a request waited before joining the batch.");
            m.decode_step.render(&mut out, "opt_serve_decode_step_seconds", "Duration of one continuous-batch decode step.");
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(0.003);
        h.observe(0.2);
        h.observe(500.0);
        assert_eq!(h.counts[0], 1);
        assert_eq!(h.counts[5], 2); // le 0.25
        assert_eq!(h.counts[BUCKETS.len() - 1], 2);
        assert_eq!(h.count, 3);
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3"));
        assert!(s.contains("x_count 3"));
    }

    #[test]
    fn render_has_every_family() {
        let m = Metrics::new(1024);
        m.request("/v1/completions", 200);
        m.tokens(5, Some(Duration::from_millis(20)));
        let s = m.render();
        for name in [
            "opt_serve_queue_depth 0",
            "opt_serve_kv_cache_budget_bytes 1024",
            "opt_serve_requests_total{route=\"/v1/completions\",status=\"200\"} 1",
            "opt_serve_generation_tokens_total 5",
            "opt_serve_generation_tokens_per_second 0.5",
            "opt_serve_decode_step_seconds_count 1",
        ] {
            assert!(s.contains(name), "missing {name} in\n{s}");
        }
    }
}
