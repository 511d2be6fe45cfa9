//! `alkictl enroll token create|list|revoke`: the bootstrap tokens devices enroll with (admin only).

use std::time::Duration;

use alki_shared::clock::UnixMs;
use alki_shared::proto;
use anyhow::Context as _;
use clap::Subcommand;
use serde::Serialize;

use crate::connection::{Connection, status};
use crate::labels::parse_label;
use crate::output::{Output, print, rfc3339, table};

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
        /// Bind the token to one device id: it enrolls only that id. This is how a known id enrolls again
        /// (an expired or lost certificate, replaced hardware); any other token is refused for it.
        #[arg(long)]
        device_id: Option<String>,
    },
    /// Bootstrap tokens with their uses, expiry and labels (never the secrets).
    List,
    /// Revoke a bootstrap token by its id (from `list`).
    Revoke { id: String },
}

#[derive(Serialize)]
struct TokenView {
    id: String,
    labels: std::collections::BTreeMap<String, String>,
    uses: u32,
    uses_allowed: u32,
    expires: String,
    state: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    device_id: String,
}

impl From<proto::EnrollToken> for TokenView {
    fn from(t: proto::EnrollToken) -> Self {
        let now = UnixMs::now().as_millis();
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
            expires: rfc3339(t.expires_unix_ms),
            state,
            device_id: t.device_id,
        }
    }
}

fn labels_text(labels: &std::collections::BTreeMap<String, String>) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Runs one `alkictl enroll` command.
pub async fn run(connection: &Connection, output: Output, cmd: EnrollCmd) -> anyhow::Result<()> {
    match cmd {
        EnrollCmd::Token(TokenCmd::Create { labels, uses, expires, device_id }) => {
            if expires.as_secs() == 0 {
                anyhow::bail!("--expires {expires:?} is shorter than a second; give e.g. 24h");
            }
            let created = connection
                .security()
                .await?
                .create_enroll_token(proto::CreateEnrollTokenRequest {
                    labels: labels.into_iter().collect(),
                    uses,
                    expires_in_seconds: expires.as_secs(),
                    device_id: device_id.unwrap_or_default(),
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
            print(output, &view, |c| {
                let only = if c.token.device_id.is_empty() {
                    String::new()
                } else {
                    format!(" for device {} only", c.token.device_id)
                };
                format!(
                    "{}\n(bootstrap token {}{only}: {} uses, expires {}; shown once — put it in the device's \
                     controller.bootstrap_token_file)",
                    c.secret, c.token.id, c.token.uses_allowed, c.token.expires
                )
            })
        }
        EnrollCmd::Token(TokenCmd::List) => {
            let tokens = connection
                .security()
                .await?
                .list_enroll_tokens(proto::ListEnrollTokensRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .tokens;
            let views: Vec<TokenView> = tokens.into_iter().map(TokenView::from).collect();
            print(output, &views, |vs| {
                let mut t = table(["ID", "STATE", "USES", "EXPIRES", "DEVICE", "LABELS"]);
                for v in vs {
                    t.add_row([
                        v.id.clone(),
                        v.state.to_owned(),
                        format!("{}/{}", v.uses, v.uses_allowed),
                        v.expires.clone(),
                        if v.device_id.is_empty() { "any new".to_owned() } else { v.device_id.clone() },
                        labels_text(&v.labels),
                    ]);
                }
                t.to_string()
            })
        }
        EnrollCmd::Token(TokenCmd::Revoke { id }) => {
            let revoked = connection
                .security()
                .await?
                .revoke_enroll_token(proto::RevokeEnrollTokenRequest { id })
                .await
                .map_err(status)?
                .into_inner();
            let view: TokenView = revoked.token.context("the controller returned no token record")?.into();
            print(output, &view, |v| format!("revoked bootstrap token {}", v.id))
        }
    }
}
