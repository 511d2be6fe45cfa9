//! `alkictl token list|revoke` and `alkictl audit list`: the AdminService commands.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use alki_shared::proto::{self, admin_service_client::AdminServiceClient};
use clap::Subcommand;
use serde::Serialize;

use super::{Cli, print, status, table};

type Admin =
    AdminServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, super::Auth>>;

#[derive(Subcommand)]
pub enum AuditCmd {
    /// State-changing calls, newest first: who, what, target, when, result.
    List {
        /// Only entries since this long ago (`30m`, `24h`, `7d`) or this RFC 3339 time (`2026-11-23T14:00:00Z`).
        #[arg(long, value_parser = parse_since)]
        since: Option<i64>,
        /// Only this actor: a token name (`ci`), `token:<name>` or `device:<id>`.
        #[arg(long)]
        actor: Option<String>,
        /// At most this many entries (the controller caps it at 10000).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
}

/// `--since`: a duration back from now, or an RFC 3339 time; as Unix milliseconds.
fn parse_since(s: &str) -> Result<i64, String> {
    let at = match humantime::parse_duration(s) {
        Ok(ago) => SystemTime::now().checked_sub(ago).unwrap_or(UNIX_EPOCH),
        Err(_) => humantime::parse_rfc3339_weak(s)
            .map_err(|_| format!("{s:?} is neither a duration (30m, 24h, 7d) nor an RFC 3339 time"))?,
    };
    let ms = at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis();
    Ok(i64::try_from(ms).unwrap_or(i64::MAX))
}

async fn client(cli: &Cli) -> anyhow::Result<Admin> {
    Ok(AdminServiceClient::with_interceptor(cli.channel().await?, cli.auth()?))
}

#[derive(Serialize)]
struct TokenView {
    id: String,
    name: String,
    role: String,
    created: String,
    /// Empty while the token is valid.
    revoked: String,
}

impl From<proto::TokenInfo> for TokenView {
    fn from(t: proto::TokenInfo) -> TokenView {
        TokenView {
            id: t.id,
            name: t.name,
            role: role_name(t.role),
            created: time(t.created_unix_ms),
            revoked: if t.revoked_unix_ms == 0 { String::new() } else { time(t.revoked_unix_ms) },
        }
    }
}

fn role_name(role: i32) -> String {
    let role = proto::Role::try_from(role).unwrap_or_default();
    role.as_str_name().trim_start_matches("ROLE_").to_lowercase()
}

fn time(unix_ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(unix_ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

/// `alkictl token list`.
pub async fn token_list(cli: &Cli) -> anyhow::Result<()> {
    let tokens = client(cli).await?.list_tokens(proto::ListTokensRequest {}).await.map_err(status)?.into_inner();
    let views: Vec<TokenView> = tokens.tokens.into_iter().map(TokenView::from).collect();
    print(cli.output, &views, |views| {
        let mut t = table(["ID", "NAME", "ROLE", "CREATED", "REVOKED"]);
        for v in views {
            t.add_row([&v.id, &v.name, &v.role, &v.created, &v.revoked]);
        }
        t.to_string()
    })
}

/// `alkictl token revoke ID|NAME`.
pub async fn token_revoke(cli: &Cli, token: &str) -> anyhow::Result<()> {
    let revoked = client(cli)
        .await?
        .revoke_token(proto::RevokeTokenRequest { token: token.to_owned() })
        .await
        .map_err(status)?
        .into_inner()
        .token
        .unwrap_or_default();
    let view = TokenView::from(revoked);
    print(cli.output, &view, |v| format!("Revoked token {} ({}, {}); it is refused from now on.", v.id, v.name, v.role))
}

#[derive(Serialize)]
struct AuditView {
    id: String,
    time: String,
    unix_ms: i64,
    actor: String,
    role: String,
    protocol: String,
    action: String,
    target: String,
    result: String,
    peer: String,
}

/// `alkictl audit list`.
pub async fn audit(cli: &Cli, cmd: &AuditCmd) -> anyhow::Result<()> {
    let AuditCmd::List { since, actor, limit } = cmd;
    let request = proto::ListAuditRequest {
        since_unix_ms: since.unwrap_or(0),
        actor: actor.clone().unwrap_or_default(),
        limit: *limit,
    };
    let entries = client(cli).await?.list_audit(request).await.map_err(status)?.into_inner().entries;
    let views: Vec<AuditView> = entries
        .into_iter()
        .map(|e| AuditView {
            time: time(e.unix_ms),
            id: e.id,
            unix_ms: e.unix_ms,
            actor: e.actor,
            role: e.role,
            protocol: e.protocol,
            action: e.action,
            target: e.target,
            result: e.result,
            peer: e.peer,
        })
        .collect();
    print(cli.output, &views, |views| {
        let mut t = table(["TIME", "ACTOR", "ROLE", "ACTION", "TARGET", "RESULT"]);
        for v in views {
            t.add_row([&v.time, &v.actor, &v.role, &v.action, &v.target, &v.result]);
        }
        t.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_duration_or_a_time() {
        let now_ms =
            i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis()).expect("fits");
        let hour_ago = parse_since("1h").expect("duration");
        assert!((now_ms - 3_600_000 - hour_ago).abs() < 60_000);
        assert_eq!(parse_since("2026-01-01T00:00:00Z").expect("time"), 1_767_225_600_000);
        assert!(parse_since("yesterday-ish").is_err());
    }
}
