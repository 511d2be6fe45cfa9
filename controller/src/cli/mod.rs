//! alkictl: the operators' and CI's command line. Tables for people, `-o json` for scripts.

pub mod admin;
pub mod bench;
pub mod enroll;
pub mod inspect;
pub mod key;
pub mod layout;
pub mod pack;
pub mod push;
pub mod rollout;
pub mod runtime;
pub mod sign;

use oci_client::secrets::RegistryAuth;
use std::collections::HashMap;
use std::path::PathBuf;

use alki_shared::proto::{self, fleet_service_client::FleetServiceClient};
use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use comfy_table::Table;
use serde::Serialize;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "alkictl", version, about = "Operate an Alki Fleet: bundles, devices, rollouts.")]
pub struct Cli {
    /// gRPC address of alki-controller (`http://` only for a controller run with --insecure-plaintext).
    #[arg(long, global = true, env = "ALKI_CONTROLLER", default_value = "https://127.0.0.1:7070")]
    pub controller: String,
    /// The controller's CA certificate (its <data-dir>/pki/ca.crt), trusted for gRPC and the registry.
    /// Default: pki/ca.crt beside --token-file (the controller's data directory, for local use).
    #[arg(long, global = true, env = "ALKI_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// host:port of the controller's registry (or an external one).
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
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Pack, push and list bundles.
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// Devices in the fleet.
    #[command(subcommand)]
    Devices(DevicesCmd),
    /// Roll bundles out to devices.
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// Benchmarks, calibration, A/B comparisons and variant recommendations.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Access tokens (admin only).
    #[command(subcommand)]
    Token(TokenCmd),
    /// The audit log of state-changing calls (admin only).
    #[command(subcommand)]
    Audit(admin::AuditCmd),
    /// Device enrollment: bootstrap tokens (admin only).
    #[command(subcommand)]
    Enroll(enroll::EnrollCmd),
    /// The controller's embedded registry (admin only).
    #[command(subcommand)]
    Registry(RegistryCmd),
    /// Signing keys (cosign-compatible).
    #[command(subcommand)]
    Key(KeyCmd),
    /// llama.cpp builds that bundles run with (`bundle pack --runtime-build`).
    #[command(subcommand)]
    Runtime(RuntimeCmd),
}

#[derive(Subcommand)]
pub enum RuntimeCmd {
    /// Pack llama.cpp builds (llama-server and the shared libraries beside it), one per platform, and push
    /// them as one runtime build: `alkictl runtime push acme/llama-server:b6000 --platform linux/amd64=build/bin
    /// --platform linux/arm64/cuda=jetson/bin`. Prints the pinned reference a bundle names. Sign it like a
    /// bundle: `alkictl bundle sign acme/llama-server:b6000 --key alki.key`.
    Push {
        /// Repository and optional tag, e.g. acme/llama-server:b6000.
        target: String,
        /// OS/ARCH[/VARIANT][/cpu|cuda]=DIR (repeatable): e.g. linux/amd64=build/bin, linux/arm64/cuda=DIR.
        #[arg(long = "platform", required = true)]
        platforms: Vec<String>,
        /// The build's version for its config (default: the tag).
        #[arg(long)]
        build_version: Option<String>,
        /// Keep the packed OCI layout in this new directory (default: a temporary one, removed after the push).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Talk plain HTTP to the registry (until TLS is set up). Never use across a network you do not trust.
        #[arg(long)]
        insecure_plain_http: bool,
    },
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Write a cosign-compatible key pair: PREFIX.key (encrypted with the password from ALKI_KEY_PASSWORD,
    /// COSIGN_PASSWORD or a prompt) and PREFIX.pub (give it to agents' trust policies and the controller).
    Generate {
        #[arg(long, default_value = "alki")]
        output_prefix: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum RegistryCmd {
    /// Delete blobs no manifest references now, instead of waiting for the controller's schedule.
    Gc {
        /// Keep unreferenced blobs pushed, mounted or read within this many seconds (default: the
        /// controller's --registry-gc-grace-secs). 0 deletes them all: only when no push is running.
        #[arg(long)]
        grace_secs: Option<u64>,
        /// Talk plain HTTP to the controller (until TLS is set up).
        #[arg(long)]
        insecure_plain_http: bool,
    },
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum BundleCmd {
    /// Turn GGUF files (one per quantization) into a bundle in an OCI layout directory.
    Pack {
        /// GGUF files, one per quantization; every part of a split model (`-00001-of-00003.gguf`, ...).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Directory to create the OCI layout in.
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        model_version: Option<String>,
        /// SPDX license identifier.
        #[arg(long)]
        license: Option<String>,
        /// Default context size for llama-server (capped by the model's training context).
        #[arg(long, default_value_t = 4096)]
        context: u32,
        #[arg(long, default_value = "latest")]
        tag: String,
        /// License text to ship in the bundle (doc layer LICENSE).
        #[arg(long)]
        license_file: Option<PathBuf>,
        /// README to ship in the bundle (doc layer README.md).
        #[arg(long)]
        readme: Option<PathBuf>,
        /// Default CPU threads for llama-server (0: its own choice).
        #[arg(long, default_value_t = 0)]
        threads: u32,
        /// Default layers offloaded to a GPU.
        #[arg(long, default_value_t = 0)]
        gpu_layers: i32,
        /// A chat template file overriding the one inside the GGUF.
        #[arg(long)]
        chat_template: Option<PathBuf>,
        /// The llama.cpp build to run the bundle with, pinned by digest: the `pinned` reference
        /// `alkictl runtime push` printed (REGISTRY/REPOSITORY@sha256:...). Default: the agent's llama-server.
        #[arg(long)]
        runtime_build: Option<String>,
        /// Hard-link the GGUF files into the layout instead of copying them: packing only reads and hashes
        /// them (the same filesystem is needed; otherwise they are copied). The layout then shares the
        /// files, so do not modify a GGUF in place after packing it.
        #[arg(long)]
        link: bool,
    },
    /// Upload a packed bundle: `alkictl bundle push DIR REPOSITORY[:TAG]`.
    Push {
        dir: PathBuf,
        /// Repository and optional tag, e.g. acme/qwen:v2.
        target: String,
        /// Talk plain HTTP to the registry (until TLS is set up). Never use across a network you do not trust.
        #[arg(long)]
        insecure_plain_http: bool,
    },
    /// Sign a pushed bundle (its index and each variant manifest) with cosign's key-based scheme:
    /// `alkictl bundle sign acme/qwen:v2 --key alki.key`. The key password comes from ALKI_KEY_PASSWORD,
    /// COSIGN_PASSWORD or a prompt.
    Sign {
        /// REPOSITORY:TAG or REPOSITORY@sha256:...
        reference: String,
        /// Encrypted private key (from `alkictl key generate` or `cosign generate-key-pair`).
        #[arg(long)]
        key: PathBuf,
        /// Talk plain HTTP to the registry. Never use across a network you do not trust.
        #[arg(long)]
        insecure_plain_http: bool,
    },
    /// Show a bundle's variants, sizes, metadata and signatures: a packed directory or REPOSITORY:TAG.
    Inspect {
        /// An OCI layout directory, or REPOSITORY:TAG / REPOSITORY@sha256:... in --registry.
        target: String,
        /// Public keys to verify signatures with (repeatable).
        #[arg(long = "key")]
        keys: Vec<PathBuf>,
        /// Talk plain HTTP to the registry. Never use across a network you do not trust.
        #[arg(long)]
        insecure_plain_http: bool,
    },
    /// Bundles in the controller's registry.
    List {
        #[arg(long, default_value = "")]
        repository: String,
    },
}

#[derive(Subcommand)]
pub enum DevicesCmd {
    /// List devices, optionally only those carrying labels (`--selector site=lab`).
    List(SelectorArgs),
    /// One device in full.
    Get { id: String },
    /// Revoke a device: its session is closed and its certificate refused from now on.
    Decommission { id: String },
}

#[derive(Args, Default)]
pub struct SelectorArgs {
    /// key=value; repeat for several.
    #[arg(long = "selector", short = 'l', value_parser = parse_label)]
    pub selector: Vec<(String, String)>,
}

pub use rollout::RolloutCmd;

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a token; it is printed once and never again.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
    },
    /// Every token: id, name, role, when created and revoked (never the secrets).
    List,
    /// Revoke a token by its id (from `list`) or by a name only one live token has; refused from the next request.
    Revoke {
        /// Not named `token`: that id is the global --token flag's.
        #[arg(value_name = "ID_OR_NAME")]
        which: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Viewer,
    Operator,
    Admin,
    Push,
    Agent,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

type Fleet = FleetServiceClient<InterceptedService<Channel, Auth>>;

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

impl Cli {
    fn token(&self) -> anyhow::Result<Option<String>> {
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

    /// How alkictl logs in to `--registry`: the external registry's own login when given, else the token
    /// as a Basic password (the embedded registry's scheme), else anonymously.
    pub fn registry_auth(&self) -> anyhow::Result<RegistryAuth> {
        if let (Some(user), Some(file)) = (&self.registry_username, &self.registry_password_file) {
            let password = std::fs::read_to_string(file)
                .with_context(|| format!("reading --registry-password-file {}", file.display()))?;
            return Ok(RegistryAuth::Basic(user.clone(), password.trim().to_owned()));
        }
        Ok(push::token_auth(self.token()?))
    }

    async fn fleet(&self) -> anyhow::Result<Fleet> {
        Ok(FleetServiceClient::with_interceptor(self.channel().await?, self.auth()?))
    }

    fn auth(&self) -> anyhow::Result<Auth> {
        let header = match self.token()? {
            Some(t) => Some(format!("Bearer {t}").parse().context("the token has characters a header cannot carry")?),
            None => None,
        };
        Ok(Auth(header))
    }

    /// The controller CA: --ca-file, else `pki/ca.crt` beside --token-file (the controller's data directory).
    pub fn ca_pem(&self) -> anyhow::Result<Option<Vec<u8>>> {
        if let Some(path) = &self.ca_file {
            return std::fs::read(path).map(Some).with_context(|| format!("reading --ca-file {}", path.display()));
        }
        let beside_token = self.token_file.as_ref().and_then(|t| t.parent()).map(|dir| dir.join("pki/ca.crt"));
        Ok(beside_token.and_then(|path| std::fs::read(path).ok()))
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
}

/// Runs one alkictl command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // Registry clients (push, sign, inspect, gc) are built deep in their modules: they read the CA from here.
    let _ = CA_ROOTS.set(cli.ca_pem()?);
    match &cli.command {
        Command::Bundle(BundleCmd::Pack {
            files,
            out,
            name,
            model_version,
            license,
            context,
            tag,
            license_file,
            readme,
            threads,
            gpu_layers,
            chat_template,
            runtime_build,
            link,
        }) => {
            let opts = pack::PackOptions {
                files: files.clone(),
                out: out.clone(),
                name: name.clone(),
                version: model_version.clone(),
                license: license.clone(),
                context: *context,
                tag: tag.clone(),
            };
            let extras = pack::PackExtras {
                license_file: license_file.clone(),
                readme: readme.clone(),
                threads: *threads,
                gpu_layers: *gpu_layers,
                chat_template: chat_template.clone(),
                runtime_build: runtime_build.clone(),
                link_weights: *link,
            };
            let bar = progress_bar(cli.output, "packing");
            let packed = tokio::task::spawn_blocking(move || pack::pack_with(&opts, &extras, &bar)).await??;
            print(cli.output, &packed, |p| {
                let mut t = table(["VARIANT", "QUANT", "ARCH", "PARAMS", "SIZE", "MEMORY", "FILE"]);
                for v in &p.variants {
                    t.add_row([
                        short(v.digest.as_str()),
                        v.quantization.clone(),
                        v.architecture.clone(),
                        v.parameters.to_string(),
                        bytes(v.size),
                        bytes(v.memory_bytes),
                        v.file.display().to_string(),
                    ]);
                }
                format!("{t}\nbundle {} written to {} (tag {})", p.digest, p.layout.display(), p.tag)
            })
        }
        Command::Bundle(BundleCmd::Push { dir, target, insecure_plain_http }) => {
            let (repository, tag) = match target.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r.to_owned(), t.to_owned()),
                _ => (target.clone(), "latest".to_owned()),
            };
            let push_target = push::PushTarget {
                registry: cli.registry.clone(),
                repository,
                tag,
                auth: cli.registry_auth()?,
                plain_http: *insecure_plain_http,
            };
            let bar = progress_bar(cli.output, "pushing");
            let pushed = push::push(dir, &push_target, &bar).await?;
            print(cli.output, &pushed, |p| {
                format!(
                    "pushed {} ({}), {} uploaded, {} blobs already present",
                    p.reference,
                    p.digest,
                    bytes(p.uploaded_bytes),
                    p.skipped_blobs
                )
            })
        }
        Command::Runtime(RuntimeCmd::Push { target, platforms, build_version, out, insecure_plain_http }) => {
            let (repository, tag) = match target.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r.to_owned(), t.to_owned()),
                _ => (target.clone(), "latest".to_owned()),
            };
            let builds = platforms.iter().map(|p| runtime::parse_platform(p)).collect::<anyhow::Result<Vec<_>>>()?;
            let version = build_version.clone().unwrap_or_else(|| tag.clone());
            let temp = tempfile::tempdir()?;
            let dir = out.clone().unwrap_or_else(|| temp.path().join("layout"));
            let bar = progress_bar(cli.output, "packing");
            let (pack_dir, pack_tag) = (dir.clone(), tag.clone());
            let (digest, packed) =
                tokio::task::spawn_blocking(move || runtime::pack(&builds, &version, &pack_dir, &pack_tag, &bar))
                    .await??;
            let push_target = push::PushTarget {
                registry: cli.registry.clone(),
                repository: repository.clone(),
                tag,
                auth: cli.registry_auth()?,
                plain_http: *insecure_plain_http,
            };
            let bar = progress_bar(cli.output, "pushing");
            let pushed = push::push(&dir, &push_target, &bar).await?;
            let result = runtime::RuntimePushed {
                pinned: format!("{}/{}@{}", cli.registry, repository, digest),
                reference: pushed.reference,
                digest,
                uploaded_bytes: pushed.uploaded_bytes,
                skipped_blobs: pushed.skipped_blobs,
                platforms: packed,
            };
            print(cli.output, &result, |r| {
                let mut t = table(["PLATFORM", "MANIFEST", "LAYER", "FILES", "BUILD"]);
                for p in &r.platforms {
                    t.add_row([
                        p.platform.clone(),
                        short(p.manifest.as_str()),
                        bytes(p.layer_size),
                        p.files.to_string(),
                        p.build_info.chars().take(60).collect(),
                    ]);
                }
                format!(
                    "{t}\npushed {} ({}), {} uploaded, {} blobs already present\nsign it: alkictl bundle sign {} \
                     --key KEY\nname it in a bundle: alkictl bundle pack --runtime-build {} ...",
                    r.reference,
                    r.digest,
                    bytes(r.uploaded_bytes),
                    r.skipped_blobs,
                    r.reference.split_once('/').map(|(_, rest)| rest).unwrap_or(&r.reference),
                    r.pinned
                )
            })
        }
        Command::Bundle(BundleCmd::List { repository }) => {
            let bundles = cli
                .fleet()
                .await?
                .list_bundles(proto::ListBundlesRequest { repository: repository.clone() })
                .await
                .map_err(status)?;
            let bundles = bundles.into_inner().bundles;
            print(cli.output, &bundles, |bs| {
                let mut t = table(["REPOSITORY", "TAGS", "DIGEST", "VARIANTS", "SIZE", "SIGNED"]);
                for b in bs {
                    let variants: Vec<&str> = b.variants.iter().map(|v| v.quantization.as_str()).collect();
                    // Bundles of an external registry show its host; their signatures were checked when a
                    // rollout named them, and are not read again for a listing.
                    let (repository, signed) = if b.registry.is_empty() {
                        let signed = if b.signatures.iter().any(|s| s.verified && s.signed_digest == b.digest) {
                            "verified"
                        } else if b.signatures.is_empty() {
                            "no"
                        } else {
                            "unverified"
                        };
                        (b.repository.clone(), signed)
                    } else {
                        (format!("{}/{}", b.registry, b.repository), "at rollout")
                    };
                    t.add_row([
                        repository,
                        b.tags.join(","),
                        short(&b.digest),
                        variants.join(","),
                        bytes(b.total_size),
                        signed.into(),
                    ]);
                }
                t.to_string()
            })
        }
        Command::Devices(DevicesCmd::List(sel)) => {
            let selector: HashMap<String, String> = sel.selector.iter().cloned().collect();
            let devices =
                cli.fleet().await?.list_devices(proto::ListDevicesRequest { selector }).await.map_err(status)?;
            let devices: Vec<DeviceView> = devices.into_inner().devices.iter().map(DeviceView::from).collect();
            print(cli.output, &devices, |ds| {
                let mut t = table(["DEVICE", "CONNECTED", "PHASE", "RUNNING", "GEN", "CLASS", "ERROR"]);
                for d in ds {
                    t.add_row([
                        d.id.clone(),
                        if d.connected { "yes".into() } else { "no".into() },
                        d.phase.clone(),
                        d.running_cell(),
                        format!("{}/{}", d.applied_generation, d.desired_generation),
                        d.hardware_class.clone(),
                        d.error.clone().unwrap_or_default(),
                    ]);
                }
                t.to_string()
            })
        }
        Command::Devices(DevicesCmd::Get { id }) => {
            let device =
                cli.fleet().await?.get_device(proto::GetDeviceRequest { id: id.clone() }).await.map_err(status)?;
            let view = DeviceView::from(&device.into_inner());
            print(cli.output, &view, |d| serde_json::to_string_pretty(d).unwrap_or_default())
        }
        Command::Rollout(cmd) => rollout::run(&cli, cmd).await,
        Command::Bench(cmd) => bench::run(&cli, cmd).await,
        Command::Enroll(cmd) => enroll::run(&cli, cmd).await,
        Command::Devices(DevicesCmd::Decommission { id }) => enroll::decommission(&cli, id).await,
        Command::Key(KeyCmd::Generate { output_prefix, force }) => {
            let password = key::password(true)?;
            let made = key::generate(output_prefix, &password, *force)?;
            print(cli.output, &made, |m| {
                format!(
                    "private key {} (encrypted), public key {}\nfingerprint {}",
                    m.private_key.display(),
                    m.public_key.display(),
                    m.fingerprint
                )
            })
        }
        Command::Bundle(BundleCmd::Sign { reference, key: key_file, insecure_plain_http }) => {
            let (repository, tag) = split_bundle_ref(reference)?;
            let password = key::password(false)?;
            let signing_key = key::load(key_file, &password)?;
            let remote =
                sign::Remote::new(cli.registry.clone(), repository, cli.registry_auth()?, *insecure_plain_http);
            let signed = sign::sign(&remote, &tag, &signing_key).await?;
            print(cli.output, &signed, |s| {
                let mut t = table(["SIGNED", "DIGEST", "TAG", "SIGNATURES"]);
                for d in &s.signatures {
                    t.add_row([
                        d.what.clone(),
                        short(d.digest.as_str()),
                        d.tag.clone(),
                        d.signatures_at_tag.to_string(),
                    ]);
                }
                format!("{t}\nsigned {} with key {}", s.reference, s.key_fingerprint)
            })
        }
        Command::Bundle(BundleCmd::Inspect { target, keys, insecure_plain_http }) => {
            let report = inspect::inspect(&cli, target, keys, *insecure_plain_http).await?;
            print(cli.output, &report, inspect::render)
        }
        Command::Registry(RegistryCmd::Gc { grace_secs, insecure_plain_http }) => {
            let scheme = if *insecure_plain_http { "http" } else { "https" };
            let grace = grace_secs.map(std::time::Duration::from_secs);
            let token = cli.token()?;
            let base = format!("{scheme}://{}", cli.registry);
            let report = crate::registry::gc::request_gc(&base, token.as_deref(), grace).await?;
            print(cli.output, &report, |r| {
                format!(
                    "deleted {} unreferenced blobs ({} freed, {} links); kept {} younger than {}s, in {} ms",
                    r.blobs_deleted,
                    bytes(r.bytes_freed),
                    r.links_removed,
                    r.kept_recent,
                    r.grace_secs,
                    r.duration_ms
                )
            })
        }
        Command::Token(TokenCmd::List) => admin::token_list(&cli).await,
        Command::Token(TokenCmd::Revoke { which }) => admin::token_revoke(&cli, which).await,
        Command::Audit(cmd) => admin::audit(&cli, cmd).await,
        Command::Token(TokenCmd::Create { name, role }) => {
            let role = match role {
                RoleArg::Viewer => proto::Role::Viewer,
                RoleArg::Operator => proto::Role::Operator,
                RoleArg::Admin => proto::Role::Admin,
                RoleArg::Push => proto::Role::Push,
                RoleArg::Agent => proto::Role::Agent,
            };
            let created = cli
                .fleet()
                .await?
                .create_token(proto::CreateTokenRequest { name: name.clone(), role: role as i32 })
                .await
                .map_err(status)?
                .into_inner();
            #[derive(Serialize)]
            struct TokenView {
                name: String,
                role: String,
                token: String,
            }
            let view = TokenView { name: created.name, role: format!("{role:?}").to_lowercase(), token: created.token };
            print(cli.output, &view, |t| t.token.clone())
        }
    }
}

/// The controller CA (PEM) for this alkictl run, if one was given or found.
static CA_ROOTS: std::sync::OnceLock<Option<Vec<u8>>> = std::sync::OnceLock::new();

/// Extra roots for HTTPS to the controller's registry: the controller CA when known.
pub fn ca_roots() -> Vec<Vec<u8>> {
    CA_ROOTS.get().cloned().flatten().into_iter().collect()
}

/// `repo:tag` or `repo@sha256:...` → (repository, tag-or-digest).
fn split_bundle_ref(s: &str) -> anyhow::Result<(String, String)> {
    if let Some((repo, digest)) = s.split_once('@') {
        return Ok((repo.to_owned(), digest.to_owned()));
    }
    match s.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') && !repo.is_empty() => Ok((repo.to_owned(), tag.to_owned())),
        _ if !s.is_empty() => Ok((s.to_owned(), "latest".to_owned())),
        _ => bail!("name the bundle as REPOSITORY:TAG or REPOSITORY@sha256:..."),
    }
}

/// A device for people and scripts: enums as words, not numbers.
#[derive(Serialize)]
struct DeviceView {
    id: String,
    connected: bool,
    phase: String,
    running: Option<String>,
    desired: Option<String>,
    /// Serving nothing on purpose: a rollout returned the device to a baseline of nothing served.
    desired_serve_nothing: bool,
    applied_generation: u64,
    desired_generation: u64,
    rollout_id: String,
    hardware_class: String,
    agent_version: String,
    last_seen_unix_ms: i64,
    labels: std::collections::BTreeMap<String, String>,
    error: Option<String>,
    error_code: Option<String>,
}

impl From<&proto::Device> for DeviceView {
    fn from(d: &proto::Device) -> Self {
        DeviceView {
            id: d.id.clone(),
            connected: d.connected,
            phase: proto::Phase::try_from(d.phase).unwrap_or(proto::Phase::Unspecified).label().into(),
            running: d.running.as_ref().map(|b| b.display()),
            // Scripts read `desired_serve_nothing`; `desired` stays a bundle reference or null.
            desired: d.desired.as_ref().map(|b| b.display()),
            desired_serve_nothing: d.desired_serve_nothing,
            applied_generation: d.applied_generation,
            desired_generation: d.desired_generation,
            rollout_id: d.rollout_id.clone(),
            hardware_class: d.inventory.as_ref().map(|i| i.hardware_class.clone()).unwrap_or_default(),
            agent_version: d.agent_version.clone(),
            last_seen_unix_ms: d.last_seen_unix_ms,
            labels: d.labels.clone().into_iter().collect(),
            error: d.error.as_ref().map(|e| e.message.clone()),
            error_code: d.error.as_ref().map(|e| proto::ErrorCode::try_from(e.code).unwrap_or_default().label().into()),
        }
    }
}

/// How a device told to serve nothing (`Device.desired_serve_nothing`) reads, so it is not taken for a fault.
const SERVE_NOTHING: &str = "nothing (by rollout)";

impl DeviceView {
    /// The RUNNING cell: the bundle, nothing on purpose, or "-" (nothing yet or nothing known).
    fn running_cell(&self) -> String {
        match &self.running {
            Some(r) => short_ref(r),
            None if self.desired_serve_nothing => SERVE_NOTHING.into(),
            None => "-".into(),
        }
    }
}

fn print<T: Serialize>(output: Output, value: &T, table: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Table => println!("{}", table(value)),
    }
    Ok(())
}

fn table<const N: usize>(header: [&str; N]) -> Table {
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING).set_header(header);
    t
}

fn progress_bar(output: Output, what: &'static str) -> indicatif::ProgressBar {
    // Scripts reading JSON get no bar on stderr noise; people get one when stderr is a terminal.
    if output == Output::Json {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what);
    bar
}

fn status(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unavailable => anyhow::anyhow!("cannot reach the controller: {}", s.message()),
        _ => anyhow::anyhow!("{}", s.message()),
    }
}

fn short(digest: &str) -> String {
    digest.strip_prefix("sha256:").map(|h| h.chars().take(12).collect()).unwrap_or_else(|| digest.to_owned())
}

fn short_ref(r: &str) -> String {
    match r.split_once("@sha256:") {
        Some((name, hex)) => format!("{name}@{}", &hex[..hex.len().min(12)]),
        None => r.to_owned(),
    }
}

fn bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_serving_nothing_by_rollout_says_so() {
        let nothing = proto::Device { id: "pi-1".into(), desired_serve_nothing: true, ..Default::default() };
        let view = DeviceView::from(&nothing);
        assert_eq!(view.running_cell(), "nothing (by rollout)");
        assert_eq!(view.desired, None, "desired stays a bundle reference or null for scripts");
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(json["desired_serve_nothing"], true);

        let unknown = DeviceView::from(&proto::Device { id: "pi-2".into(), ..Default::default() });
        assert_eq!(unknown.running_cell(), "-");
        assert_eq!(unknown.desired, None);
    }
}
