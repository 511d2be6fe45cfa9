//! Console login sessions: a random session id in an http-only, same-site cookie stands for an operator
//! token (kept only as its hash, and checked against the store on every request, so a revocation ends the
//! session at once), with a CSRF token the console sends in a header on every change. In memory and
//! bounded: a controller restart logs consoles out, and the oldest session makes room for a new one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use alki_shared::clock::{SharedClock, UnixMs};
use http::HeaderMap;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

/// The session cookie's name.
pub const COOKIE: &str = "alki_session";
/// The header a state-changing console request carries its session's CSRF token in.
pub const CSRF_HEADER: &str = "x-alki-csrf";
/// How long a login lasts unless `--console-session-ttl` says otherwise: a working day.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Sessions kept at most; the oldest is ended to make room.
pub const MAX_SESSIONS: usize = 10_000;

/// One logged-in console.
#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    /// The operator token's SHA-256, as the store keys it.
    pub token_hash: String,
    /// Sent back by the console in [`CSRF_HEADER`]; a cross-site page cannot read it.
    pub csrf: String,
    pub created: UnixMs,
    pub expires: UnixMs,
}

/// Why a request's session cookie does not admit it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SessionRefusal {
    #[error("the console session has expired or was logged out; log in again")]
    Ended,
    #[error(
        "a change through a console session needs its CSRF token in the {CSRF_HEADER} header (the console \
         sends it; scripts use 'authorization: Bearer <token>' instead)"
    )]
    Csrf,
}

/// The live sessions, keyed by the SHA-256 of their id (the id itself is only in the browser's cookie).
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    ttl: Duration,
    clock: SharedClock,
    /// Logins that opened a session, and logins refused (counted by the login handler).
    pub logins: AtomicU64,
    pub logins_refused: AtomicU64,
}

impl Sessions {
    pub fn new(ttl: Duration, clock: SharedClock) -> Sessions {
        Sessions {
            map: Mutex::new(HashMap::new()),
            ttl,
            clock,
            logins: AtomicU64::new(0),
            logins_refused: AtomicU64::new(0),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Starts a session for a token (by hash) and returns its id, for the cookie, and the session.
    pub fn open(&self, token_hash: String) -> (String, Session) {
        let id = random_hex();
        let now = self.clock.now();
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        let session = Session {
            token_hash,
            csrf: random_hex(),
            created: now,
            expires: UnixMs(now.as_millis().saturating_add(ttl_ms)),
        };
        let mut map = self.lock();
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(key(&id), session.clone());
        self.logins.fetch_add(1, Ordering::Relaxed);
        (id, session)
    }

    /// The live session with this id.
    pub fn get(&self, id: &str) -> Result<Session, SessionRefusal> {
        let now = self.clock.now();
        let mut map = self.lock();
        let k = key(id);
        match map.get(&k) {
            Some(s) if s.expires > now => Ok(s.clone()),
            Some(_) => {
                map.remove(&k);
                Err(SessionRefusal::Ended)
            }
            None => Err(SessionRefusal::Ended),
        }
    }

    /// Ends a session (log out).
    pub fn close(&self, id: &str) {
        self.lock().remove(&key(id));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A plain map: a panic elsewhere cannot leave it in a state worth refusing.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A change (any method but GET and HEAD) must carry the session's CSRF token.
pub fn check_csrf(session: &Session, method: &http::Method, headers: &HeaderMap) -> Result<(), SessionRefusal> {
    if matches!(*method, http::Method::GET | http::Method::HEAD) {
        return Ok(());
    }
    let sent = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
    // Compared as digests, so the time taken says nothing about how much of the token matched.
    if Sha256::digest(sent.as_bytes()) == Sha256::digest(session.csrf.as_bytes()) {
        Ok(())
    } else {
        Err(SessionRefusal::Csrf)
    }
}

/// The session id in a request's `Cookie` headers, if any.
pub fn cookie_session(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|v| !v.is_empty())
}

/// The `Set-Cookie` value that gives the browser a session: http-only (no script reads it), same-site
/// strict (no other site's page sends it), for the whole origin, and `Secure` whenever the controller
/// serves TLS.
pub fn set_cookie(id: &str, ttl: Duration, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}", ttl.as_secs())
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie(secure: bool) -> String {
    set_cookie("", Duration::ZERO, secure)
}

fn key(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alki_shared::clock::ManualClock;

    fn sessions(ttl_secs: u64) -> (Sessions, std::sync::Arc<ManualClock>) {
        let clock = ManualClock::starting_at(UnixMs(1_000));
        (Sessions::new(Duration::from_secs(ttl_secs), clock.clone()), clock)
    }

    #[test]
    fn a_session_lives_until_it_expires_or_is_closed() {
        let (sessions, clock) = sessions(60);
        let (id, session) = sessions.open("hash".into());
        assert_eq!(sessions.get(&id), Ok(session.clone()));
        assert_eq!(sessions.get("not-a-session"), Err(SessionRefusal::Ended));
        clock.advance(Duration::from_secs(61));
        assert_eq!(sessions.get(&id), Err(SessionRefusal::Ended), "expired");
        assert!(sessions.is_empty(), "an expired session is forgotten");
        let (id, _) = sessions.open("hash".into());
        sessions.close(&id);
        assert_eq!(sessions.get(&id), Err(SessionRefusal::Ended), "logged out");
    }

    #[test]
    fn the_oldest_session_makes_room() {
        let (sessions, clock) = sessions(3600);
        let (first, _) = sessions.open("hash".into());
        for _ in 1..MAX_SESSIONS {
            clock.advance(Duration::from_millis(1));
            sessions.open("hash".into());
        }
        assert!(sessions.get(&first).is_ok());
        clock.advance(Duration::from_millis(1));
        let (newest, _) = sessions.open("hash".into());
        assert_eq!(sessions.len(), MAX_SESSIONS);
        assert!(sessions.get(&first).is_err() && sessions.get(&newest).is_ok());
    }

    #[test]
    fn changes_need_the_csrf_token_and_reads_do_not() {
        let (sessions, _) = sessions(60);
        let (_, session) = sessions.open("hash".into());
        let mut headers = HeaderMap::new();
        assert!(check_csrf(&session, &http::Method::GET, &headers).is_ok());
        assert_eq!(check_csrf(&session, &http::Method::POST, &headers), Err(SessionRefusal::Csrf));
        headers.insert(CSRF_HEADER, "wrong".parse().expect("header"));
        assert_eq!(check_csrf(&session, &http::Method::POST, &headers), Err(SessionRefusal::Csrf));
        headers.insert(CSRF_HEADER, session.csrf.parse().expect("header"));
        assert!(check_csrf(&session, &http::Method::POST, &headers).is_ok());
    }

    #[test]
    fn the_cookie_is_found_among_others_and_set_safely() {
        let mut headers = HeaderMap::new();
        headers.append(http::header::COOKIE, "theme=dark; alki_session=abc".parse().expect("header"));
        assert_eq!(cookie_session(&headers), Some("abc".into()));
        assert_eq!(cookie_session(&HeaderMap::new()), None);
        let set = set_cookie("abc", Duration::from_secs(60), true);
        for part in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/", "Max-Age=60"] {
            assert!(set.contains(part), "{set} lacks {part}");
        }
        assert!(!set_cookie("abc", Duration::from_secs(60), false).contains("Secure"));
        assert!(clear_cookie(true).contains("Max-Age=0"));
    }
}
