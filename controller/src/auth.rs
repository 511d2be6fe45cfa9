//! Who may do what: bearer tokens with roles, and the access tables of every gRPC method
//! ([`grpc_policy`]) and HTTP route ([`http_policy`]). The gate (`audit`) authenticates each call by
//! these tables before any handler runs; a gRPC handler only asks for the [`Principal`] the gate admitted,
//! so a method's required action is written in one place.
//!
//! Tokens are 32 random bytes shown once; the store keeps only their SHA-256. Enrolled devices present
//! the short-lived registry tokens `pki` signs, as role agent.

use std::path::{Path, PathBuf};

use alki_shared::clock::{self, SharedClock, UnixMs};
use alki_shared::proto;
use base64::Engine as _;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

pub use crate::roles::{Action, Role};
use crate::scope::RepoPattern;
use crate::store::{Store, StoreError, TokenRecord};

const TOKEN_PREFIX: &str = "alki_";

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// Authenticated as an enrolled device (its registry token) rather than by an operator token.
    pub device: bool,
    /// A push token's repository patterns (empty: every repository; see [`crate::scope`]).
    pub repositories: Vec<RepoPattern>,
}

impl Principal {
    /// How the audit log names it: `token:<name>` or `device:<id>`.
    pub fn actor(&self) -> String {
        if self.device { format!("device:{}", self.name) } else { format!("token:{}", self.name) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials: send 'authorization: Bearer <token>' (alkictl reads --token or ALKI_TOKEN)")]
    Missing,
    #[error("the credentials are not a valid token of this controller")]
    Invalid,
    #[error("token {name:?} was revoked; ask an admin for a new one (alkictl token create)")]
    Revoked { name: String },
    #[error("token {name:?} has role {role:?}, which may not {action:?}")]
    Forbidden { name: String, role: Role, action: Action },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks credentials against the store. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    store: Store,
    /// Verifies the short-lived registry tokens handed to enrolled devices (see `pki::Pki::registry_token`).
    device_tokens: Option<crate::pki::Pki>,
    /// When tokens are created and revoked, and whether a device's registry token has expired.
    clock: SharedClock,
}

impl Authenticator {
    pub fn new(store: Store) -> Authenticator {
        Authenticator { store, device_tokens: None, clock: clock::system() }
    }

    /// Reads time from `clock` instead of the system clock.
    pub fn with_clock(mut self, clock: SharedClock) -> Authenticator {
        self.clock = clock;
        self
    }

    /// Also accepts the registry tokens `pki` signs for devices, as role agent, while the device is not
    /// decommissioned.
    pub fn with_device_tokens(mut self, pki: crate::pki::Pki) -> Authenticator {
        self.device_tokens = Some(pki);
        self
    }

    /// Authenticates an `Authorization` header value (`Bearer <token>`, or `Basic` with the token as the
    /// password, which is what registry clients send) and checks the role allows `action`.
    pub fn authorize(&self, authorization: Option<&str>, action: Action) -> Result<Principal, AuthError> {
        let token = authorization.and_then(token_from_header).ok_or(AuthError::Missing)?;
        if let Some(pki) = &self.device_tokens
            && let Some(device_id) = pki.verify_registry_token(&token, self.clock.now().as_millis())
        {
            let live = self.store.device_identity(&device_id)?.is_some_and(|d| d.decommissioned_unix_ms.is_none());
            if !live {
                return Err(AuthError::Invalid);
            }
            let name = device_id.to_string();
            if !Role::Agent.allows(action) {
                return Err(AuthError::Forbidden { name, role: Role::Agent, action });
            }
            return Ok(Principal { name, role: Role::Agent, device: true, repositories: Vec::new() });
        }
        self.authorize_hash(&token_hash(&token), action)
    }

    /// Checks the operator token with this SHA-256 (what a console session keeps instead of the token)
    /// allows `action`.
    pub fn authorize_hash(&self, hash: &str, action: Action) -> Result<Principal, AuthError> {
        // Read on every request (no cache), so a revocation holds from the very next request.
        let record = self.store.token(hash)?.ok_or(AuthError::Invalid)?;
        if record.revoked_unix_ms.is_some() {
            return Err(AuthError::Revoked { name: record.name });
        }
        if !record.role.allows(action) {
            return Err(AuthError::Forbidden { name: record.name, role: record.role, action });
        }
        Ok(Principal { name: record.name, role: record.role, device: false, repositories: record.repositories })
    }

    /// Makes a new token, stores its hash, and returns the secret (shown once). A push token must name the
    /// repositories it may touch; other roles take none.
    pub fn create_token(&self, name: &str, role: Role, repositories: &[String]) -> Result<String, TokenError> {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let token = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
        check_token_name(name)?;
        if role != Role::Push && !repositories.is_empty() {
            return Err(TokenError::Scope(
                "only push tokens take repository patterns; operators and admins reach every repository".into(),
            ));
        }
        let repositories =
            RepoPattern::parse_all(repositories, role == Role::Push).map_err(|e| TokenError::Scope(e.to_string()))?;
        let created_unix_ms = self.clock.now();
        let record = TokenRecord { name: name.to_owned(), role, created_unix_ms, revoked_unix_ms: None, repositories };
        self.store.put_token(&token_hash(&token), &record)?;
        Ok(token)
    }

    /// On a controller's first start (no tokens yet), creates an admin token and writes it to
    /// `<data_dir>/admin.token` (mode 0600) for the operator to pick up. Returns the file's path.
    pub fn bootstrap_admin(&self, data_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
        if self.store.token_count()? > 0 {
            return Ok(None);
        }
        let token = self.create_token("bootstrap-admin", Role::Admin, &[])?;
        let path = data_dir.join("admin.token");
        alki_shared::fsutil::write_atomic(&path, format!("{token}\n").as_bytes())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(Some(path))
    }

    /// Every token (revoked ones included), oldest first.
    pub fn list_tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        let mut tokens: Vec<TokenInfo> =
            self.store.tokens()?.into_iter().map(|(hash, record)| TokenInfo::new(&hash, record)).collect();
        tokens.sort_by(|a, b| (a.record.created_unix_ms, &a.id).cmp(&(b.record.created_unix_ms, &b.id)));
        Ok(tokens)
    }

    /// Revokes the token with this id, or the one live token with this name. Idempotent for an id.
    pub fn revoke_token(&self, id_or_name: &str) -> Result<TokenInfo, TokenError> {
        let tokens = self.store.tokens()?;
        let by_id: Vec<_> = tokens.iter().filter(|(hash, _)| token_id(hash) == id_or_name).collect();
        let chosen: &(String, TokenRecord) = match by_id.as_slice() {
            [one] => one,
            _ => {
                let by_name: Vec<_> =
                    tokens.iter().filter(|(_, r)| r.name == id_or_name && r.revoked_unix_ms.is_none()).collect();
                match by_name.as_slice() {
                    [one] => one,
                    [] => return Err(TokenError::NotFound(id_or_name.to_owned())),
                    _ => return Err(TokenError::Ambiguous(id_or_name.to_owned(), by_name.len())),
                }
            }
        };
        let hash = chosen.0.clone();
        let record =
            self.store.revoke_token(&hash, self.clock.now())?.ok_or_else(|| TokenError::NotFound(hash.clone()))?;
        Ok(TokenInfo::new(&hash, record))
    }
}

/// Characters of a token's SHA-256 (hex) shown as its public id.
pub const TOKEN_ID_LEN: usize = 12;

/// Longest token name.
pub const MAX_TOKEN_NAME: usize = 128;

/// A token as listed: its public id and record, never the secret.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenInfo {
    pub id: String,
    pub record: TokenRecord,
}

impl TokenInfo {
    fn new(hash: &str, record: TokenRecord) -> TokenInfo {
        TokenInfo { id: token_id(hash).to_owned(), record }
    }

    pub fn to_proto(&self) -> proto::TokenInfo {
        proto::TokenInfo {
            id: self.id.clone(),
            name: self.record.name.clone(),
            role: self.record.role.to_proto() as i32,
            created_unix_ms: self.record.created_unix_ms.as_millis(),
            revoked_unix_ms: self.record.revoked_unix_ms.map_or(0, UnixMs::as_millis),
            repositories: self.record.repositories.iter().map(|p| p.as_str().to_owned()).collect(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "token name {0:?} is not allowed: use 1 to {MAX_TOKEN_NAME} characters of letters, digits, '.', '_', '-', '@' or ':'"
    )]
    BadName(String),
    #[error("no token has id or live name {0:?}; alkictl token list shows them")]
    NotFound(String),
    #[error("{1} live tokens are named {0:?}; revoke one by its id (alkictl token list)")]
    Ambiguous(String, usize),
    #[error("{0}")]
    Scope(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Who may call a gRPC method or HTTP route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone: the probes `/healthz` and `/readyz`.
    Public,
    /// Presents a bootstrap token in the request itself (Enroll); the handler checks it.
    BootstrapToken,
    /// An enrolled device by its mTLS certificate (or, with `--insecure-agent-tokens`, a bearer token
    /// allowing [`DEVICE_TOKEN_ACTION`]); the handler checks it, since only it sees the certificate and
    /// the Hello.
    Device,
    /// A bearer token whose role allows this.
    Token(Action),
    /// The web console's login (`POST /ui/login`): presents a token in its body, which the handler checks;
    /// limited per peer address like Enroll, so tokens cannot be guessed quickly through it.
    Login,
}

/// What a bearer token must allow to stand in for a device certificate ([`Access::Device`]), where
/// `--insecure-agent-tokens` admits one.
pub const DEVICE_TOKEN_ACTION: Action = Action::AgentSession;

/// A method's or route's access and whether it changes state (and so is audited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub access: Access,
    pub mutates: bool,
}

const fn read(action: Action) -> Policy {
    Policy { access: Access::Token(action), mutates: false }
}

const fn write(action: Action) -> Policy {
    Policy { access: Access::Token(action), mutates: true }
}

/// The one table of gRPC methods: the gate authenticates every call by it, and handlers read the
/// principal the gate admitted (`api::principal`) instead of naming an action again. A method missing
/// here is refused for everyone (and controller/tests/authz.rs, which enumerates the proto descriptors,
/// fails naming it).
pub fn grpc_policy(path: &str) -> Option<Policy> {
    use Action::*;
    // The standard health service is the gRPC twin of /healthz: load balancers and Kubernetes probes call it
    // without credentials, and it says only whether the controller serves.
    if matches!(path, "/grpc.health.v1.Health/Check" | "/grpc.health.v1.Health/Watch") {
        return Some(Policy { access: Access::Public, mutates: false });
    }
    // Reflection describes the API, not the fleet: any token may read it (grpcurl, Postman, dashboards).
    if path == "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        || path == "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    {
        return Some(read(ReadFleet));
    }
    let (service, method) = path.strip_prefix("/alki.v1.")?.split_once('/')?;
    Some(match (service, method) {
        ("AgentService", "Session") => Policy { access: Access::Device, mutates: false },
        ("EnrollmentService", "Enroll") => Policy { access: Access::BootstrapToken, mutates: true },
        ("EnrollmentService", "Renew") => Policy { access: Access::Device, mutates: true },
        (
            "FleetService",
            "ListDevices" | "GetDevice" | "ListBundles" | "GetRollout" | "ListRollouts" | "ListRolloutEvents"
            | "ListRolloutDevices",
        ) => read(ReadFleet),
        (
            "FleetService",
            "CreateRollout" | "PauseRollout" | "ResumeRollout" | "PromoteRollout" | "AbortRollout" | "RetryRollout"
            | "LabelDevice",
        ) => write(WriteFleet),
        ("FleetService", "CreateToken") => write(ManageTokens),
        ("AdminService", "ListTokens") => read(ManageTokens),
        ("AdminService", "RevokeToken") => write(ManageTokens),
        ("AdminService", "ListAudit") => read(ReadAudit),
        ("SecurityService", "CreateEnrollToken" | "RevokeEnrollToken") => write(ManageTokens),
        ("SecurityService", "ListEnrollTokens") => read(ManageTokens),
        ("SecurityService", "DecommissionDevice") => write(WriteFleet),
        ("InsightService", "RunBenchmark" | "Calibrate" | "Evaluate") => write(WriteFleet),
        ("InsightService", "ListBenchmarks" | "Compare" | "Recommend" | "ListEvaluations") => read(ReadFleet),
        ("EventService", "ListEvents" | "WatchEvents" | "WatchRollout" | "WatchDevices") => read(ReadFleet),
        // Operators see where deliveries stand (never a secret); only admins point events somewhere.
        ("EventService", "ListWebhooks") => read(WriteFleet),
        ("EventService", "AddWebhook" | "RemoveWebhook") => write(ManageWebhooks),
        ("EventService", "TestWebhook") => write(ManageWebhooks),
        // Logs and bundles change nothing, but they show what a device does and may hold users' traffic
        // details: operators and admins only (WriteFleet), and audited like changes (who read which device).
        ("DiagnosticsService", "DeviceLogs" | "SupportBundle" | "RestartRuntime" | "Reverify") => write(WriteFleet),
        _ => return None,
    })
}

/// The HTTP side's table, by path prefix so a new route is covered the moment it exists: the probes and the
/// console's files are public, its login is limited per peer; the registry reads with RegistryRead and writes with RegistryWrite; garbage collection is
/// admin; every other path (the dashboard API under /api/v1/ and anything added later) needs a viewer
/// token to read and an operator token to change anything.
pub fn http_policy(method: &http::Method, path: &str) -> Policy {
    use Action::*;
    let reads = matches!(*method, http::Method::GET | http::Method::HEAD);
    if reads && (matches!(path, "/" | "/healthz" | "/readyz") || is_console_asset(path)) {
        return Policy { access: Access::Public, mutates: false };
    }
    if path == "/ui/login" {
        // The handler audits the login under the token's name once it knows it.
        return Policy { access: Access::Login, mutates: false };
    }
    if path == "/ui/logout" {
        return read(ReadFleet);
    }
    if path == "/api/v1/registry/gc" {
        return write(ManageTokens);
    }
    if path == "/v2" || path.starts_with("/v2/") {
        if reads {
            return read(RegistryRead);
        }
        // Upload sessions (POST, PATCH) change nothing anyone can see until the closing PUT.
        return Policy {
            access: Access::Token(RegistryWrite),
            mutates: !matches!(*method, http::Method::POST | http::Method::PATCH),
        };
    }
    if reads { read(ReadFleet) } else { write(WriteFleet) }
}

/// The console's own files under `/ui/` (and `/ui` itself), which the login page needs before any login;
/// `/ui/session` is not one of them.
fn is_console_asset(path: &str) -> bool {
    path == "/ui" || (path.starts_with("/ui/") && path != "/ui/session")
}

fn check_token_name(name: &str) -> Result<(), TokenError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TOKEN_NAME
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | ':'));
    if ok { Ok(()) } else { Err(TokenError::BadName(name.chars().take(MAX_TOKEN_NAME).collect())) }
}

fn token_id(hash: &str) -> &str {
    hash.get(..TOKEN_ID_LEN).unwrap_or(hash)
}

/// The SHA-256 (hex) the store keys a token by.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn token_from_header(value: &str) -> Option<String> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (_user, password) = decoded.split_once(':')?;
        return Some(password.to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_authenticate_by_bearer_and_basic_and_roles_are_enforced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = Authenticator::new(Store::open(dir.path()).expect("store"));
        let push = auth.create_token("ci", Role::Push, &["acme/*".to_owned()]).expect("token");
        let bearer = format!("Bearer {push}");
        assert_eq!(auth.authorize(Some(&bearer), Action::RegistryWrite).expect("push").role, Role::Push);
        let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("ci:{push}")));
        assert!(auth.authorize(Some(&basic), Action::RegistryRead).is_ok());
        assert!(matches!(auth.authorize(Some(&bearer), Action::WriteFleet), Err(AuthError::Forbidden { .. })));
        assert!(matches!(auth.authorize(None, Action::ReadFleet), Err(AuthError::Missing)));
        assert!(matches!(auth.authorize(Some("Bearer alki_nope"), Action::ReadFleet), Err(AuthError::Invalid)));
    }

    #[test]
    fn bootstrap_writes_an_admin_token_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = Authenticator::new(Store::open(dir.path()).expect("store"));
        let path = auth.bootstrap_admin(dir.path()).expect("bootstrap").expect("first time");
        let token = std::fs::read_to_string(&path).expect("read");
        let header = format!("Bearer {}", token.trim());
        assert_eq!(auth.authorize(Some(&header), Action::ManageTokens).expect("admin").role, Role::Admin);
        assert!(auth.bootstrap_admin(dir.path()).expect("second").is_none());
    }
}
