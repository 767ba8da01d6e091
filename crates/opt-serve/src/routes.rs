//! HTTP: the router, the handlers and the API-key check.
//!
//! Routes: `POST /v1/completions` (and metaseq's `/completions`, `/v1/engines/{name}/completions`),
//! `GET /v1/models[/{id}]`, `GET /health`, `GET /metrics`, `GET /` (the playground). The API
//! routes need `Authorization: Bearer <key>` when the server has a key; the page, health and
//! metrics do not (a load balancer or Prometheus should not need the key; the page asks for it).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream;
use opt_generate::params::Mode;
use opt_generate::sample::fresh_seed;
use opt_tokenizer::OptTokenizer;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::engine::{EngineHandle, Event, Job, SubmitError};
use crate::error::ApiError;
use crate::request::{check_context, parse_completion, CompletionRequest, Limits, PromptInput};
use crate::response::Collector;

const PLAYGROUND: &str = include_str!("playground.html");

/// Shared by every handler.
pub(crate) struct AppInner {
    pub engine: EngineHandle,
    pub tok: Arc<OptTokenizer>,
    pub model_name: String,
    pub api_key: Option<String>,
    pub created: u64,
    pub max_body_bytes: usize,
}

pub(crate) type AppState = Arc<AppInner>;

pub(crate) fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/completions", post(completions))
        .route("/v1/engines/{name}/completions", post(engine_completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/", get(playground))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .with_state(state)
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A route label for the request counter (the path, with `{name}` folded).
fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/completions" => "/v1/completions",
        "/completions" => "/completions",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/" => "/",
        p if p.starts_with("/v1/engines/") && p.ends_with("/completions") => "/v1/engines/{name}/completions",
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        _ => "other",
    }
}

async fn count_requests(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let route = route_label(req.uri().path());
    let resp = next.run(req).await;
    app.engine.metrics.request(route, resp.status().as_u16());
    resp
}

/// Byte-wise comparison in time independent of where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_key(State(app): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, k)| k.trim());
        match given {
            Some(k) if same_secret(k.as_bytes(), key.as_bytes()) => {}
            Some(_) => return ApiError::unauthorized("Incorrect API key provided.").into_response(),
            None => {
                return ApiError::unauthorized(
                    "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                )
                .into_response()
            }
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> ApiError {
    ApiError::route_not_found(req.uri().path())
}

async fn playground() -> Response {
    let mut r = PLAYGROUND.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut r = (status, v.to_string()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

async fn health(State(app): State<AppState>) -> Response {
    let up = app.engine.metrics.engine_alive.load(std::sync::atomic::Ordering::Acquire);
    let status = if up { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json_response(status, &json!({"status": if up { "ok" } else { "engine stopped" }, "model": app.model_name}))
}

async fn metrics(State(app): State<AppState>) -> Response {
    let mut r = app.engine.metrics.render().into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}

fn model_card(app: &AppInner) -> Value {
    json!({
        "id": app.model_name,
        "object": "model",
        "created": app.created,
        "owned_by": "opt-rs",
        "max_model_len": app.engine.info.context,
    })
}

async fn models(State(app): State<AppState>) -> Response {
    json_response(StatusCode::OK, &json!({"object": "list", "data": [model_card(&app)]}))
}

async fn model(State(app): State<AppState>, id: Result<Path<String>, PathRejection>) -> Response {
    match id {
        Ok(Path(id)) if id == app.model_name => json_response(StatusCode::OK, &model_card(&app)),
        Ok(Path(id)) => ApiError::model_not_found(&id, &app.model_name).into_response(),
        Err(e) => ApiError::bad_body(e.body_text()).into_response(),
    }
}

async fn completions(State(app): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    match run_completion(app, None, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn engine_completions(
    State(app): State<AppState>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let name = match name {
        Ok(Path(n)) => n,
        Err(e) => return ApiError::bad_body(e.body_text()).into_response(),
    };
    match run_completion(app, Some(name), body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Tokenize the prompts and check each against the context.
fn prompt_ids(tok: &OptTokenizer, req: &CompletionRequest, context: usize) -> Result<Vec<Vec<u32>>, ApiError> {
    let mut out = Vec::with_capacity(req.prompts.len());
    for (i, p) in req.prompts.iter().enumerate() {
        let ids = match p {
            PromptInput::Text(s) => {
                tok.encode(s, true).map_err(|e| ApiError::invalid("prompt", format!("prompt {i}: {e}")))?
            }
            PromptInput::Ids(ids) => ids.clone(),
        };
        check_context(i, ids.len(), req.params.max_new_tokens, context)?;
        out.push(ids);
    }
    Ok(out)
}

async fn run_completion(
    app: AppState,
    path_model: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(app.max_body_bytes)
        } else {
            ApiError::bad_body(format!("could not read the request body: {}", e.body_text()))
        }
    })?;
    let info = &app.engine.info;
    let req = parse_completion(&body, Limits { context: info.context, vocab: info.vocab })?;
    for asked in [path_model.as_deref(), req.model.as_deref()].into_iter().flatten() {
        if asked != app.model_name {
            return Err(ApiError::model_not_found(asked, &app.model_name));
        }
    }
    let opts = &app.engine.options;
    // Requests that could never be admitted are refused now rather than queued forever.
    let sequences = info.sequences(req.prompts.len(), req.params.max_new_tokens, req.mode);
    if sequences > opts.max_running {
        let blame = if req.params.best_of.is_some_and(|b| b > 1) {
            "best_of"
        } else if req.params.n > 1 {
            "n"
        } else {
            "prompt"
        };
        return Err(ApiError::invalid(
            blame,
            format!(
                "the request needs {sequences} sequences at once (prompts × best_of/n) and the server runs at most {}",
                opts.max_running
            ),
        ));
    }
    // Tokenizing a long text takes a while: keep it off the async workers.
    let (tok, context) = (app.tok.clone(), info.context);
    let (req, prompts) = tokio::task::spawn_blocking(move || {
        let ids = prompt_ids(&tok, &req, context);
        (req, ids)
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))?;
    let prompts = prompts?;
    let kv_bytes = info.kv_bytes(&prompts, req.params.max_new_tokens, req.mode);
    if kv_bytes > opts.kv_cache_bytes {
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "the request needs {:.1} MiB of KV cache and the server's budget is {:.1} MiB; lower max_tokens, n or best_of, or send fewer prompts",
                mib(kv_bytes),
                mib(opts.kv_cache_bytes)
            ),
        ));
    }
    let seed = match req.mode {
        Mode::Sample { .. } => req.params.seed.unwrap_or_else(fresh_seed),
        _ => 0,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let collector = Collector::new(
        format!("cmpl-{:016x}", fresh_seed()),
        now_secs(),
        app.model_name.clone(),
        app.tok.clone(),
        &prompts,
        &req.params,
    );
    let job =
        Job { prompts, params: req.params.clone(), mode: req.mode, seed, events: tx, received, kv_bytes, sequences };
    match app.engine.submit(job) {
        Ok(()) => {}
        Err(SubmitError::Full) => {
            app.engine.metrics.rejected_full();
            return Err(ApiError::overloaded(format!(
                "the server is at capacity ({} requests waiting); retry later",
                opts.max_queue
            )));
        }
        Err(SubmitError::Closed) => return Err(ApiError::unavailable("the engine is not running")),
    }
    if req.stream {
        Ok(stream_response(app, rx, collector, req.include_usage, received))
    } else {
        collect_response(app, rx, collector, received).await
    }
}

async fn collect_response(
    app: AppState,
    mut rx: mpsc::UnboundedReceiver<Event>,
    mut collector: Collector,
    received: Instant,
) -> Result<Response, ApiError> {
    loop {
        match rx.recv().await {
            Some(Event::Done) => break,
            Some(Event::Error(m)) => return Err(ApiError::internal(m)),
            Some(e) => {
                collector.on_event(e, false);
            }
            None => return Err(ApiError::internal("the engine stopped before the request finished")),
        }
    }
    app.engine.metrics.completion_done(received.elapsed(), collector.prompt_tokens());
    Ok(json_response(StatusCode::OK, &collector.response()))
}

/// State of one SSE stream.
struct StreamState {
    app: AppState,
    rx: mpsc::UnboundedReceiver<Event>,
    collector: Collector,
    pending: VecDeque<SseEvent>,
    include_usage: bool,
    received: Instant,
    ended: bool,
}

/// Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. If the client goes
/// away, the stream (and with it the event receiver) is dropped, which the engine sees as a
/// cancellation.
fn stream_response(
    app: AppState,
    rx: mpsc::UnboundedReceiver<Event>,
    collector: Collector,
    include_usage: bool,
    received: Instant,
) -> Response {
    let state = StreamState { app, rx, collector, pending: VecDeque::new(), include_usage, received, ended: false };
    let events = stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok::<SseEvent, Infallible>(e), st));
            }
            if st.ended {
                return None;
            }
            match st.rx.recv().await {
                Some(Event::Done) => {
                    if st.include_usage {
                        st.pending.push_back(SseEvent::default().data(st.collector.usage_chunk().to_string()));
                    }
                    st.pending.push_back(SseEvent::default().data("[DONE]"));
                    st.ended = true;
                    st.app.engine.metrics.completion_done(st.received.elapsed(), st.collector.prompt_tokens());
                }
                Some(Event::Error(m)) => {
                    st.pending.push_back(SseEvent::default().data(ApiError::internal(m).body().to_string()));
                    st.pending.push_back(SseEvent::default().data("[DONE]"));
                    st.ended = true;
                }
                Some(e) => {
                    for chunk in st.collector.on_event(e, true) {
                        st.pending.push_back(SseEvent::default().data(chunk.to_string()));
                    }
                }
                None => {
                    let e = ApiError::internal("the engine stopped before the request finished");
                    st.pending.push_back(SseEvent::default().data(e.body().to_string()));
                    st.pending.push_back(SseEvent::default().data("[DONE]"));
                    st.ended = true;
                }
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}
