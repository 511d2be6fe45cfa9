//! Registry access for pulls: the OCI client (protocol per registry, the controller's CA), mirrors tried in
//! order before a registry with fallback to it, credentials sent to their exact host only, the settings the
//! access is built from (read again for every pull), and where a pull reads from ([`Source`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use alki_shared::digest::Digest;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::error::PullError;
use crate::config::RegistryCredentials;
use crate::identity::DeviceRegistryToken;
use crate::reference::BundleLocation;
use crate::trust::TrustStore;

/// The username sent with the token in Basic authentication.
const BASIC_USER: &str = "alki-agent";

/// Registry access for pulls: protocol per registry and the credentials for the embedded registry.
#[derive(Clone)]
pub struct RegistryAccess {
    client: Arc<Client>,
    embedded: String,
    token: Option<String>,
    /// The exact `host:port` the token is sent to: the registry the controller named for it, else `embedded`.
    token_registry: String,
    /// Mirrors per registry (`host:port`), tried in order before the registry itself.
    mirrors: BTreeMap<String, Vec<String>>,
    /// Basic credentials (username, password) per `host:port`, sent to that exact `host:port` only.
    credentials: BTreeMap<String, (String, String)>,
}

impl std::fmt::Debug for RegistryAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAccess").field("embedded", &self.embedded).finish_non_exhaustive()
    }
}

impl RegistryAccess {
    /// `plain_http`: registries (`host:port`) reached over HTTP. `embedded`: the registry used when a bundle
    /// names none. `token`: sent (Basic, user `alki-agent`) only to the embedded registry's exact `host:port`
    /// (or the one [`RegistryAccess::token_for`] names), never to another port of the same host.
    pub fn new(plain_http: Vec<String>, embedded: String, token: Option<String>) -> RegistryAccess {
        RegistryAccess::with_roots(plain_http, embedded, token, Vec::new())
    }

    /// [`RegistryAccess::new`], also trusting the PEM CA certificates in `roots` for HTTPS (the controller's CA,
    /// which signs its embedded registry's certificate).
    pub fn with_roots(
        plain_http: Vec<String>,
        embedded: String,
        token: Option<String>,
        roots: Vec<Vec<u8>>,
    ) -> RegistryAccess {
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain_http),
            extra_root_certificates: roots
                .into_iter()
                .map(|data| oci_client::client::Certificate {
                    encoding: oci_client::client::CertificateEncoding::Pem,
                    data,
                })
                .collect(),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            user_agent: concat!("alki-agent/", env!("CARGO_PKG_VERSION")),
            platform_resolver: None,
            ..Default::default()
        };
        RegistryAccess {
            client: Arc::new(Client::new(config)),
            token_registry: embedded.clone(),
            embedded,
            token,
            mirrors: Default::default(),
            credentials: Default::default(),
        }
    }

    /// Sends the token to `registry` (exactly that `host:port`) instead of the embedded registry.
    pub fn token_for(mut self, registry: String) -> RegistryAccess {
        self.token_registry = registry;
        self
    }

    /// Mirrors per registry (`host:port` to an ordered list of `host:port`), like containerd's hosts: pulls
    /// try them in order and fall back to the registry itself.
    pub fn with_mirrors(mut self, mirrors: BTreeMap<String, Vec<String>>) -> RegistryAccess {
        self.mirrors = mirrors;
        self
    }

    /// Basic credentials (username, password) per `host:port`; each is sent to that exact `host:port` only.
    /// They take precedence over the agent's token on the embedded registry.
    pub fn with_credentials(mut self, credentials: BTreeMap<String, (String, String)>) -> RegistryAccess {
        self.credentials = credentials;
        self
    }

    /// Where `bundle` is pulled from, in order: the mirrors configured for its registry, then the registry.
    pub fn endpoints(&self, bundle: &BundleLocation) -> Vec<String> {
        let origin = self.registry_of(bundle);
        let mut out: Vec<String> = Vec::new();
        for mirror in self.mirrors.get(origin).into_iter().flatten() {
            if mirror != origin && !out.contains(mirror) {
                out.push(mirror.clone());
            }
        }
        out.push(origin.to_owned());
        out
    }

    /// Runs `attempt` against each place `artifact` can be read from, in the order of
    /// [`RegistryAccess::endpoints`], moving on only while a failure is one another source may not have
    /// ([`PullError::may_try_another_source`]); the first success, or the failure that stopped it.
    pub async fn from_each_endpoint<A: Attempt>(
        &self,
        artifact: &BundleLocation,
        attempt: &mut A,
    ) -> Result<A::Output, PullError> {
        let endpoints = self.endpoints(artifact);
        let at = |endpoint: &String| BundleLocation { registry: endpoint.clone(), ..artifact.clone() };
        let Some((origin, mirrors)) = endpoints.split_last() else { return attempt.attempt(artifact).await };
        for (i, mirror) in mirrors.iter().enumerate() {
            match attempt.attempt(&at(mirror)).await {
                Err(error) if error.may_try_another_source() => {
                    let next = &endpoints[i + 1];
                    tracing::warn!(%error, source = %mirror, %next, "Pulling from a mirror failed; trying the next source.");
                }
                result => return result,
            }
        }
        attempt.attempt(&at(origin)).await
    }

    pub(super) fn client(&self) -> &Client {
        &self.client
    }

    /// The registry `bundle` names, or the embedded one when it names none.
    pub(super) fn registry_of<'a>(&'a self, bundle: &'a BundleLocation) -> &'a str {
        if bundle.registry.is_empty() { &self.embedded } else { &bundle.registry }
    }

    pub(super) fn reference(&self, bundle: &BundleLocation, digest: &Digest) -> Reference {
        Reference::with_digest(self.registry_of(bundle).to_owned(), bundle.repository.clone(), digest.to_string())
    }

    pub(super) fn auth(&self, bundle: &BundleLocation) -> RegistryAuth {
        let registry = self.registry_of(bundle);
        if let Some((username, password)) = self.credentials.get(registry) {
            return RegistryAuth::Basic(username.clone(), password.clone());
        }
        match &self.token {
            // A bundle naming no registry goes to the embedded one, which the operator configured.
            Some(token) if bundle.registry.is_empty() || bundle.registry == self.token_registry => {
                RegistryAuth::Basic(BASIC_USER.to_owned(), token.clone())
            }
            _ => RegistryAuth::Anonymous,
        }
    }
}

/// One try at reading an artifact from one endpoint (a mirror, or its registry), for
/// [`RegistryAccess::from_each_endpoint`].
pub trait Attempt {
    type Output;
    /// Reads the artifact at `at` (the artifact with its registry replaced by the endpoint's).
    fn attempt<'a>(
        &'a mut self,
        at: &'a BundleLocation,
    ) -> impl Future<Output = Result<Self::Output, PullError>> + Send + 'a;
}

/// True when the registry said the manifest or repository does not exist.
pub(super) fn is_not_found(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                oci_client::errors::OciErrorCode::ManifestUnknown | oci_client::errors::OciErrorCode::NameUnknown
            )
        }),
        OciDistributionError::ServerError { code, .. } => *code == 404,
        _ => false,
    }
}

/// Where a pull reads an artifact: a registry (storing what it fetches), or the content store alone.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    Registry(&'a RegistryAccess),
    /// Nothing is fetched: whatever is missing is a [`PullError::NotInStore`]. Every stored byte used is
    /// hashed again, so bytes on disk are never trusted for being there.
    Store,
}

/// Where pulls get their registry settings; the tokens and password files are read again for every pull.
#[derive(Clone, Debug)]
pub struct RegistrySettings {
    pub plain_http: Vec<String>,
    pub embedded: String,
    pub token_file: PathBuf,
    pub mirrors: BTreeMap<String, Vec<String>>,
    pub credentials: BTreeMap<String, RegistryCredentials>,
    /// The short-lived registry token the controller hands this device with each Welcome; preferred over
    /// `token_file` (which only the insecure token mode has).
    pub device_token: DeviceRegistryToken,
    /// The controller CA (PEM file), trusted for the embedded registry's HTTPS.
    pub ca_file: Option<PathBuf>,
    /// The trust policy, read again before each pull.
    pub trust: TrustStore,
}

impl RegistrySettings {
    /// The settings of `config`, with `device_token` (shared with the session, which sets it).
    pub fn from_config(config: &crate::Config, device_token: DeviceRegistryToken) -> RegistrySettings {
        RegistrySettings {
            plain_http: config.plain_http_registries(),
            embedded: config.embedded_registry(),
            token_file: config.controller.token_file.clone(),
            mirrors: config.registry.mirrors.clone(),
            credentials: config.registry.credentials.clone(),
            device_token,
            ca_file: config.controller.ca_file.clone(),
            trust: TrustStore::new(config.trust_policy.clone()),
        }
    }

    /// Registry access as the settings say now: the current token, passwords and CA.
    pub async fn access(&self) -> RegistryAccess {
        let (token, named) = self.token().await;
        let credentials = self.credentials().await;
        let roots = self.ca_file.as_ref().and_then(|path| std::fs::read(path).ok()).into_iter().collect();
        let access = RegistryAccess::with_roots(self.plain_http.clone(), self.embedded.clone(), token, roots)
            .with_mirrors(self.mirrors.clone())
            .with_credentials(credentials);
        match named {
            Some(registry) => access.token_for(registry),
            None => access,
        }
    }

    /// The device's registry token from the last Welcome (with the registry the controller named for it),
    /// else the token file (for the embedded registry); None pulls anonymously.
    async fn token(&self) -> (Option<String>, Option<String>) {
        let mut named = None;
        let token = match self.device_token.current() {
            Some((token, registry)) => {
                named = registry;
                Ok(token)
            }
            None if self.token_file.as_os_str().is_empty() => Err(std::io::ErrorKind::NotFound.into()),
            None => tokio::fs::read_to_string(&self.token_file).await,
        };
        match token {
            Ok(t) if !t.trim().is_empty() => (Some(t.trim().to_owned()), named),
            Ok(_) | Err(_) => {
                tracing::warn!(file = %self.token_file.display(), "No agent token; pulling anonymously.");
                (None, None)
            }
        }
    }

    /// The configured credentials with their passwords read now; a registry whose file cannot be read is
    /// pulled from anonymously.
    async fn credentials(&self) -> BTreeMap<String, (String, String)> {
        let mut credentials = BTreeMap::new();
        for (registry, c) in &self.credentials {
            match tokio::fs::read_to_string(&c.password_file).await {
                Ok(password) => {
                    credentials.insert(registry.clone(), (c.username.clone(), password.trim().to_owned()));
                }
                Err(error) => tracing::warn!(
                    %registry, file = %c.password_file.display(), %error,
                    "Cannot read the registry password file; pulling from it anonymously."
                ),
            }
        }
        credentials
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(registry: &str) -> BundleLocation {
        BundleLocation {
            registry: registry.to_owned(),
            repository: "a/b".to_owned(),
            digest: Digest::of(b"x"),
            tag: String::new(),
        }
    }

    #[test]
    fn the_token_goes_to_the_exact_registry_it_is_for_only() {
        let access = RegistryAccess::new(vec![], "ctl.example:7070".to_owned(), Some("t".to_owned()));
        assert!(matches!(access.auth(&at("")), RegistryAuth::Basic(..)));
        assert!(matches!(access.auth(&at("ctl.example:7070")), RegistryAuth::Basic(..)));
        assert!(matches!(access.auth(&at("ctl.example:7080")), RegistryAuth::Anonymous), "another port of the host");
        assert!(matches!(access.auth(&at("docker.io")), RegistryAuth::Anonymous));
        assert!(matches!(access.auth(&at("ctl.example.evil:7070")), RegistryAuth::Anonymous));
        // The controller named its registry (HTTP port) for the token: that one only, not the gRPC port.
        let named = RegistryAccess::new(vec![], "ctl.example:7070".to_owned(), Some("t".to_owned()))
            .token_for("ctl.example:7080".to_owned());
        assert!(matches!(named.auth(&at("ctl.example:7080")), RegistryAuth::Basic(..)));
        assert!(matches!(named.auth(&at("ctl.example:7070")), RegistryAuth::Anonymous));
        assert!(matches!(named.auth(&at("")), RegistryAuth::Basic(..)), "naming none is the embedded registry");
        assert!(matches!(named.auth(&at("ctl.example:9999")), RegistryAuth::Anonymous));
    }

    fn mirrored() -> RegistryAccess {
        let mirrors = [
            ("reg.example:5000".to_owned(), vec!["m1:5000".to_owned(), "m2:5000".to_owned(), "m1:5000".to_owned()]),
            ("ctl.example:7080".to_owned(), vec!["ctl.example:7080".to_owned(), "cache:5000".to_owned()]),
        ]
        .into();
        RegistryAccess::new(vec![], "ctl.example:7080".to_owned(), None).with_mirrors(mirrors)
    }

    #[test]
    fn mirrors_come_first_in_order_then_the_origin() {
        let access = mirrored();
        assert_eq!(access.endpoints(&at("reg.example:5000")), ["m1:5000", "m2:5000", "reg.example:5000"]);
        assert_eq!(access.endpoints(&at("")), ["cache:5000", "ctl.example:7080"], "embedded, origin not twice");
        assert_eq!(access.endpoints(&at("other:5000")), ["other:5000"], "no mirrors: the origin only");
    }

    /// Records the endpoints tried and answers from a script.
    struct Scripted {
        tried: Vec<String>,
        answer: fn(&str) -> Result<String, PullError>,
    }

    impl Attempt for Scripted {
        type Output = String;
        fn attempt<'a>(
            &'a mut self,
            at: &'a BundleLocation,
        ) -> impl Future<Output = Result<String, PullError>> + Send + 'a {
            self.tried.push(at.registry.clone());
            let answer = (self.answer)(&at.registry);
            async move { answer }
        }
    }

    fn unreachable() -> PullError {
        PullError::Registry {
            what: "m".to_owned(),
            registry: "r".to_owned(),
            source: Box::new(OciDistributionError::GenericError(None)),
            pushed: crate::pull::Pushed::Bundle,
        }
    }

    #[tokio::test]
    async fn each_endpoint_is_tried_while_another_source_may_help() {
        let access = mirrored();
        let mut all_down = Scripted { tried: Vec::new(), answer: |_| Err(unreachable()) };
        assert!(access.from_each_endpoint(&at("reg.example:5000"), &mut all_down).await.is_err());
        assert_eq!(all_down.tried, ["m1:5000", "m2:5000", "reg.example:5000"], "mirrors in order, then the origin");

        let mut first_down = Scripted {
            tried: Vec::new(),
            answer: |registry| if registry == "m1:5000" { Err(unreachable()) } else { Ok(registry.to_owned()) },
        };
        let result = access.from_each_endpoint(&at("reg.example:5000"), &mut first_down).await;
        assert_eq!(result.ok().as_deref(), Some("m2:5000"));
        assert_eq!(first_down.tried, ["m1:5000", "m2:5000"], "the origin is not asked once a mirror answered");

        let mut not_a_bundle = Scripted { tried: Vec::new(), answer: |_| Err(PullError::NotABundle("no".to_owned())) };
        let result = access.from_each_endpoint(&at("reg.example:5000"), &mut not_a_bundle).await;
        assert!(matches!(result, Err(PullError::NotABundle(_))));
        assert_eq!(not_a_bundle.tried.len(), 1, "a problem of the bundle itself is not asked of another source");
    }

    #[test]
    fn credentials_go_to_their_exact_registry_only() {
        let credentials = [("reg.example:5000".to_owned(), ("ci".to_owned(), "secret".to_owned()))].into();
        let access = RegistryAccess::new(vec![], "ctl.example:7080".to_owned(), Some("t".to_owned()))
            .with_credentials(credentials);
        assert!(
            matches!(access.auth(&at("reg.example:5000")), RegistryAuth::Basic(u, p) if u == "ci" && p == "secret")
        );
        assert!(matches!(access.auth(&at("reg.example:5001")), RegistryAuth::Anonymous));
        assert!(matches!(access.auth(&at("mirror:5000")), RegistryAuth::Anonymous));
        assert!(matches!(access.auth(&at("")), RegistryAuth::Basic(u, _) if u == BASIC_USER));
    }
}
