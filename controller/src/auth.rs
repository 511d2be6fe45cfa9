//! Who may do what: bearer tokens with roles, checked in one place for gRPC and HTTP alike.
//!
//! Tokens are 32 random bytes shown once; the store keeps only their SHA-256. mTLS device identity
//! (a later change) plugs in here as another kind of [`Principal`].

use std::path::{Path, PathBuf};

use alki_shared::proto;
use base64::Engine as _;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

use crate::store::{Store, StoreError, TokenRecord};

const TOKEN_PREFIX: &str = "alki_";

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
    Push,
    Agent,
}

impl Role {
    pub fn from_proto(role: proto::Role) -> Option<Role> {
        match role {
            proto::Role::Unspecified => None,
            proto::Role::Viewer => Some(Role::Viewer),
            proto::Role::Operator => Some(Role::Operator),
            proto::Role::Admin => Some(Role::Admin),
            proto::Role::Push => Some(Role::Push),
            proto::Role::Agent => Some(Role::Agent),
        }
    }

    pub fn to_proto(self) -> proto::Role {
        match self {
            Role::Viewer => proto::Role::Viewer,
            Role::Operator => proto::Role::Operator,
            Role::Admin => proto::Role::Admin,
            Role::Push => proto::Role::Push,
            Role::Agent => proto::Role::Agent,
        }
    }

    /// The one table of permissions.
    pub fn allows(self, action: Action) -> bool {
        use Action::*;
        match self {
            Role::Admin => true,
            Role::Operator => matches!(action, ReadFleet | WriteFleet | RegistryRead | RegistryWrite),
            Role::Viewer => matches!(action, ReadFleet | RegistryRead),
            Role::Push => matches!(action, RegistryRead | RegistryWrite),
            Role::Agent => matches!(action, AgentSession | RegistryRead),
        }
    }
}

/// What a caller wants to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    ReadFleet,
    WriteFleet,
    ManageTokens,
    RegistryRead,
    RegistryWrite,
    AgentSession,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials: send 'authorization: Bearer <token>' (alkictl reads --token or ALKI_TOKEN)")]
    Missing,
    #[error("the credentials are not a valid token of this controller")]
    Invalid,
    #[error("token {name:?} has role {role:?}, which may not {action:?}")]
    Forbidden { name: String, role: Role, action: Action },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks credentials against the store. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    store: Store,
}

impl Authenticator {
    pub fn new(store: Store) -> Authenticator {
        Authenticator { store }
    }

    /// Authenticates an `Authorization` header value (`Bearer <token>`, or `Basic` with the token as the
    /// password, which is what registry clients send) and checks the role allows `action`.
    pub fn authorize(&self, authorization: Option<&str>, action: Action) -> Result<Principal, AuthError> {
        let token = authorization.and_then(token_from_header).ok_or(AuthError::Missing)?;
        let record = self.store.token(&hash_token(&token))?.ok_or(AuthError::Invalid)?;
        if !record.role.allows(action) {
            return Err(AuthError::Forbidden { name: record.name, role: record.role, action });
        }
        Ok(Principal { name: record.name, role: record.role })
    }

    /// Makes a new token, stores its hash, and returns the secret (shown once).
    pub fn create_token(&self, name: &str, role: Role) -> Result<String, StoreError> {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let token = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
        let record = TokenRecord { name: name.to_owned(), role, created_unix_ms: crate::now_unix_ms() };
        self.store.put_token(&hash_token(&token), &record)?;
        Ok(token)
    }

    /// On a controller's first start (no tokens yet), creates an admin token and writes it to
    /// `<data_dir>/admin.token` (mode 0600) for the operator to pick up. Returns the file's path.
    pub fn bootstrap_admin(&self, data_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
        if self.store.token_count()? > 0 {
            return Ok(None);
        }
        let token = self.create_token("bootstrap-admin", Role::Admin)?;
        let path = data_dir.join("admin.token");
        alki_shared::fsutil::write_atomic(&path, format!("{token}\n").as_bytes())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(Some(path))
    }
}

fn hash_token(token: &str) -> String {
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
        let push = auth.create_token("ci", Role::Push).expect("token");
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
