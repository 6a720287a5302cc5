//! Models, adapters loaded and unloaded at run time, health and metrics.

use super::ApiJson;
use crate::error::ApiError;
use crate::{check_adapter_name, AppState};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// `GET /v1/models`: the base model, then every adapter (with the base as its parent).
pub async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    let base = &st.cfg.model_name;
    let mut data = vec![json!({
        "id": base, "object": "model", "created": st.created, "owned_by": "tern",
    })];
    for a in st.registry.list() {
        data.push(json!({
            "id": a.name, "object": "model", "created": st.created, "owned_by": "tern",
            "parent": base, "root": a.path,
        }));
    }
    Json(json!({ "object": "list", "data": data }))
}

/// `GET /v1/adapters`: what the registry holds.
pub async fn list_adapters(State(st): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = st
        .registry
        .list()
        .into_iter()
        .map(
            |a| json!({ "name": a.name, "path": a.path, "bytes": a.bytes, "resident": a.resident }),
        )
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

/// Body of `POST /v1/adapters`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadAdapter {
    name: String,
    path: String,
}

/// `POST /v1/adapters {name, path}`: loads (or reloads) an adapter from a local path.
/// Requests already running keep the version they started with.
pub async fn load_adapter(
    State(st): State<Arc<AppState>>,
    ApiJson(body): ApiJson<LoadAdapter>,
) -> Result<impl IntoResponse, ApiError> {
    check_adapter_name(&body.name, &st.cfg.model_name)
        .map_err(|m| ApiError::bad_request("invalid_adapter_name", m))?;
    let st2 = st.clone();
    let name = body.name.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        st2.registry
            .load(&body.name, std::path::Path::new(&body.path))
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            e.to_string(),
        )
    })?;
    st.metrics.adapter_load(loaded.is_ok());
    let a = loaded?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({ "name": name, "object": "adapter", "bytes": a.bytes(), "version": a.version() }),
        ),
    ))
}

/// `DELETE /v1/adapters/{name}`.
pub async fn unload_adapter(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    // The registry knows only adapters; its "unknown adapter, load it first" would mislead.
    if name == "base" || name == st.cfg.model_name {
        return Err(ApiError::bad_request(
            "invalid_adapter_name",
            format!("`{name}` is the base model, and the base model cannot be unloaded; DELETE /v1/adapters/NAME unloads an adapter"),
        ));
    }
    st.registry.unload(&name)?;
    Ok(Json(
        json!({ "name": name, "object": "adapter", "deleted": true }),
    ))
}

/// `GET /health`.
pub async fn health(State(st): State<Arc<AppState>>) -> Json<Value> {
    let s = st.engine.stats();
    Json(json!({
        "status": "ok", "queued": s.queued, "running": s.running,
        "completed": s.completed, "aborted": s.aborted,
    }))
}

/// `GET /metrics` (Prometheus text format).
pub async fn metrics(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.render(st.engine.stats()),
    )
}
