//! The HTTP client for calls the controller makes to URLs an admin configured (event webhooks, external
//! gates): it follows no redirect (a receiver cannot send a signed request somewhere the admin did not name),
//! every call has a deadline, and it says who calls.

use std::time::Duration;

/// A client for admin-configured URLs with `timeout` per call (connection included).
pub fn client(timeout: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .user_agent(concat!("alki-controller/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("the outbound HTTP client: {e}"))
}
