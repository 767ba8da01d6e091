//! opt-serve: an OpenAI/metaseq-compatible completions server for OPT models.
//!
//! - [`Server::new`] takes a model and a tokenizer and starts the engine thread: continuous
//!   batching under a KV-cache budget (see `engine.rs` for the scheduling rules);
//! - [`Server::router`] is the axum router (`/v1/completions` and its metaseq aliases,
//!   `/v1/models`, `/health`, `/metrics`, the playground at `/`);
//! - [`Server::serve`] runs it on a listener until a shutdown future resolves;
//! - [`Server::new_tp_leader`] and [`follow`]: tensor-parallel serving, rank 0 running the server
//!   and broadcasting each model call, the other ranks repeating them on their slices
//!   (`runner.rs`).
//!
//! The `opt-rs serve` command only parses arguments and calls these; tests start the same
//! server in-process on port 0.
//!
//! Layout: `request.rs` parses and checks a request body (every error names its field),
//! `engine.rs` owns the model, `response.rs` turns engine events into OpenAI JSON / SSE chunks,
//! `routes.rs` holds the handlers, `metrics.rs` the Prometheus counters, `error.rs` the one
//! mapping from errors to HTTP responses.

mod engine;
mod error;
mod metrics;
mod request;
mod response;
mod routes;
mod runner;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use opt_model::OptModel;
use opt_tensor::Backend;
use opt_tokenizer::OptTokenizer;

pub use engine::{EngineOptions, ModelInfo};
pub use error::{ApiError, ServeError};
pub use request::{parse_completion, CompletionRequest, Limits, PromptInput};
pub use runner::{follow, Call, Followers};

/// Everything about a server besides its model.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The model id clients use (`model` in requests, `/v1/models`).
    pub served_model_name: String,
    /// Require `Authorization: Bearer <key>` on the API routes.
    pub api_key: Option<String>,
    pub engine: EngineOptions,
    /// Request bodies larger than this get 413.
    pub max_body_bytes: usize,
}

impl ServerOptions {
    pub fn new(served_model_name: impl Into<String>) -> Self {
        ServerOptions {
            served_model_name: served_model_name.into(),
            api_key: None,
            engine: EngineOptions::default(),
            max_body_bytes: 8 << 20,
        }
    }
}

/// A server: the engine thread (started) and the HTTP state.
pub struct Server {
    state: routes::AppState,
    /// Stop serving when the engine stops (tensor parallelism: a rank failed).
    stop_with_engine: bool,
}

impl Server {
    /// Start the engine for `model`. The tokenizer must fit the model's vocabulary.
    pub fn new<B: Backend + 'static>(
        model: OptModel<B>,
        tokenizer: OptTokenizer,
        options: ServerOptions,
    ) -> Result<Self, ServeError> {
        Self::start(model, tokenizer, options, None)
    }

    /// Start the engine as the leader of a tensor-parallel group: `model` is rank 0's slice,
    /// and every model call is first handed to `followers` (each running [`follow`] on its
    /// slice). The followers are told to stop when the engine ends, and the server stops
    /// serving ([`Server::run_until_ctrl_c`] returns an error) if the engine stops early.
    pub fn new_tp_leader<B: Backend + 'static>(
        model: OptModel<B>,
        tokenizer: OptTokenizer,
        options: ServerOptions,
        followers: Box<dyn Followers>,
    ) -> Result<Self, ServeError> {
        Self::start(model, tokenizer, options, Some(followers))
    }

    fn start<B: Backend + 'static>(
        model: OptModel<B>,
        tokenizer: OptTokenizer,
        options: ServerOptions,
        followers: Option<Box<dyn Followers>>,
    ) -> Result<Self, ServeError> {
        let stop_with_engine = followers.is_some();
        let tok = Arc::new(tokenizer);
        let engine = engine::spawn(model, tok.clone(), options.engine.clone(), followers)?;
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let state = Arc::new(routes::AppInner {
            engine,
            tok,
            model_name: options.served_model_name,
            api_key: options.api_key.filter(|k| !k.is_empty()),
            created,
            max_body_bytes: options.max_body_bytes,
        });
        Ok(Server { state, stop_with_engine })
    }

    /// What the handlers know about the model (context, vocabulary, KV bytes per position).
    pub fn model_info(&self) -> &ModelInfo {
        &self.state.engine.info
    }

    /// The axum router.
    pub fn router(&self) -> axum::Router {
        routes::router(self.state.clone())
    }

    /// Serve on `listener` until `shutdown` resolves (in-flight requests are then finished), or,
    /// for a tensor-parallel leader, until the engine stops (an error then). The engine thread
    /// stops when the server is dropped.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let stopped = self.state.engine.stopped.clone();
        let watch = self.stop_with_engine;
        let engine_end = {
            let stopped = stopped.clone();
            async move {
                if watch {
                    stopped.notify.notified().await
                } else {
                    std::future::pending::<()>().await
                }
            }
        };
        let shutdown = async move {
            tokio::select! {
                _ = shutdown => {}
                _ = engine_end => {}
            }
        };
        axum::serve(listener, self.router()).with_graceful_shutdown(shutdown).await.map_err(ServeError::Http)?;
        match stopped.reason.lock().ok().and_then(|r| r.clone()) {
            Some(why) if watch => Err(ServeError::EngineStopped(why)),
            _ => Ok(()),
        }
    }

    /// Bind `addr` (`host:port`; port 0 picks a free one), tell `on_listening` the bound address,
    /// and serve until Ctrl-C, on a tokio runtime of its own (so the caller needs no async code).
    pub fn run_until_ctrl_c(self, addr: &str, on_listening: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(ServeError::Runtime)?;
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr: addr.to_string(), source })?;
            let local = listener.local_addr().map_err(|source| ServeError::Bind { addr: addr.to_string(), source })?;
            on_listening(local);
            let shutdown = async {
                // An error here means no signal handler could be installed: then run until killed.
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            self.serve(listener, shutdown).await
        })
    }
}
