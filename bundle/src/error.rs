//! The library's one error type: what happened, to what, and what to do. Wrapped errors are part of the
//! message (as in `alki_shared`), so a log line or `{}` shows the whole story.

use alki_shared::gguf::GgufError;
use alki_shared::oci::ManifestError;
use alki_shared::signing::KeyError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a local file failed.
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    /// The input, or the state found, is not usable; the message says what to do instead.
    #[error("{0}")]
    Refused(String),
    /// Bytes that do not match their digest: a corrupt layout or registry copy.
    #[error("{0}")]
    Corrupt(String),
    /// A file named as GGUF is not a usable one.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A signing key could not be read, decrypted or used.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A manifest or index that does not parse.
    #[error("{what}: {error}")]
    Manifest { what: String, error: ManifestError },
    /// A registry could not be reached, refused the credentials, or answered with an error.
    #[error("{}", .failure.describe(.registry, .detail))]
    Registry { registry: String, failure: RegistryFailure, detail: String },
    /// A bundle reference that does not parse.
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
    /// Encoding one of our own documents (a manifest, a config) as JSON.
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    /// Prefixes the message with what was being done (`uploading blob sha256:…`), keeping the kind. Errors
    /// that already name their subject (GGUF files, keys) stay as they are.
    pub fn during(self, doing: &str) -> Error {
        match self {
            Error::Io { what, error } => Error::Io { what: format!("{doing}: {what}"), error },
            Error::Refused(m) => Error::Refused(format!("{doing}: {m}")),
            Error::Corrupt(m) => Error::Corrupt(format!("{doing}: {m}")),
            Error::Manifest { what, error } => Error::Manifest { what: format!("{doing}: {what}"), error },
            Error::Registry { registry, failure, detail } => {
                Error::Registry { registry, failure, detail: format!("{doing}: {detail}") }
            }
            other => other,
        }
    }
}

/// Why a registry request failed, for callers that act on it (and for the message's advice).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegistryFailure {
    /// No connection: wrong address, nothing listening, or TLS not trusted.
    Unreachable,
    /// The registry refused the credentials.
    Unauthorized,
    /// Any other error answer.
    Other,
}

impl RegistryFailure {
    fn describe(self, registry: &str, detail: &str) -> String {
        match self {
            RegistryFailure::Unreachable => format!(
                "cannot reach the registry at {registry}: {detail}; is it (the controller) running at that address?"
            ),
            RegistryFailure::Unauthorized => format!(
                "the registry at {registry} refused the credentials: {detail}; pass a push or operator token (or \
                 the registry's own login)"
            ),
            RegistryFailure::Other => format!("registry {registry}: {detail}"),
        }
    }
}

/// Context for local I/O errors: `file.read(..).doing(|| format!("reading {}", path.display()))?`.
pub(crate) trait IoContext<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|error| Error::Io { what: what(), error })
    }
}

/// Context for manifests that do not parse.
pub(crate) trait ManifestContext<T> {
    fn parsing(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> ManifestContext<T> for std::result::Result<T, ManifestError> {
    fn parsing(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|error| Error::Manifest { what: what(), error })
    }
}

/// `Err(Error::Refused(..))` from a format string, like `anyhow::bail!`.
macro_rules! refuse {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Refused(format!($($arg)*)))
    };
}
pub(crate) use refuse;
