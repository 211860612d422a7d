//! The REST API on `HATCH_HTTP_ADDR`: VMs, snapshots, routes, images. Every call
//! but `/healthz` needs `Authorization: Bearer <key>` or `X-API-Key: <key>`.
//! Errors become responses in one place ([`ApiError`]), always `{"error": "..."}`.

mod auth;

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{error, info};

pub use auth::{ensure_admin_key, hash_key};

use crate::manager::{CreateRoute, CreateVm, Manager, ManagerError};

#[derive(Clone)]
pub struct AppState {
    pub mgr: Arc<Manager>,
}

/// The caller, resolved from the API key.
#[derive(Clone, Debug)]
pub struct User(pub String);

/// The API's one error type.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        let status = match &e {
            ManagerError::NotFound => StatusCode::NOT_FOUND,
            ManagerError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ManagerError::Conflict(_) => StatusCode::CONFLICT,
            ManagerError::Quota(_) => StatusCode::FORBIDDEN,
            ManagerError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ManagerError::Vmm(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ManagerError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if let ManagerError::Internal(msg) = &e {
            // Details go to the log; the client gets a short message.
            error!(error = %msg, "internal error");
            return ApiError(status, "internal error".into());
        }
        ApiError(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Decodes a JSON body strictly (unknown fields refused); an empty body is `{}`.
fn decode<T: DeserializeOwned + Default>(body: &Bytes) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

pub fn router(state: AppState) -> Router {
    let authed = Router::new()
        .route("/vms", post(create_vm).get(list_vms))
        .route("/vms/{id}", get(get_vm).delete(delete_vm))
        .route("/vms/{id}/stop", post(stop_vm))
        .route("/vms/{id}/start", post(start_vm))
        .route("/vms/{id}/snapshot", post(snapshot_vm))
        .route("/vms/{id}/restore", post(restore_vm))
        .route("/vms/{id}/snapshots", get(list_snapshots))
        .route("/vms/{id}/events", get(list_events))
        .route("/vms/{id}/routes", post(create_route).get(list_routes))
        .route("/routes/{id}", delete(delete_route))
        .route("/images", get(list_images))
        .route("/images/{id}", get(get_image))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(authed)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let t0 = std::time::Instant::now();
    let resp = next.run(req).await;
    info!(
        %method,
        path,
        status = resp.status().as_u16(),
        duration_ms = t0.elapsed().as_millis() as u64,
        "api request"
    );
    resp
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "not found".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into())
}

async fn healthz(State(s): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    let (vms, routes) = s.mgr.counts().await?;
    Ok(Json(json!({
        "status": "ok",
        "vm_count": vms,
        "route_count": routes,
        "hypervisor": s.mgr.hypervisor_name(),
    })))
}

async fn create_vm(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let req: CreateVm = decode(&body)?;
    let vm = s.mgr.create_vm(&u.0, req).await?;
    Ok((StatusCode::CREATED, Json(vm)))
}

async fn list_vms(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.mgr.list_vms(&u.0).await?))
}

async fn get_vm(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.mgr.get_vm(&u.0, &id).await?))
}

async fn delete_vm(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    s.mgr.delete_vm(&u.0, &id).await?;
    Ok(Json(json!({ "status": "deleted" })))
}

async fn stop_vm(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.mgr.stop_vm(&u.0, &id).await?))
}

async fn start_vm(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.mgr.start_vm(&u.0, &id).await?))
}

async fn snapshot_vm(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok((
        StatusCode::CREATED,
        Json(s.mgr.snapshot_vm(&u.0, &id).await?),
    ))
}

async fn restore_vm(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.mgr.restore_vm(&u.0, &id).await?))
}

async fn list_snapshots(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.mgr.list_snapshots(&u.0, &id).await?))
}

async fn list_events(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.mgr.list_events(&u.0, &id).await?))
}

async fn create_route(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let req: CreateRoute = decode(&body)?;
    let route = s.mgr.create_route(&u.0, &id, req).await?;
    Ok((StatusCode::CREATED, Json(route)))
}

async fn list_routes(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.mgr.list_routes(&u.0, &id).await?))
}

async fn delete_route(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    s.mgr.delete_route(&u.0, &id).await?;
    Ok(Json(json!({ "status": "deleted" })))
}

async fn list_images(State(s): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.mgr.list_images().await?))
}

async fn get_image(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.mgr.get_image(&id).await?))
}
