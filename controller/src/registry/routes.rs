//! The `/v2/` HTTP routes: authentication, path parsing (names may contain slashes, so one wildcard
//! route splits the tail itself), and handlers that stream bodies between the network and the blob store.

use std::collections::HashMap;
use std::sync::Arc;

use alki_shared::digest::Digest;
use alki_shared::oci::{MEDIA_TYPE_IMAGE_INDEX, Manifest, ManifestError};
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use futures::StreamExt as _;
use http::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use http::{HeaderMap, HeaderValue, StatusCode};
use tracing::Instrument as _;
use uuid::Uuid;

use super::access::{self, FleetView, Reach};
use super::blobs::{Partial, read_ahead};
use super::error::ApiError;
use super::index::{BlobUnlink, ManifestDelete, ManifestPut, ManifestRecord};
use super::names::{self, Reference, ReferenceError};
use super::range::{ByteRange, parse_content_range, parse_range, upload_range};
use super::uploads::{Lease, LeaseError};
use super::{Registry, RegistryError};
use crate::auth::{Action, Authenticator, Principal};

/// Request bodies go to disk in batches of this many bytes (one blocking write and hash per batch).
const RECEIVE_BUFFER: usize = 1 << 20;

const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";
const DOCKER_UPLOAD_UUID: &str = "docker-upload-uuid";
const LOCATION: &str = "location";

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    auth: Authenticator,
    fleet: Arc<dyn FleetView>,
}

/// The `/v2/` routes, with authentication: reads need Action::RegistryRead, writes Action::RegistryWrite;
/// and the admin route `POST /api/v1/registry/gc[?grace_secs=N]` (Action::ManageTokens), which collects
/// garbage now and answers the [`super::GcReport`] as JSON.
/// Each request is also held to the caller's repository scope and the rollouts' pins ([`super::access`]).
/// Also starts the registry's upload cleanup task ([`Registry::spawn_cleanup`]) when called in a runtime.
pub fn router(registry: Arc<Registry>, auth: Authenticator, fleet: Arc<dyn FleetView>) -> Router {
    registry.spawn_cleanup();
    Router::new()
        .route("/v2", get(root))
        .route("/v2/", get(root))
        .route("/v2/{*rest}", any(dispatch))
        .route("/api/v1/registry/gc", post(collect_garbage))
        .layer(DefaultBodyLimit::disable())
        .with_state(AppState { registry, auth, fleet })
}

/// `GET /v2/`: tells clients this is a registry and whether their credentials work.
async fn root(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let response = match authorize(&state, &headers, Action::RegistryRead).await {
        Ok(_) => respond(StatusCode::OK, vec![(CONTENT_TYPE.as_str(), "application/json".into())], Body::from("{}"))
            .unwrap_or_else(IntoResponse::into_response),
        Err(e) => e.into_response(),
    };
    with_api_version(response)
}

/// `POST /api/v1/registry/gc[?grace_secs=N]`: runs a garbage collection now (admin only).
async fn collect_garbage(State(state): State<AppState>, headers: HeaderMap, uri: http::Uri) -> Response {
    let span = tracing::info_span!("registry_gc", principal = tracing::field::Empty);
    async move {
        authorize(&state, &headers, Action::ManageTokens).await?;
        let query: HashMap<String, String> = Query::try_from_uri(&uri).map(|q| q.0).unwrap_or_default();
        let grace = match query.get("grace_secs") {
            None => state.registry.config.gc_grace,
            Some(secs) => std::time::Duration::from_secs(secs.parse().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "UNSUPPORTED",
                    format!("grace_secs={secs:?} is not a whole number of seconds"),
                )
            })?),
        };
        let registry = state.registry.clone();
        let report = tokio::task::spawn_blocking(move || registry.gc(grace))
            .await
            .map_err(|e| ApiError::internal(format!("garbage collection task failed: {e}")))??;
        tracing::info!(
            grace_secs = report.grace_secs,
            blobs_deleted = report.blobs_deleted,
            bytes_freed = report.bytes_freed,
            "Registry garbage collection ran on request."
        );
        let body = serde_json::to_string(&report).map_err(ApiError::internal)?;
        respond(StatusCode::OK, vec![(CONTENT_TYPE.as_str(), "application/json".into())], Body::from(body))
    }
    .instrument(span)
    .await
    .unwrap_or_else(IntoResponse::into_response)
}

async fn dispatch(State(state): State<AppState>, request: Request) -> Response {
    let span = tracing::info_span!(
        "registry",
        method = %request.method(),
        repository = tracing::field::Empty,
        digest = tracing::field::Empty,
        principal = tracing::field::Empty,
    );
    let response = handle(state, request).instrument(span).await.unwrap_or_else(IntoResponse::into_response);
    with_api_version(response)
}

async fn handle(state: AppState, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let method = parts.method.as_str();
    let action = if matches!(method, "GET" | "HEAD") { Action::RegistryRead } else { Action::RegistryWrite };
    let principal = authorize(&state, &parts.headers, action).await?;
    let route = Route::parse(parts.uri.path().strip_prefix("/v2/").unwrap_or_default())?;
    tracing::Span::current().record("repository", route.name());
    let query: HashMap<String, String> = Query::try_from_uri(&parts.uri).map(|q| q.0).unwrap_or_default();
    check_reach(&state, principal, &route, method, &query).await?;
    let headers = &parts.headers;
    let registry = state.registry;
    match (route, method) {
        (Route::Blob { name, digest }, "GET" | "HEAD") => {
            get_blob(&registry, &name, &digest, headers, method == "HEAD").await
        }
        (Route::Blob { name, digest }, "DELETE") => delete_blob(&registry, &name, &digest).await,
        (Route::UploadStart { name }, "POST") => start_upload(&registry, &name, &query, headers, body).await,
        (Route::Upload { name, id }, "GET") => upload_status(&registry, &name, &id),
        (Route::Upload { name, id }, "PATCH") => patch_upload(&registry, &name, &id, headers, body).await,
        (Route::Upload { name, id }, "PUT") => close_upload(&registry, &name, &id, &query, headers, body).await,
        (Route::Upload { name, id }, "DELETE") => cancel_upload(&registry, &name, &id).await,
        (Route::Manifest { name, reference }, "GET" | "HEAD") => {
            get_manifest(&registry, &name, &reference, method == "HEAD").await
        }
        (Route::Manifest { name, reference }, "PUT") => put_manifest(&registry, &name, &reference, headers, body).await,
        (Route::Manifest { name, reference }, "DELETE") => delete_manifest(&registry, &name, &reference).await,
        (Route::Tags { name }, "GET") => list_tags(&registry, &name, &query).await,
        (Route::Referrers { name, digest }, "GET") => referrers(&registry, &name, &digest, &query).await,
        (_, method) => Err(ApiError::unsupported(format!("{method} is not supported on this registry path"))),
    }
}

/// Holds the request to the caller's scope and the rollouts' pins, on a blocking thread (store reads).
async fn check_reach(
    state: &AppState,
    principal: Principal,
    route: &Route,
    method: &str,
    query: &HashMap<String, String>,
) -> Result<(), ApiError> {
    let repository = route.name().to_owned();
    let mount_from = match route {
        Route::UploadStart { .. } => query.get("from").cloned(),
        _ => None,
    };
    let deletes = match route {
        Route::Manifest { reference, .. } if method == "DELETE" => Some(parse_reference(reference)?),
        _ => None,
    };
    let force = query.get("force").is_some_and(|f| f == "true");
    if !principal.device && deletes.is_none() {
        // A token's patterns and no pins to consult: decided here, without a blocking hop on every chunk
        // of a push.
        let reach = Reach { repository: &repository, mount_from: mount_from.as_deref(), deletes: None, force };
        return access::check(&access::NoFleet, &principal, &reach, |_| None);
    }
    let (fleet, registry) = (state.fleet.clone(), state.registry.clone());
    tokio::task::spawn_blocking(move || {
        let reach =
            Reach { repository: &repository, mount_from: mount_from.as_deref(), deletes: deletes.as_ref(), force };
        let tag = |tag: &str| registry.resolve(&repository, tag).ok().flatten().map(|m| m.digest);
        access::check(fleet.as_ref(), &principal, &reach, tag)
    })
    .await
    .map_err(|e| ApiError::internal(format!("access check failed: {e}")))?
}

/// Authenticates on a blocking thread (the token lookup reads the store).
async fn authorize(state: &AppState, headers: &HeaderMap, action: Action) -> Result<Principal, ApiError> {
    let header = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let auth = state.auth.clone();
    tokio::task::spawn_blocking(move || auth.authorize(header.as_deref(), action))
        .await
        .map_err(|e| ApiError::internal(format!("credential check failed: {e}")))?
        .inspect(|principal| {
            tracing::Span::current().record("principal", principal.name.as_str());
        })
        .map_err(ApiError::from)
}

/// Where a request under `/v2/` goes. `name` is a validated repository name.
#[derive(Debug, PartialEq)]
enum Route {
    Blob { name: String, digest: String },
    UploadStart { name: String },
    Upload { name: String, id: String },
    Manifest { name: String, reference: String },
    Tags { name: String },
    Referrers { name: String, digest: String },
}

impl Route {
    /// Splits `<name>/<endpoint>` from the right, since names may contain slashes. Each segment is
    /// percent-decoded first (`sha256%3A...` is `sha256:...`); an encoded `/` stays inside its segment,
    /// where no name component, tag or digest may contain one.
    fn parse(path: &str) -> Result<Route, ApiError> {
        let decoded = path
            .split('/')
            .map(|segment| {
                percent_decode(segment).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "NAME_INVALID",
                        format!("path segment {segment:?} has malformed percent-encoding or is not UTF-8"),
                    )
                })
            })
            .collect::<Result<Vec<String>, ApiError>>()?;
        let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
        let route = match segments.as_slice() {
            [name @ .., "blobs", "uploads", ""] | [name @ .., "blobs", "uploads"] => {
                Route::UploadStart { name: name_of(name)? }
            }
            [name @ .., "blobs", "uploads", id] => Route::Upload { name: name_of(name)?, id: (*id).to_owned() },
            [name @ .., "blobs", digest] => Route::Blob { name: name_of(name)?, digest: (*digest).to_owned() },
            [name @ .., "manifests", reference] => {
                Route::Manifest { name: name_of(name)?, reference: (*reference).to_owned() }
            }
            [name @ .., "tags", "list"] => Route::Tags { name: name_of(name)? },
            [name @ .., "referrers", digest] => Route::Referrers { name: name_of(name)?, digest: (*digest).to_owned() },
            _ => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "UNSUPPORTED",
                    format!("no registry endpoint at /v2/{path}"),
                ));
            }
        };
        Ok(route)
    }

    fn name(&self) -> &str {
        match self {
            Route::Blob { name, .. }
            | Route::UploadStart { name }
            | Route::Upload { name, .. }
            | Route::Manifest { name, .. }
            | Route::Tags { name }
            | Route::Referrers { name, .. } => name,
        }
    }
}

fn name_of(segments: &[&str]) -> Result<String, ApiError> {
    let name = segments.join("/");
    let valid = names::is_valid_name(&name) && !segments.iter().any(|s| s.contains('/'));
    if valid { Ok(name) } else { Err(name_invalid(&name)) }
}

/// Decodes `%XX` escapes in one path segment; `None` when an escape is malformed or the result is not UTF-8.
fn percent_decode(segment: &str) -> Option<String> {
    if !segment.contains('%') {
        return Some(segment.to_owned());
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn name_invalid(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "NAME_INVALID",
        format!(
            "repository name {name:?} is invalid: use lowercase letters and digits in /-separated components \
             joined by '.', '_', '__' or '-' (at most {} characters)",
            names::MAX_NAME_LEN
        ),
    )
}

// ---- blobs ----

async fn get_blob(
    registry: &Arc<Registry>,
    name: &str,
    digest: &str,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response, ApiError> {
    let digest = parse_digest(digest)?;
    if registry.blob_size(name, &digest).await?.is_none() {
        return Err(ApiError::blob_unknown(digest.as_str()));
    }
    // A client that finds a blob present may push a manifest referencing it next.
    registry.touch(&digest);
    let path = registry.store.path(&digest);
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::error!(path = %path.display(), "Blob is in the registry index but its file is missing.");
            return Err(ApiError::blob_unknown(digest.as_str()));
        }
        Err(source) => return Err(RegistryError::Io { path, source }.into()),
    };
    let size = file.metadata().await.map_err(|source| RegistryError::Io { path: path.clone(), source })?.len();
    let range = parse_range(headers.get(RANGE).and_then(|v| v.to_str().ok()), size);
    let mut out = vec![
        (DOCKER_CONTENT_DIGEST, digest.to_string()),
        ("accept-ranges", "bytes".to_owned()),
        (CONTENT_TYPE.as_str(), "application/octet-stream".to_owned()),
    ];
    let (status, start, len) = match range {
        ByteRange::Full => (StatusCode::OK, 0, size),
        ByteRange::Partial { start, end } => {
            out.push((CONTENT_RANGE.as_str(), format!("bytes {start}-{end}/{size}")));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        ByteRange::Unsatisfiable => {
            out.retain(|(name, _)| *name != CONTENT_TYPE.as_str());
            out.push((CONTENT_RANGE.as_str(), format!("bytes */{size}")));
            out.push((CONTENT_LENGTH.as_str(), "0".to_owned()));
            return respond(StatusCode::RANGE_NOT_SATISFIABLE, out, Body::empty());
        }
    };
    out.push((CONTENT_LENGTH.as_str(), len.to_string()));
    if head {
        return respond(status, out, Body::empty());
    }
    respond(status, out, Body::from_stream(read_ahead(file.into_std().await, start, len)))
}

async fn delete_blob(registry: &Arc<Registry>, name: &str, digest: &str) -> Result<Response, ApiError> {
    let digest = parse_digest(digest)?;
    match registry.delete_blob(name, &digest).await? {
        BlobUnlink::Unknown => Err(ApiError::blob_unknown(digest.as_str())),
        BlobUnlink::IsManifest => Err(ApiError::new(
            StatusCode::CONFLICT,
            "DENIED",
            format!("{digest} is a manifest; delete it with DELETE /v2/{name}/manifests/{digest}"),
        )),
        BlobUnlink::Referenced(manifests) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "DENIED",
            format!(
                "blob {digest} is still referenced by {} manifest(s) in {name}; delete those manifests first",
                manifests.len()
            ),
        )
        .detail(serde_json::json!({ "manifests": manifests }))),
        BlobUnlink::Removed { orphaned } => {
            tracing::info!(file_deleted = orphaned, "Blob deleted.");
            respond(StatusCode::ACCEPTED, vec![(CONTENT_LENGTH.as_str(), "0".into())], Body::empty())
        }
    }
}

// ---- uploads ----

async fn start_upload(
    registry: &Arc<Registry>,
    name: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if let Some(mount) = query.get("mount") {
        let digest = parse_digest(mount)?;
        let mounted = registry.blob_size(name, &digest).await?.is_some()
            || match query.get("from") {
                Some(from) if names::is_valid_name(from) => registry.mount_blob(&digest, from, name).await?,
                _ => false,
            };
        if mounted {
            registry.touch(&digest);
            tracing::info!(from = query.get("from").map(String::as_str), "Blob mounted.");
            return created_blob(name, &digest);
        }
    } else if let Some(digest) = query.get("digest") {
        let digest = parse_digest(digest)?;
        return monolithic_upload(registry, name, &digest, headers, body).await;
    }
    if registry.uploads.is_full() {
        return Err(too_many_uploads(registry));
    }
    let partial = Partial::create(registry.store.uploads_dir()).await?;
    let id = match registry.uploads.insert(name, partial) {
        Ok(id) => id,
        Err(partial) => {
            partial.discard().await;
            return Err(too_many_uploads(registry));
        }
    };
    tracing::debug!(upload = %id, "Upload started.");
    respond(StatusCode::ACCEPTED, upload_headers(name, id, 0), Body::empty())
}

/// `POST ...?digest=`: the whole blob in one request.
async fn monolithic_upload(
    registry: &Arc<Registry>,
    name: &str,
    digest: &Digest,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let max = registry.config.max_blob_bytes;
    check_declared_length(headers, 0, max)?;
    let _pushing = registry.pushing(name);
    let mut partial = Partial::create(registry.store.uploads_dir()).await?;
    receive(body, &mut partial, max).await?;
    finish_blob(registry, name, digest, partial).await
}

fn upload_status(registry: &Arc<Registry>, name: &str, id: &str) -> Result<Response, ApiError> {
    let id = parse_upload_id(id)?;
    let received = registry.uploads.status(id, name).map_err(|e| lease_error(e, name, id))?;
    respond(StatusCode::NO_CONTENT, upload_headers(name, id, received), Body::empty())
}

async fn patch_upload(
    registry: &Arc<Registry>,
    name: &str,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = parse_upload_id(id)?;
    let lease = registry.uploads.lease(id, name).map_err(|e| lease_error(e, name, id))?;
    let (lease, received) = receive_chunk(registry, name, lease, headers, body).await?;
    let total = lease.received();
    lease.release();
    tracing::debug!(upload = %id, received, total, "Upload chunk received.");
    respond(StatusCode::ACCEPTED, upload_headers(name, id, total), Body::empty())
}

async fn close_upload(
    registry: &Arc<Registry>,
    name: &str,
    id: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(digest) = query.get("digest") else {
        return Err(ApiError::digest_invalid("close an upload with PUT ...?digest=sha256:<hex of the whole blob>"));
    };
    let digest = parse_digest(digest)?;
    let id = parse_upload_id(id)?;
    let lease = registry.uploads.lease(id, name).map_err(|e| lease_error(e, name, id))?;
    let (lease, _) = receive_chunk(registry, name, lease, headers, body).await?;
    let Some(session) = lease.finish() else { return Err(ApiError::upload_unknown()) };
    finish_blob(registry, name, &digest, session.partial).await
}

async fn cancel_upload(registry: &Arc<Registry>, name: &str, id: &str) -> Result<Response, ApiError> {
    let id = parse_upload_id(id)?;
    let session = registry.uploads.remove(id, name).map_err(|e| lease_error(e, name, id))?;
    session.partial.discard().await;
    tracing::debug!(upload = %id, "Upload cancelled.");
    respond(StatusCode::NO_CONTENT, Vec::new(), Body::empty())
}

/// Appends a request body to a leased upload after checking its `Content-Range` continues the upload.
/// A chunk refused before any byte is written puts the upload back as it was; a failure while writing
/// ends the upload (the lease is dropped, which deletes its data).
async fn receive_chunk(
    registry: &Arc<Registry>,
    name: &str,
    mut lease: Lease,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Lease, u64), ApiError> {
    let max = registry.config.max_blob_bytes;
    let offset = lease.received();
    let expected = match check_chunk(headers, offset, max) {
        Ok(expected) => expected,
        Err(refused) => {
            let error = match refused {
                ChunkRefused::Range => range_invalid(name, lease.id, offset),
                ChunkRefused::TooLarge(e) => e,
            };
            lease.release();
            return Err(error);
        }
    };
    let Some(partial) = lease.partial() else { return Err(ApiError::upload_unknown()) };
    let received = receive(body, partial, max).await?;
    if let Some(expected) = expected
        && received != expected
    {
        return Err(ApiError::upload_broken(format!(
            "Content-Range announced {expected} bytes but the body had {received}; the upload was discarded, start again"
        )));
    }
    Ok((lease, received))
}

enum ChunkRefused {
    Range,
    TooLarge(ApiError),
}

fn check_chunk(headers: &HeaderMap, offset: u64, max: u64) -> Result<Option<u64>, ChunkRefused> {
    check_declared_length(headers, offset, max).map_err(ChunkRefused::TooLarge)?;
    let Some(value) = headers.get(CONTENT_RANGE) else { return Ok(None) };
    let (start, end) = value.to_str().ok().and_then(parse_content_range).ok_or(ChunkRefused::Range)?;
    if start != offset {
        return Err(ChunkRefused::Range);
    }
    Ok(Some(end - start + 1))
}

/// Closes a received blob: compare digests, then make it visible in the repository.
async fn finish_blob(
    registry: &Arc<Registry>,
    name: &str,
    digest: &Digest,
    partial: Partial,
) -> Result<Response, ApiError> {
    tracing::Span::current().record("digest", digest.as_str());
    let finished = partial.finish().await?;
    if finished.digest != *digest {
        let actual = finished.digest.clone();
        finished.discard().await;
        return Err(ApiError::digest_invalid(format!(
            "the uploaded content has digest {actual}, not {digest}; the upload was discarded"
        ))
        .detail(serde_json::json!({ "expected": digest, "actual": actual })));
    }
    let size = finished.size;
    registry.commit_blob(finished, name).await?;
    tracing::info!(size, "Blob stored.");
    created_blob(name, digest)
}

/// Streams a request body into `partial` in batches of about [`RECEIVE_BUFFER`] bytes (the body's own
/// chunks, not copied); returns the bytes received.
async fn receive(body: Body, partial: &mut Partial, max: u64) -> Result<u64, ApiError> {
    let start = partial.received();
    let mut stream = body.into_data_stream();
    let mut batch = Vec::with_capacity(64);
    let mut batched = 0usize;
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::upload_broken(format!("the request body broke off: {e}")))?;
        received += chunk.len() as u64;
        if start + received > max {
            return Err(ApiError::too_large("the blob", max));
        }
        batched += chunk.len();
        batch.push(chunk);
        if batched >= RECEIVE_BUFFER {
            batch = partial.append(batch).await?;
            batched = 0;
        }
    }
    if !batch.is_empty() {
        partial.append(batch).await?;
    }
    Ok(received)
}

fn check_declared_length(headers: &HeaderMap, already: u64, max: u64) -> Result<(), ApiError> {
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if already.saturating_add(len) > max => Err(ApiError::too_large("the blob", max)),
        _ => Ok(()),
    }
}

fn upload_headers(name: &str, id: Uuid, received: u64) -> Vec<(&'static str, String)> {
    vec![
        (LOCATION, format!("/v2/{name}/blobs/uploads/{id}")),
        (DOCKER_UPLOAD_UUID, id.to_string()),
        (RANGE.as_str(), upload_range(received)),
        (CONTENT_LENGTH.as_str(), "0".into()),
    ]
}

fn created_blob(name: &str, digest: &Digest) -> Result<Response, ApiError> {
    respond(
        StatusCode::CREATED,
        vec![
            (LOCATION, format!("/v2/{name}/blobs/{digest}")),
            (DOCKER_CONTENT_DIGEST, digest.to_string()),
            (CONTENT_LENGTH.as_str(), "0".into()),
        ],
        Body::empty(),
    )
}

fn parse_upload_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::upload_unknown())
}

fn lease_error(error: LeaseError, name: &str, id: Uuid) -> ApiError {
    match error {
        LeaseError::Unknown => ApiError::upload_unknown(),
        LeaseError::Busy { offset } => range_invalid(name, id, offset),
    }
}

/// 416 for a chunk that does not continue the upload (or arrives while another is being written).
fn range_invalid(name: &str, id: Uuid, offset: u64) -> ApiError {
    ApiError::new(
        StatusCode::RANGE_NOT_SATISFIABLE,
        "BLOB_UPLOAD_INVALID",
        format!("the chunk must start at byte {offset} of the upload (and chunks must not be sent concurrently)"),
    )
    .header(LOCATION, format!("/v2/{name}/blobs/uploads/{id}"))
    .header("range", upload_range(offset))
    .header(DOCKER_UPLOAD_UUID, id.to_string())
}

fn too_many_uploads(registry: &Registry) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "TOOMANYREQUESTS",
        format!(
            "{} uploads are already open; finish or cancel some, or wait for abandoned ones to expire",
            registry.config.max_open_uploads
        ),
    )
}

// ---- manifests ----

async fn put_manifest(
    registry: &Arc<Registry>,
    name: &str,
    reference: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let reference = parse_reference(reference)?;
    let max = registry.config.max_manifest_bytes;
    check_declared_length(headers, 0, max as u64).map_err(|_| ApiError::too_large("the manifest", max as u64))?;
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let bytes = read_limited(body, max).await?;
    let manifest = Manifest::parse(&bytes, content_type).map_err(|e| match e {
        ManifestError::TooLarge(_) => ApiError::too_large("the manifest", max as u64),
        other => ApiError::manifest_invalid(other.to_string()),
    })?;
    let digest = Digest::of(&bytes);
    tracing::Span::current().record("digest", digest.as_str());
    if let Reference::Digest(expected) = &reference
        && *expected != digest
    {
        return Err(ApiError::digest_invalid(format!(
            "the manifest's digest is {digest}, not {expected} as the URL says"
        )));
    }
    let record = manifest_record(&manifest, content_type, bytes.len() as u64, registry.now());
    let subject = record.subject.clone();
    let is_index = matches!(manifest, Manifest::Index(_));
    let tag = match &reference {
        Reference::Tag(tag) => Some(tag.clone()),
        Reference::Digest(_) => None,
    };
    let size = record.size;
    match registry.put_manifest(name, &digest, bytes, record, is_index, tag.clone()).await? {
        ManifestPut::Missing(missing) => {
            let what = if is_index { "manifests" } else { "blobs" };
            Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "MANIFEST_BLOB_UNKNOWN",
                format!(
                    "the manifest references {} {what} not in repository {name} (first: {}); push them first",
                    missing.len(),
                    missing.first().map(Digest::as_str).unwrap_or_default()
                ),
            )
            .detail(serde_json::json!({ "missing": missing })))
        }
        ManifestPut::Stored => {
            tracing::info!(size, tag = tag.as_deref(), "Manifest stored.");
            let mut out = vec![
                (LOCATION, format!("/v2/{name}/manifests/{digest}")),
                (DOCKER_CONTENT_DIGEST, digest.to_string()),
                (CONTENT_LENGTH.as_str(), "0".into()),
            ];
            if let Some(subject) = subject {
                out.push(("oci-subject", subject.to_string()));
            }
            respond(StatusCode::CREATED, out, Body::empty())
        }
    }
}

fn manifest_record(
    manifest: &Manifest,
    content_type: Option<&str>,
    size: u64,
    pushed: alki_shared::clock::UnixMs,
) -> ManifestRecord {
    let declared = content_type.map(|c| c.split(';').next().unwrap_or(c).trim()).filter(|c| !c.is_empty());
    let field = match manifest {
        Manifest::Image(m) => m.media_type.as_deref(),
        Manifest::Index(i) => i.media_type.as_deref(),
    };
    let mut references: Vec<Digest> = Vec::new();
    for descriptor in manifest.references() {
        if !references.contains(&descriptor.digest) {
            references.push(descriptor.digest.clone());
        }
    }
    ManifestRecord {
        media_type: field.or(declared).unwrap_or(manifest.media_type()).to_owned(),
        artifact_type: manifest.artifact_type().map(str::to_owned),
        size,
        pushed_unix_ms: pushed.as_millis(),
        subject: manifest.subject().map(|s| s.digest.clone()),
        references,
        annotations: manifest.annotations().clone(),
    }
}

async fn read_limited(body: Body, max: usize) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::manifest_invalid(format!("the request body broke off: {e}")))?;
        if bytes.len() + chunk.len() > max {
            return Err(ApiError::too_large("the manifest", max as u64));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

async fn get_manifest(registry: &Arc<Registry>, name: &str, reference: &str, head: bool) -> Result<Response, ApiError> {
    let parsed = parse_reference(reference)?;
    let Some((digest, record)) = registry.manifest_record(name, &parsed).await? else {
        return Err(ApiError::manifest_unknown(reference));
    };
    tracing::Span::current().record("digest", digest.as_str());
    let mut out = vec![
        (CONTENT_TYPE.as_str(), record.media_type.clone()),
        (DOCKER_CONTENT_DIGEST, digest.to_string()),
        (CONTENT_LENGTH.as_str(), record.size.to_string()),
    ];
    if head {
        return respond(StatusCode::OK, out, Body::empty());
    }
    let path = registry.store.path(&digest);
    let bytes = match tokio::fs::read(&path).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::error!(path = %path.display(), "Manifest is in the registry index but its file is missing.");
            return Err(ApiError::manifest_unknown(reference));
        }
        Err(source) => return Err(RegistryError::Io { path, source }.into()),
    };
    if Digest::of(&bytes) != digest {
        tracing::error!(path = %path.display(), "Manifest file does not match its digest; the blob store is corrupt.");
        return Err(RegistryError::Io { path, source: std::io::Error::other("content does not match digest") }.into());
    }
    out.retain(|(name, _)| *name != CONTENT_LENGTH.as_str());
    out.push((CONTENT_LENGTH.as_str(), bytes.len().to_string()));
    respond(StatusCode::OK, out, Body::from(bytes))
}

async fn delete_manifest(registry: &Arc<Registry>, name: &str, reference: &str) -> Result<Response, ApiError> {
    let parsed = parse_reference(reference)?;
    if let Reference::Digest(digest) = &parsed {
        tracing::Span::current().record("digest", digest.as_str());
    }
    match registry.delete_manifest(name, &parsed).await? {
        ManifestDelete::Unknown => return Err(ApiError::manifest_unknown(reference)),
        ManifestDelete::Referenced(indexes) => {
            let named: Vec<&str> = indexes.iter().map(Digest::as_str).collect();
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "DENIED",
                format!(
                    "manifest {reference} is listed by image index {} in repository {name}; delete the index first",
                    named.join(", ")
                ),
            )
            .detail(serde_json::json!({ "indexes": indexes })));
        }
        ManifestDelete::Deleted { .. } => {}
    }
    match parsed {
        Reference::Tag(tag) => tracing::info!(%tag, "Tag deleted."),
        Reference::Digest(_) => tracing::info!("Manifest deleted."),
    }
    respond(StatusCode::ACCEPTED, vec![(CONTENT_LENGTH.as_str(), "0".into())], Body::empty())
}

async fn list_tags(
    registry: &Arc<Registry>,
    name: &str,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let n = match query.get("n") {
        None => None,
        Some(n) => Some(n.parse::<usize>().map_err(|_| {
            ApiError::new(StatusCode::BAD_REQUEST, "UNSUPPORTED", format!("n={n:?} is not a page size"))
        })?),
    };
    let last = query.get("last");
    let Some(tags) = registry.tags(name).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            format!("repository {name} holds no manifests"),
        ));
    };
    let after: Vec<String> = tags.into_iter().filter(|t| last.is_none_or(|l| t.as_str() > l.as_str())).collect();
    let (page, more) = match n {
        Some(n) if n < after.len() => (&after[..n], true),
        _ => (&after[..], false),
    };
    let mut out = vec![(CONTENT_TYPE.as_str(), "application/json".to_owned())];
    if let (true, Some(n), Some(last)) = (more, n, page.last()) {
        out.push(("link", format!("</v2/{name}/tags/list?n={n}&last={last}>; rel=\"next\"")));
    }
    let body = serde_json::json!({ "name": name, "tags": page }).to_string();
    respond(StatusCode::OK, out, Body::from(body))
}

async fn referrers(
    registry: &Arc<Registry>,
    name: &str,
    digest: &str,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let digest = parse_digest(digest)?;
    let filter = query.get("artifactType").filter(|f| !f.is_empty());
    let manifests: Vec<serde_json::Value> = registry
        .referrers(name, &digest)
        .await?
        .into_iter()
        .filter(|(_, record)| filter.is_none_or(|f| record.artifact_type.as_deref() == Some(f.as_str())))
        .map(|(digest, record)| {
            let mut descriptor = serde_json::json!({
                "mediaType": record.media_type,
                "digest": digest,
                "size": record.size,
            });
            if let Some(artifact_type) = record.artifact_type {
                descriptor["artifactType"] = artifact_type.into();
            }
            if !record.annotations.is_empty() {
                descriptor["annotations"] = serde_json::json!(record.annotations);
            }
            descriptor
        })
        .collect();
    let body = serde_json::json!({ "schemaVersion": 2, "mediaType": MEDIA_TYPE_IMAGE_INDEX, "manifests": manifests });
    let mut out = vec![(CONTENT_TYPE.as_str(), MEDIA_TYPE_IMAGE_INDEX.to_owned())];
    if filter.is_some() {
        out.push(("oci-filters-applied", "artifactType".to_owned()));
    }
    respond(StatusCode::OK, out, Body::from(body.to_string()))
}

// ---- helpers ----

fn parse_digest(digest: &str) -> Result<Digest, ApiError> {
    let digest: Digest = digest.parse().map_err(|e| ApiError::digest_invalid(format!("{e}")))?;
    tracing::Span::current().record("digest", digest.as_str());
    Ok(digest)
}

fn parse_reference(reference: &str) -> Result<Reference, ApiError> {
    Reference::parse(reference).map_err(|e| match e {
        ReferenceError::Digest(e) => ApiError::digest_invalid(e.to_string()),
        ReferenceError::Tag(_) => ApiError::new(StatusCode::BAD_REQUEST, "TAG_INVALID", e.to_string()),
    })
}

fn respond(status: StatusCode, headers: Vec<(&'static str, String)>, body: Body) -> Result<Response, ApiError> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    for (name, value) in headers {
        let value = HeaderValue::try_from(value)
            .map_err(|_| ApiError::internal(format!("response header {name} would not be a valid header value")))?;
        response.headers_mut().insert(name, value);
    }
    Ok(response)
}

fn with_api_version(mut response: Response) -> Response {
    response.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_split_names_with_slashes_from_the_right() {
        let d = Digest::of(b"x");
        let parse = |p: &str| Route::parse(p).map_err(|e| e.code);
        assert_eq!(
            parse(&format!("acme/models/qwen/blobs/{d}")),
            Ok(Route::Blob { name: "acme/models/qwen".into(), digest: d.to_string() })
        );
        assert_eq!(parse("a/b/blobs/uploads/"), Ok(Route::UploadStart { name: "a/b".into() }));
        assert_eq!(parse("a/blobs/uploads"), Ok(Route::UploadStart { name: "a".into() }));
        assert_eq!(parse("a/blobs/uploads/xyz"), Ok(Route::Upload { name: "a".into(), id: "xyz".into() }));
        assert_eq!(
            parse("a/manifests/x/manifests/v1"),
            Ok(Route::Manifest { name: "a/manifests/x".into(), reference: "v1".into() })
        );
        assert_eq!(parse("a/tags/list"), Ok(Route::Tags { name: "a".into() }));
        assert_eq!(parse("a/referrers/sha256:1"), Ok(Route::Referrers { name: "a".into(), digest: "sha256:1".into() }));
        assert_eq!(parse("Bad/tags/list"), Err("NAME_INVALID"));
        assert_eq!(parse("blobs/x"), Err("NAME_INVALID"));
        assert_eq!(parse("a/whatever"), Err("UNSUPPORTED"));
    }

    #[test]
    fn path_segments_are_percent_decoded() {
        let d = Digest::of(b"x");
        let parse = |p: &str| Route::parse(p).map_err(|e| e.code);
        let encoded = d.as_str().replace(':', "%3A");
        assert_eq!(
            parse(&format!("acme/q%77en/blobs/{encoded}")),
            Ok(Route::Blob { name: "acme/qwen".into(), digest: d.to_string() })
        );
        assert_eq!(
            parse(&format!("acme/manifests/{}", d.as_str().replace(':', "%3a"))),
            Ok(Route::Manifest { name: "acme".into(), reference: d.to_string() })
        );
        assert_eq!(parse("a/%74ags/list"), Ok(Route::Tags { name: "a".into() }));
        assert_eq!(parse("acme%2Fqwen/tags/list"), Err("NAME_INVALID"), "an encoded slash is not a separator");
        assert_eq!(parse("acme/tags%2Flist"), Err("UNSUPPORTED"));
        assert_eq!(parse("ac%zzme/tags/list"), Err("NAME_INVALID"));
        assert_eq!(parse("ac%e/tags/list"), Err("NAME_INVALID"));
        assert_eq!(parse("ac%ff/tags/list"), Err("NAME_INVALID"), "not UTF-8");
    }
}
