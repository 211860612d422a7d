//! API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`, checked against
//! SHA-256 hashes in the store. The plain key exists only in the caller's hands
//! and, for the first admin key, in `$HATCH_DATA_DIR/admin.key` (mode 0600).

use std::path::{Path, PathBuf};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::{ApiError, AppState, User};
use crate::manager::Manager;

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

pub(super) async fn require_key(
    State(s): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let headers = req.headers();
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let key = match auth {
        Some(v) => match v.strip_prefix("Bearer ").map(str::trim) {
            Some(k) if !k.is_empty() => k.to_string(),
            _ => return unauthorized("invalid authorization header"),
        },
        None => match headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            Some(k) => k.to_string(),
            None => return unauthorized("missing api key"),
        },
    };
    match s.mgr.authenticate(&hash_key(&key)).await {
        Ok(Some(user)) => {
            req.extensions_mut().insert(User(user));
            next.run(req).await
        }
        Ok(None) => unauthorized("invalid api key"),
        Err(e) => ApiError::from(e).into_response(),
    }
}

fn unauthorized(msg: &str) -> Response {
    ApiError(StatusCode::UNAUTHORIZED, msg.into()).into_response()
}

/// When the store holds no key, creates an admin key and writes it to
/// `data_dir/admin.key` (mode 0600). Returns the file's path when it did.
pub async fn ensure_admin_key(mgr: &Manager, data_dir: &Path) -> Result<Option<PathBuf>, String> {
    if mgr.key_count().await.map_err(|e| e.to_string())? > 0 {
        return Ok(None);
    }
    let key = format!("hatch_{}", crate::model::random_alnum(32));
    let path = data_dir.join("admin.key");
    write_private(&path, &format!("{key}\n"))
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    mgr.add_key("admin", &hash_key(&key))
        .await
        .map_err(|e| e.to_string())?;
    Ok(Some(path))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
