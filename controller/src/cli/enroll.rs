//! `alkictl enroll token create|list|revoke` and `alkictl devices decommission`.

use std::time::Duration;

use alki_shared::proto::{self, security_service_client::SecurityServiceClient};
use anyhow::Context as _;
use clap::Subcommand;
use serde::Serialize;

use super::{Cli, parse_label, print, status, table};

#[derive(Subcommand)]
pub enum EnrollCmd {
    /// Bootstrap tokens devices enroll with.
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Make a bootstrap token; the secret is printed once and never again.
    Create {
        /// Labels every device enrolled with it gets (they win over the device's own): `--labels site=shop-7`.
        #[arg(long = "labels", short = 'l', value_parser = parse_label, value_delimiter = ',')]
        labels: Vec<(String, String)>,
        /// How many devices may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long it is valid: `30m`, `24h`, `7d`.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        expires: Duration,
    },
    /// Bootstrap tokens with their uses, expiry and labels (never the secrets).
    List,
    /// Revoke a bootstrap token by its id (from `list`).
    Revoke { id: String },
}

type Security =
    SecurityServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, super::Auth>>;

async fn client(cli: &Cli) -> anyhow::Result<Security> {
    Ok(SecurityServiceClient::with_interceptor(cli.channel().await?, cli.auth()?))
}

#[derive(Serialize)]
struct TokenView {
    id: String,
    labels: std::collections::BTreeMap<String, String>,
    uses: u32,
    uses_allowed: u32,
    expires: String,
    state: &'static str,
}

impl From<proto::EnrollToken> for TokenView {
    fn from(t: proto::EnrollToken) -> Self {
        let now = crate::now_unix_ms();
        let state = if t.revoked {
            "revoked"
        } else if t.expires_unix_ms <= now {
            "expired"
        } else if t.uses >= t.uses_allowed {
            "used up"
        } else {
            "usable"
        };
        TokenView {
            id: t.id,
            labels: t.labels.into_iter().collect(),
            uses: t.uses,
            uses_allowed: t.uses_allowed,
            expires: time_of(t.expires_unix_ms),
            state,
        }
    }
}

fn time_of(unix_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(unix_ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn labels_text(labels: &std::collections::BTreeMap<String, String>) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

pub async fn run(cli: &Cli, cmd: &EnrollCmd) -> anyhow::Result<()> {
    match cmd {
        EnrollCmd::Token(TokenCmd::Create { labels, uses, expires }) => {
            if expires.as_secs() == 0 {
                anyhow::bail!("--expires {expires:?} is shorter than a second; give e.g. 24h");
            }
            let created = client(cli)
                .await?
                .create_enroll_token(proto::CreateEnrollTokenRequest {
                    labels: labels.iter().cloned().collect(),
                    uses: *uses,
                    expires_in_seconds: expires.as_secs(),
                })
                .await
                .map_err(status)?
                .into_inner();
            let token = created.token.context("the controller returned no token record")?;
            #[derive(Serialize)]
            struct Created {
                secret: String,
                token: TokenView,
            }
            let view = Created { secret: created.secret, token: token.into() };
            print(cli.output, &view, |c| {
                format!(
                    "{}\n(bootstrap token {}: {} uses, expires {}; shown once — put it in the device's \
                     controller.bootstrap_token_file)",
                    c.secret, c.token.id, c.token.uses_allowed, c.token.expires
                )
            })
        }
        EnrollCmd::Token(TokenCmd::List) => {
            let tokens = client(cli)
                .await?
                .list_enroll_tokens(proto::ListEnrollTokensRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .tokens;
            let views: Vec<TokenView> = tokens.into_iter().map(TokenView::from).collect();
            print(cli.output, &views, |vs| {
                let mut t = table(["ID", "STATE", "USES", "EXPIRES", "LABELS"]);
                for v in vs {
                    t.add_row([
                        v.id.clone(),
                        v.state.to_owned(),
                        format!("{}/{}", v.uses, v.uses_allowed),
                        v.expires.clone(),
                        labels_text(&v.labels),
                    ]);
                }
                t.to_string()
            })
        }
        EnrollCmd::Token(TokenCmd::Revoke { id }) => {
            let revoked = client(cli)
                .await?
                .revoke_enroll_token(proto::RevokeEnrollTokenRequest { id: id.clone() })
                .await
                .map_err(status)?
                .into_inner();
            let view: TokenView = revoked.token.context("the controller returned no token record")?.into();
            print(cli.output, &view, |v| format!("revoked bootstrap token {}", v.id))
        }
    }
}

pub async fn decommission(cli: &Cli, id: &str) -> anyhow::Result<()> {
    let done = client(cli)
        .await?
        .decommission_device(proto::DecommissionDeviceRequest { device_id: id.to_owned() })
        .await
        .map_err(status)?
        .into_inner();
    #[derive(Serialize)]
    struct View {
        device_id: String,
        decommissioned: String,
        session_closed: bool,
    }
    let view = View {
        device_id: done.device_id,
        decommissioned: time_of(done.decommissioned_unix_ms),
        session_closed: done.session_closed,
    };
    print(cli.output, &view, |v| {
        format!(
            "decommissioned {}{}; its certificate is refused from now on",
            v.device_id,
            if v.session_closed { " (its session was closed)" } else { "" }
        )
    })
}
