//! How alkictl reaches the fleet: the controller's gRPC address with its CA and bearer token, the registry
//! with its login, and how bundle references name a registry (the controller's own, or another).

use std::path::PathBuf;

use alki_bundle::{BundleRef, Remote};
use alki_shared::digest::Digest;
use alki_shared::proto::{
    admin_service_client::AdminServiceClient, diagnostics_service_client::DiagnosticsServiceClient,
    event_service_client::EventServiceClient, fleet_service_client::FleetServiceClient,
    insight_service_client::InsightServiceClient, security_service_client::SecurityServiceClient,
};
use anyhow::{Context as _, bail};
use clap::Args;
use oci_client::secrets::RegistryAuth;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The options every command shares to reach the controller and the registry.
#[derive(Args)]
#[command(next_help_heading = "Connection and output")]
pub struct Connection {
    /// gRPC address of alki-controller (`http://` only for a controller run with --insecure-plaintext).
    #[arg(long, global = true, env = "ALKI_CONTROLLER", default_value = "https://127.0.0.1:7070")]
    pub controller: String,
    /// The controller's CA certificate (its <data-dir>/pki/ca.crt), trusted for gRPC and the registry.
    /// Default: pki/ca.crt beside --token-file (the controller's data directory, for local use).
    #[arg(long, global = true, env = "ALKI_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// host:port of the controller's registry (or an external one). A reference that names its own
    /// registry (`HOST:PORT/acme/qwen:v2`, as `bundle push` prints) goes there instead.
    #[arg(long, global = true, env = "ALKI_REGISTRY", default_value = "127.0.0.1:7080")]
    pub registry: String,
    /// Bearer token. Prefer --token-file or ALKI_TOKEN over putting secrets on the command line.
    #[arg(long, global = true, env = "ALKI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the token (e.g. the controller's <data-dir>/admin.token).
    #[arg(long, global = true, env = "ALKI_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Username for an external registry that has its own login (with --registry-password-file); without
    /// it, alkictl sends its token to the registry, as the controller's embedded registry expects.
    #[arg(long, global = true, env = "ALKI_REGISTRY_USERNAME", requires = "registry_password_file")]
    pub registry_username: Option<String>,
    /// File holding the password or access token for --registry-username.
    #[arg(long, global = true, env = "ALKI_REGISTRY_PASSWORD_FILE", requires = "registry_username")]
    pub registry_password_file: Option<PathBuf>,
}

pub type Fleet = FleetServiceClient<InterceptedService<Channel, Auth>>;
pub type Admin = AdminServiceClient<InterceptedService<Channel, Auth>>;
pub type Security = SecurityServiceClient<InterceptedService<Channel, Auth>>;
pub type Insight = InsightServiceClient<InterceptedService<Channel, Auth>>;
pub type Events = EventServiceClient<InterceptedService<Channel, Auth>>;
pub type Diagnostics = DiagnosticsServiceClient<InterceptedService<Channel, Auth>>;

/// Adds the bearer token to every gRPC request.
#[derive(Clone)]
pub struct Auth(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl Connection {
    /// --token, else the contents of --token-file, else none.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(t) = &self.token {
            return Ok(Some(t.trim().to_owned()));
        }
        match &self.token_file {
            Some(path) => {
                let t =
                    std::fs::read_to_string(path).with_context(|| format!("reading token file {}", path.display()))?;
                Ok(Some(t.trim().to_owned()))
            }
            None => Ok(None),
        }
    }

    /// How alkictl logs in to a registry: the external registry's own login when given, else the token
    /// as a Basic password (the embedded registry's scheme), else anonymously.
    pub fn registry_auth(&self) -> anyhow::Result<RegistryAuth> {
        if let (Some(user), Some(file)) = (&self.registry_username, &self.registry_password_file) {
            let password = std::fs::read_to_string(file)
                .with_context(|| format!("reading --registry-password-file {}", file.display()))?;
            return Ok(RegistryAuth::Basic(user.clone(), password.trim().to_owned()));
        }
        Ok(alki_bundle::registry::token_auth(self.token()?))
    }

    /// The controller CA: --ca-file, else `pki/ca.crt` beside --token-file (the controller's data directory).
    pub fn ca_pem(&self) -> anyhow::Result<Option<Vec<u8>>> {
        if let Some(path) = &self.ca_file {
            return std::fs::read(path).map(Some).with_context(|| format!("reading --ca-file {}", path.display()));
        }
        let beside_token = self.token_file.as_ref().and_then(|t| t.parent()).map(|dir| dir.join("pki/ca.crt"));
        Ok(beside_token.and_then(|path| std::fs::read(path).ok()))
    }

    /// Roots trusted for HTTPS to a registry or the controller's HTTP API besides the system's: the
    /// controller CA when known.
    pub fn extra_roots(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        Ok(self.ca_pem()?.into_iter().collect())
    }

    /// The repository `reference` names, in the registry it names (else --registry), with this login.
    pub fn remote(&self, reference: &BundleRef, plain_http: bool) -> anyhow::Result<Remote> {
        let registry = reference.registry_or(&self.registry).to_owned();
        Ok(Remote::new(registry, reference.repository.clone(), self.registry_auth()?, plain_http)
            .trusting(self.extra_roots()?))
    }

    /// A bundle as the controller names it: see [`name_for_controller`].
    pub fn controller_bundle(&self, reference: &BundleRef) -> (String, String) {
        name_for_controller(reference, &self.registry)
    }

    /// A reference as one text the controller resolves (an eval suite, a baseline): see
    /// [`text_for_controller`].
    pub fn controller_reference(&self, reference: &BundleRef) -> String {
        text_for_controller(reference, &self.registry)
    }

    /// The manifest digest `text` names: a digest as it is, a pinned reference's digest, or a tag looked up
    /// in the registry the reference names (else --registry).
    pub async fn resolve_digest(&self, text: &str, plain_http: bool) -> anyhow::Result<Digest> {
        if let Ok(digest) = text.parse::<Digest>() {
            return Ok(digest);
        }
        let reference: BundleRef = text.parse()?;
        if let Some(digest) = reference.digest {
            return Ok(digest);
        }
        let remote = self.remote(&reference, plain_http)?;
        let tag = reference.tag_or_digest();
        match remote.manifest(&remote.client(), &tag).await? {
            Some((_, digest)) => Ok(digest),
            None => bail!("{} is not in the registry; check the name or give its digest", remote.named(&tag)),
        }
    }

    fn auth(&self) -> anyhow::Result<Auth> {
        let header = match self.token()? {
            Some(t) => Some(format!("Bearer {t}").parse().context("the token has characters a header cannot carry")?),
            None => None,
        };
        Ok(Auth(header))
    }

    /// A channel to the controller: TLS trusting the controller CA for `https://`, plaintext for `http://`.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let mut endpoint = Channel::from_shared(self.controller.clone())
            .with_context(|| format!("{:?} is not a valid controller address", self.controller))?
            .connect_timeout(std::time::Duration::from_secs(10));
        if self.controller.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            if let Some(ca) = self.ca_pem()? {
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca));
            }
            endpoint = endpoint.tls_config(tls).context("TLS settings for the controller")?;
        }
        endpoint.connect().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the controller at {}: {e}{}",
                self.controller,
                if self.ca_file.is_none() { " (for TLS, pass the controller's CA with --ca-file)" } else { "" }
            )
        })
    }

    pub async fn fleet(&self) -> anyhow::Result<Fleet> {
        Ok(FleetServiceClient::with_interceptor(self.channel().await?, self.auth()?))
    }

    pub async fn admin(&self) -> anyhow::Result<Admin> {
        Ok(AdminServiceClient::with_interceptor(self.channel().await?, self.auth()?))
    }

    pub async fn security(&self) -> anyhow::Result<Security> {
        Ok(SecurityServiceClient::with_interceptor(self.channel().await?, self.auth()?))
    }

    pub async fn diagnostics(&self) -> anyhow::Result<Diagnostics> {
        Ok(DiagnosticsServiceClient::with_interceptor(self.channel().await?, self.auth()?))
    }

    pub async fn insight(&self) -> anyhow::Result<Insight> {
        Ok(InsightServiceClient::with_interceptor(self.channel().await?, self.auth()?))
    }

    pub async fn events(&self) -> anyhow::Result<Events> {
        Ok(EventServiceClient::with_interceptor(self.channel().await?, self.auth()?))
    }
}

/// A bundle as the controller names it: (repository, tag or digest). A reference to `own_registry` (how
/// alkictl reaches the controller's embedded registry, --registry) drops its host; any other registry stays
/// in front of the repository (`HOST:PORT/acme/qwen`), which the controller resolves among its external
/// registries.
pub fn name_for_controller(reference: &BundleRef, own_registry: &str) -> (String, String) {
    let repository = match &reference.registry {
        Some(host) if host != own_registry => format!("{host}/{}", reference.repository),
        _ => reference.repository.clone(),
    };
    (repository, reference.tag_or_digest())
}

/// A reference as one text for the controller: `REPOSITORY:TAG` or `REPOSITORY@sha256:...` (the digest
/// wins over a tag), with the registry host in front when it is not `own_registry`.
pub fn text_for_controller(reference: &BundleRef, own_registry: &str) -> String {
    let (repository, tag_or_digest) = name_for_controller(reference, own_registry);
    let separator = if reference.digest.is_some() { '@' } else { ':' };
    format!("{repository}{separator}{tag_or_digest}")
}

/// A gRPC error as one line for people.
pub fn status(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unavailable => anyhow::anyhow!("cannot reach the controller: {}", s.message()),
        _ => anyhow::anyhow!("{}", s.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(registry: &str) -> Connection {
        Connection {
            controller: String::new(),
            ca_file: None,
            registry: registry.into(),
            token: None,
            token_file: None,
            registry_username: None,
            registry_password_file: None,
        }
    }

    #[test]
    fn a_reference_to_the_controllers_registry_names_its_repository_and_any_other_registry_stays() {
        let c = connection("127.0.0.1:7080");
        let parse = |s: &str| s.parse::<BundleRef>().expect(s);
        assert_eq!(c.controller_bundle(&parse("127.0.0.1:7080/acme/gemma:v1")), ("acme/gemma".into(), "v1".into()));
        assert_eq!(c.controller_bundle(&parse("acme/gemma")), ("acme/gemma".into(), "latest".into()));
        assert_eq!(
            c.controller_bundle(&parse("127.0.0.1:5000/acme/gemma:v1")),
            ("127.0.0.1:5000/acme/gemma".into(), "v1".into())
        );
        let pinned = format!("acme/gemma@{}", alki_shared::digest::Digest::of(b"x"));
        assert_eq!(c.controller_bundle(&parse(&pinned)).1, alki_shared::digest::Digest::of(b"x").to_string());
        assert_eq!(c.controller_reference(&parse("127.0.0.1:7080/acme/evals:v1")), "acme/evals:v1");
        assert_eq!(c.controller_reference(&parse("acme/evals")), "acme/evals:latest");
        assert_eq!(c.controller_reference(&parse(&format!("127.0.0.1:7080/{pinned}"))), pinned);
        assert_eq!(c.controller_reference(&parse("127.0.0.1:5000/acme/evals:v1")), "127.0.0.1:5000/acme/evals:v1");
    }

    #[test]
    fn a_reference_naming_a_registry_is_pushed_and_read_there() {
        let c = connection("127.0.0.1:7080");
        let remote = c.remote(&"registry.example.com:5000/acme/gemma:v1".parse().expect("ref"), true).expect("remote");
        assert_eq!((remote.registry.as_str(), remote.repository.as_str()), ("registry.example.com:5000", "acme/gemma"));
        let remote = c.remote(&"acme/gemma:v1".parse().expect("ref"), true).expect("remote");
        assert_eq!(remote.registry, "127.0.0.1:7080");
    }
}
