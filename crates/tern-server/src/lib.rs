//! The HTTP face of tern: an OpenAI-compatible server over the library's batched engine.
//!
//! [`Server::bind`] loads the named adapters and binds the socket; [`Server::run`] serves
//! until a shutdown future resolves (SIGTERM or Ctrl-C in `tern serve`), then stops taking
//! requests, lets running rows finish within the grace period and cancels the rest.

pub mod bench;
pub mod error;
pub mod loadgen;
pub mod metrics;
pub mod openai;
mod routes;

use crate::error::ApiError;
use crate::metrics::Metrics;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tern::generate::response_cache::ResponseCache;
use tern::generate::{Engine, EngineConfig};
use tern::lora::AdapterRegistry;
use tern::{LoadedModel, TernError};

/// Everything `tern serve` can set.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on (loopback by default).
    pub host: String,
    /// Port (0 picks a free one).
    pub port: u16,
    /// Required as `Authorization: Bearer KEY` on `/v1/*` when set.
    pub api_key: Option<String>,
    /// The name the base model is served under (`base` always works too).
    pub model_name: String,
    /// Adapters loaded at start, as (name, path).
    pub adapters: Vec<(String, PathBuf)>,
    /// Rows decoded together.
    pub max_batch: usize,
    /// Requests waiting for a batch slot before 429s.
    pub max_queue: usize,
    /// Largest `max_tokens` a request may ask for (also the default when it asks none).
    pub max_tokens_limit: usize,
    /// Longest prompt in tokens.
    pub max_prompt_tokens: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// How long running rows may finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Cap on resident adapter bytes (least recently used idle ones are evicted).
    pub adapter_budget: Option<usize>,
    /// Bytes of KV cache kept for prompt prefixes already run (0: off).
    pub prefix_cache_bytes: usize,
    /// Answers of deterministic requests kept for repeats (0: off).
    pub response_cache_entries: usize,
    /// Bytes those answers (and their prompts) may take.
    pub response_cache_bytes: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            model_name: "tern".into(),
            adapters: vec![],
            max_batch: 16,
            max_queue: 64,
            max_tokens_limit: 2048,
            max_prompt_tokens: 8192,
            max_body_bytes: 1 << 20,
            shutdown_grace: Duration::from_secs(30),
            adapter_budget: None,
            prefix_cache_bytes: 256 << 20,
            response_cache_entries: 0,
            response_cache_bytes: 64 << 20,
        }
    }
}

impl ServeConfig {
    /// Refuses settings that cannot serve as meant, naming the flag. [`Server::bind`] runs
    /// it; `tern serve` runs it first, before the model loads.
    pub fn validate(&self) -> Result<(), ServeError> {
        let bad = |m: String| Err(ServeError::Config(m));
        if self.max_batch == 0 || self.max_tokens_limit == 0 || self.max_prompt_tokens == 0 {
            return bad(
                "--max-batch, --max-tokens-limit and --max-prompt-tokens must be at least 1".into(),
            );
        }
        if self.max_body_bytes == 0 {
            return bad("--max-body-bytes must be at least 1 (0 refuses every request)".into());
        }
        if let Some(key) = &self.api_key {
            // `--api-key "$KEY"` with KEY unset: the operator asked for a key, so serving
            // without one would be open to anyone.
            if key.is_empty() {
                return bad("--api-key is empty (an unset variable?): give a non-empty key, or leave out both --api-key and TERN_API_KEY to serve without one".into());
            }
            // HTTP drops such characters from a header's ends, so no client could match.
            if key.trim() != key || key.chars().any(char::is_control) {
                return bad("--api-key starts or ends with whitespace or holds a control character, which no client can send in an Authorization header; remove them".into());
            }
        }
        let mut seen = std::collections::HashMap::new();
        for (name, path) in &self.adapters {
            check_adapter_name(name, &self.model_name).map_err(ServeError::Config)?;
            // The second would silently replace the first.
            if let Some(first) = seen.insert(name, path) {
                return bad(format!(
                    "adapter name `{name}` is given twice ({} and {}); give each --adapter its own name",
                    first.display(),
                    path.display()
                ));
            }
        }
        Ok(())
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// An adapter named on the command line did not load.
    #[error("adapter `{name}`: {source}")]
    Adapter {
        /// Its name.
        name: String,
        /// Why.
        source: TernError,
    },
    /// Bad settings.
    #[error("{0}")]
    Config(String),
    /// The engine failed to start.
    #[error(transparent)]
    Engine(#[from] TernError),
    /// The socket could not be bound or served.
    #[error("{addr}: {source}")]
    Io {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// What every handler shares.
pub(crate) struct AppState {
    pub lm: Arc<LoadedModel>,
    pub engine: Arc<Engine>,
    pub registry: AdapterRegistry,
    pub cfg: ServeConfig,
    pub metrics: Arc<Metrics>,
    pub created: u64,
    pub responses: Option<ResponseCache>,
}

/// A bound server, ready to run.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.local_addr())
            .finish()
    }
}

/// Whether a name may be used for an adapter.
pub(crate) fn check_adapter_name(name: &str, model_name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_control() || c == '/') {
        return Err(format!(
            "adapter name `{name}` must be 1-128 characters without `/` or control characters"
        ));
    }
    if name == "base" || name == model_name {
        return Err(format!(
            "`{name}` names the base model; pick another adapter name"
        ));
    }
    Ok(())
}

impl Server {
    /// Starts the engine, loads the configured adapters, and binds the socket.
    pub async fn bind(lm: Arc<LoadedModel>, cfg: ServeConfig) -> Result<Self, ServeError> {
        cfg.validate()?;
        let registry = lm.adapter_registry(cfg.adapter_budget);
        for (name, path) in &cfg.adapters {
            registry
                .load(name, path)
                .map_err(|source| ServeError::Adapter {
                    name: name.clone(),
                    source,
                })?;
        }
        let metrics = Arc::new(Metrics::new());
        let m = metrics.clone();
        let engine = Engine::start(
            lm.clone(),
            EngineConfig {
                max_batch: cfg.max_batch,
                max_queue: cfg.max_queue,
                on_step: Some(Arc::new(move |s| m.step(s.rows))),
                prefix_cache_bytes: cfg.prefix_cache_bytes,
                ..Default::default()
            },
        )?;
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| ServeError::Io { addr, source })?;
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(Self {
            listener,
            state: Arc::new(AppState {
                lm,
                engine: Arc::new(engine),
                registry,
                metrics,
                created,
                responses: (cfg.response_cache_entries > 0).then(|| {
                    ResponseCache::new(cfg.response_cache_entries, cfg.response_cache_bytes)
                }),
                cfg,
            }),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Serves until `shutdown` resolves, then drains: no new requests, running rows finish
    /// within the grace period, the rest are cancelled, open streams end.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let addr = self.local_addr().to_string();
        let engine = self.state.engine.clone();
        let grace = self.state.cfg.shutdown_grace;
        let app = router(self.state);
        let (drained_tx, drained_rx) = tokio::sync::oneshot::channel();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: finishing running requests (grace {grace:?})");
            // The engine drains on its own thread; axum meanwhile stops accepting and waits
            // for open responses, which end as their rows finish or are cancelled.
            let e = engine.clone();
            let h = tokio::task::spawn_blocking(move || e.shutdown(grace));
            let _ = drained_tx.send(h);
        };
        axum::serve(self.listener, app)
            .with_graceful_shutdown(signal)
            .await
            .map_err(|source| ServeError::Io { addr, source })?;
        if let Ok(h) = drained_rx.await {
            let _ = h.await;
        }
        Ok(())
    }
}

/// The runtime the server runs on when the caller has none.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, ServeError> {
    tokio::runtime::Builder::new_multi_thread()
        // HTTP handling is light; the engine thread and candle's pool do the compute.
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| ServeError::Io {
            addr: "tokio runtime".into(),
            source,
        })
}

/// Binds and serves on a runtime of its own until SIGTERM or Ctrl-C, calling `on_bound` with
/// the address once it listens (for callers without an async runtime, like the CLI).
pub fn serve_until_signal(
    lm: Arc<LoadedModel>,
    cfg: ServeConfig,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    runtime()?.block_on(async move {
        let server = Server::bind(lm, cfg).await?;
        on_bound(server.local_addr());
        server.run(shutdown_signal()).await
    })
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(routes::generation::chat))
        .route("/v1/completions", post(routes::generation::completions))
        .route("/v1/models", get(routes::admin::models))
        .route(
            "/v1/adapters",
            post(routes::admin::load_adapter).get(routes::admin::list_adapters),
        )
        .route("/v1/adapters/{name}", delete(routes::admin::unload_adapter))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    let app = Router::new()
        .merge(v1)
        .route("/health", get(routes::admin::health))
        .route("/metrics", get(routes::admin::metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(DefaultBodyLimit::max(state.cfg.max_body_bytes))
        .with_state(state);
    // `Router::layer` wraps each route's handlers inside the method router, which makes the
    // 405 and its Allow header itself; only a router around the whole app sees that answer.
    Router::new()
        .fallback_service(app)
        .layer(middleware::from_fn(json_errors))
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

/// Gives the error answers axum makes itself (405 for a wrong method, with an empty body;
/// plain-text rejections such as a path segment that is not UTF-8) the OpenAI error body
/// every other error has, so clients can parse every failure the same way.
async fn json_errors(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let r = next.run(req).await;
    let status = r.status();
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return r;
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        let allow = r.headers().get(header::ALLOW).cloned();
        let allowed = allow
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(',').map(str::trim).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        let mut out = ApiError::new(
            status,
            "invalid_request_error",
            "method_not_allowed",
            format!("{method} {path} is not allowed; this route takes {allowed}"),
        )
        .into_response();
        if let Some(a) = allow {
            out.headers_mut().insert(header::ALLOW, a);
        }
        return out;
    }
    // axum's rejections are one short line of text; cap the read in case one is not.
    let text = axum::body::to_bytes(r.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().replace('\n', " "))
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let (kind, code) = if status.is_server_error() {
        ("server_error", "internal_error")
    } else {
        ("invalid_request_error", "invalid_request")
    };
    ApiError::new(status, kind, code, format!("{method} {path}: {message}")).into_response()
}

/// 401 unless the request carries the configured key.
async fn require_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.cfg.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
                "missing or wrong API key: send `Authorization: Bearer <key>`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Compares without an early exit, so response time does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn count_requests(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let endpoint = match path.as_str() {
        p if p.starts_with("/v1/adapters") => "/v1/adapters",
        "/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/health" | "/metrics" => &path,
        _ => "other",
    }
    .to_string();
    let r = next.run(req).await;
    st.metrics.request(&endpoint, r.status().as_u16());
    r
}
