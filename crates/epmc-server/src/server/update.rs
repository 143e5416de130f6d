//! The agent self-update routes on the HTTPS listener, serving what `epmc-server release
//! publish` put into the data directory's `releases/` folder ([`crate::release`]).
//!
//! - `GET /api/v1/update/manifest?target=TRIPLE` answers the newest release for that target
//!   as an [`epmc_proto::release::SignedManifest`]
//!   (`{"manifest": "<exact text>", "signature": "<hex>"}`), 404 when none is published.
//! - `GET /api/v1/update/binary/{version}/{target}` answers that release's binary, 404 when it
//!   is not published.
//!
//! The server holds no key: agents verify the signature with the public key they are
//! configured with, and the SHA-256 of what they download. A binary is read (and its size
//! checked against its manifest) once, then served from memory to every agent that asks, so
//! a fleet updating at once shares one copy; at most [`CACHED_BINARIES`] binaries are kept.
//! Values from the path and the query are validated before they touch the file system, so no
//! request can reach outside `releases/`. Neither route asks for a client certificate: what
//! they serve is public and signed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use epmc_proto::release::{MANIFEST_PATH, MAX_RELEASE_SIZE, ReleaseVersion, TargetTriple};
use serde::Deserialize;
use tokio::sync::OnceCell;

use crate::release::ReleaseStore;

/// Most release binaries kept in memory at once.
pub const CACHED_BINARIES: usize = 4;

type Key = (TargetTriple, ReleaseVersion);

struct Releases {
    store: ReleaseStore,
    cache: Mutex<HashMap<Key, Arc<OnceCell<Bytes>>>>,
}

type Refusal = (StatusCode, String);

fn internal(e: impl std::fmt::Display) -> Refusal {
    tracing::error!(error = %e, "serving a release failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error; see the server log".into(),
    )
}

#[derive(Deserialize)]
struct ManifestQuery {
    target: String,
}

async fn manifest(
    State(app): State<Arc<Releases>>,
    Query(q): Query<ManifestQuery>,
) -> Result<Response, Refusal> {
    let target =
        TargetTriple::new(q.target).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let store = app.store.clone();
    let found = {
        let target = target.clone();
        tokio::task::spawn_blocking(move || store.latest(&target))
            .await
            .map_err(internal)?
            .map_err(internal)?
    };
    match found {
        Some(signed) => {
            Ok(([(header::CACHE_CONTROL, "no-store")], axum::Json(signed)).into_response())
        }
        None => Err((
            StatusCode::NOT_FOUND,
            format!("no release is published for {target}"),
        )),
    }
}

async fn binary(
    State(app): State<Arc<Releases>>,
    Path((version, target)): Path<(String, String)>,
) -> Result<Response, Refusal> {
    let version: ReleaseVersion = version
        .parse()
        .map_err(|e: epmc_proto::release::ReleaseError| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let target = TargetTriple::new(target).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let not_found = || {
        (
            StatusCode::NOT_FOUND,
            format!("{target} {version} is not published"),
        )
    };
    let cell = {
        let mut cache = app
            .cache
            .lock()
            .map_err(|_| internal("cache lock poisoned"))?;
        let key = (target.clone(), version);
        if !cache.contains_key(&key) && cache.len() >= CACHED_BINARIES {
            cache.clear();
        }
        cache.entry(key).or_default().clone()
    };
    let store = app.store.clone();
    let loaded = cell
        .get_or_try_init(|| async {
            let target = target.clone();
            tokio::task::spawn_blocking(move || load(&store, &target, version))
                .await
                .map_err(|e| Load::Failed(e.to_string()))?
        })
        .await;
    let bytes = match loaded {
        Ok(b) => b.clone(),
        Err(Load::Missing) => {
            forget(&app, &target, version);
            return Err(not_found());
        }
        Err(Load::Failed(e)) => {
            forget(&app, &target, version);
            return Err(internal(e));
        }
    };
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        bytes,
    )
        .into_response())
}

fn forget(app: &Releases, target: &TargetTriple, version: ReleaseVersion) {
    if let Ok(mut cache) = app.cache.lock() {
        cache.remove(&(target.clone(), version));
    }
}

enum Load {
    Missing,
    Failed(String),
}

/// Reads a published binary and checks its size against its manifest. Its SHA-256 is the
/// agent's to check, against the signed manifest: the server is not trusted with that.
fn load(
    store: &ReleaseStore,
    target: &TargetTriple,
    version: ReleaseVersion,
) -> Result<Bytes, Load> {
    let (path, manifest) = store
        .binary(target, version)
        .map_err(|e| Load::Failed(e.to_string()))?
        .ok_or(Load::Missing)?;
    let len = std::fs::metadata(&path)
        .map_err(|e| Load::Failed(format!("{}: {e}", path.display())))?
        .len();
    if len != manifest.size() || len > MAX_RELEASE_SIZE {
        return Err(Load::Failed(format!(
            "{}: {len} bytes, its manifest says {}",
            path.display(),
            manifest.size()
        )));
    }
    let bytes =
        std::fs::read(&path).map_err(|e| Load::Failed(format!("{}: {e}", path.display())))?;
    if bytes.len() as u64 != manifest.size() {
        return Err(Load::Failed(format!(
            "{}: changed while being read",
            path.display()
        )));
    }
    Ok(Bytes::from(bytes))
}

/// The update routes over the releases folder `root` (`DATA/releases`).
pub(super) fn routes(root: PathBuf) -> Router {
    let app = Arc::new(Releases {
        store: ReleaseStore::new(root),
        cache: Mutex::new(HashMap::new()),
    });
    Router::new()
        .route(MANIFEST_PATH, get(manifest))
        .route("/api/v1/update/binary/{version}/{target}", get(binary))
        .with_state(app)
}
