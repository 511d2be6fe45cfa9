//! `alkictl token create|list|revoke` and `alkictl audit list`: access tokens and the audit log (admin only).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use alki_shared::proto;
use alki_shared::text::printable;
use clap::{Subcommand, ValueEnum};
use serde::Serialize;

use crate::connection::{Connection, status};
use crate::output::{Output, print, rfc3339, table};

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a token; it is printed once and never again.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
        /// For role push, required: a repository it may push to and read (acme/qwen), everything under a
        /// prefix (acme/*), or * for every repository. Repeat for several.
        #[arg(long = "repo", value_name = "PATTERN")]
        repositories: Vec<String>,
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

impl From<RoleArg> for proto::Role {
    fn from(role: RoleArg) -> proto::Role {
        match role {
            RoleArg::Viewer => proto::Role::Viewer,
            RoleArg::Operator => proto::Role::Operator,
            RoleArg::Admin => proto::Role::Admin,
            RoleArg::Push => proto::Role::Push,
            RoleArg::Agent => proto::Role::Agent,
        }
    }
}

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

#[derive(Serialize)]
struct TokenView {
    id: String,
    name: String,
    role: String,
    created: String,
    /// Empty while the token is valid.
    revoked: String,
    /// A push token's repository patterns; empty: every repository.
    repositories: Vec<String>,
}

impl From<proto::TokenInfo> for TokenView {
    fn from(t: proto::TokenInfo) -> TokenView {
        TokenView {
            id: t.id,
            name: t.name,
            role: role_name(t.role),
            created: rfc3339(t.created_unix_ms),
            revoked: if t.revoked_unix_ms == 0 { String::new() } else { rfc3339(t.revoked_unix_ms) },
            repositories: t.repositories,
        }
    }
}

fn role_name(role: i32) -> String {
    let role = proto::Role::try_from(role).unwrap_or_default();
    role.as_str_name().trim_start_matches("ROLE_").to_lowercase()
}

/// Runs one `alkictl token` command.
pub async fn run_token(connection: &Connection, output: Output, cmd: TokenCmd) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create { name, role, repositories } => {
            token_create(connection, output, name, role.into(), repositories).await
        }
        TokenCmd::List => token_list(connection, output).await,
        TokenCmd::Revoke { which } => token_revoke(connection, output, which).await,
    }
}

async fn token_create(
    connection: &Connection,
    output: Output,
    name: String,
    role: proto::Role,
    repositories: Vec<String>,
) -> anyhow::Result<()> {
    let created = connection
        .fleet()
        .await?
        .create_token(proto::CreateTokenRequest { name, role: role as i32, repositories })
        .await
        .map_err(status)?
        .into_inner();
    #[derive(Serialize)]
    struct Created {
        name: String,
        role: String,
        token: String,
        repositories: Vec<String>,
    }
    let role = format!("{role:?}").to_lowercase();
    let view = Created { name: created.name, role, token: created.token, repositories: created.repositories };
    print(output, &view, |t| t.token.clone())
}

async fn token_list(connection: &Connection, output: Output) -> anyhow::Result<()> {
    let tokens = connection.admin().await?.list_tokens(proto::ListTokensRequest {}).await.map_err(status)?.into_inner();
    let views: Vec<TokenView> = tokens.tokens.into_iter().map(TokenView::from).collect();
    print(output, &views, |views| {
        let mut t = table(["ID", "NAME", "ROLE", "REPOSITORIES", "CREATED", "REVOKED"]);
        for v in views {
            let repositories = if v.repositories.is_empty() { "*".to_owned() } else { v.repositories.join(",") };
            t.add_row([&v.id, &v.name, &v.role, &repositories, &v.created, &v.revoked]);
        }
        t.to_string()
    })
}

async fn token_revoke(connection: &Connection, output: Output, token: String) -> anyhow::Result<()> {
    let revoked = connection
        .admin()
        .await?
        .revoke_token(proto::RevokeTokenRequest { token })
        .await
        .map_err(status)?
        .into_inner()
        .token
        .unwrap_or_default();
    let view = TokenView::from(revoked);
    print(output, &view, |v| format!("Revoked token {} ({}, {}); it is refused from now on.", v.id, v.name, v.role))
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

/// Runs `alkictl audit list`.
pub async fn run_audit(connection: &Connection, output: Output, cmd: AuditCmd) -> anyhow::Result<()> {
    let AuditCmd::List { since, actor, limit } = cmd;
    let request =
        proto::ListAuditRequest { since_unix_ms: since.unwrap_or(0), actor: actor.unwrap_or_default(), limit };
    let entries = connection.admin().await?.list_audit(request).await.map_err(status)?.into_inner().entries;
    let views: Vec<AuditView> = entries
        .into_iter()
        .map(|e| AuditView {
            time: rfc3339(e.unix_ms),
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
    print(output, &views, |views| {
        let mut t = table(["TIME", "ACTOR", "ROLE", "ACTION", "TARGET", "RESULT", "PEER"]);
        for v in views {
            // Entries name what callers sent: never let a control character reach the terminal.
            let cells = [&v.actor, &v.role, &v.action, &v.target, &v.result, &v.peer].map(|c| printable(c, 256));
            let [actor, role, action, target, result, peer] = cells;
            t.add_row([v.time.clone(), actor, role, action, target, result, peer]);
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
