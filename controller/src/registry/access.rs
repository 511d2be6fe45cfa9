//! Who may reach which repository beyond roles: the caller's scope ([`crate::scope`]), checked for the
//! repository a request names and the one a blob mount takes from; and no deleting a manifest that an
//! active rollout pins, nor its signature tag, unless an admin forces it (`?force=true`). The fleet's side
//! (a device's repositories, the rollouts' pins) comes through [`FleetView`], which the controller
//! implements over its store; the registry alone knows neither.

use std::collections::BTreeSet;

use alki_shared::digest::Digest;
use http::StatusCode;

use super::error::ApiError;
use super::names::Reference;
use crate::auth::{Principal, Role};
use crate::scope::RepoScope;

/// What the registry asks the fleet. Blocking (store reads).
pub trait FleetView: Send + Sync {
    /// The repositories enrolled device `device_id` may read.
    fn device_repositories(&self, device_id: &str) -> Result<BTreeSet<String>, String>;
    /// The manifests of `repository` active rollouts pin (candidates, baselines, eval suites).
    fn pinned(&self, repository: &str) -> Result<BTreeSet<Digest>, String>;
}

/// A registry without a fleet (its own tests): devices reach nothing, nothing is pinned.
pub struct NoFleet;

impl FleetView for NoFleet {
    fn device_repositories(&self, _: &str) -> Result<BTreeSet<String>, String> {
        Ok(BTreeSet::new())
    }
    fn pinned(&self, _: &str) -> Result<BTreeSet<Digest>, String> {
        Ok(BTreeSet::new())
    }
}

/// What one request reaches.
pub struct Reach<'a> {
    pub repository: &'a str,
    /// The repository a cross-repository blob mount takes from.
    pub mount_from: Option<&'a str>,
    /// The manifest or tag a DELETE removes.
    pub deletes: Option<&'a Reference>,
    /// `?force=true` on a DELETE.
    pub force: bool,
}

/// The caller's scope: devices their own repositories, push tokens their patterns, the rest everything.
pub fn scope_of(fleet: &dyn FleetView, principal: &Principal) -> Result<RepoScope, ApiError> {
    if principal.device {
        return fleet.device_repositories(&principal.name).map(RepoScope::Device).map_err(ApiError::internal);
    }
    Ok(if principal.repositories.is_empty() {
        RepoScope::Every
    } else {
        RepoScope::Patterns(principal.repositories.clone())
    })
}

/// Refuses (403 DENIED) a request outside the caller's scope, or deleting what an active rollout pins. `tag`
/// resolves a tag of the repository to its digest. Blocking.
pub fn check(
    fleet: &dyn FleetView,
    principal: &Principal,
    reach: &Reach<'_>,
    tag: impl Fn(&str) -> Option<Digest>,
) -> Result<(), ApiError> {
    let scope = scope_of(fleet, principal)?;
    for repository in std::iter::once(reach.repository).chain(reach.mount_from) {
        if !scope.allows(repository) {
            return Err(denied(format!(
                "{} may not reach repository {repository}: {}",
                principal.actor(),
                match &scope {
                    RepoScope::Device(_) =>
                        "a device reads only the bundles, eval suites and runtime builds it is given",
                    _ => "it is outside the token's repositories (alkictl token list shows them)",
                }
            )));
        }
    }
    let Some(reference) = reach.deletes else { return Ok(()) };
    if reach.force && principal.role == Role::Admin {
        return Ok(());
    }
    let pinned = fleet.pinned(reach.repository).map_err(ApiError::internal)?;
    let hit = match reference {
        Reference::Digest(digest) => pinned.get(digest).cloned().or_else(|| {
            // The signature manifest of a pinned digest, which its `sha256-<hex>.sig` tag names.
            pinned.iter().find(|p| tag(&signature_tag(p)).as_ref() == Some(digest)).cloned()
        }),
        Reference::Tag(name) => pinned.iter().find(|p| *name == signature_tag(p)).cloned(),
    };
    match hit {
        None => Ok(()),
        Some(digest) => Err(denied(format!(
            "{} (or its signature) is pinned by an active rollout in {}; finish or abort the rollout first, or \
             have an admin delete it with ?force=true",
            digest.as_str(),
            reach.repository
        ))),
    }
}

/// The cosign tag a digest's signature is stored under.
fn signature_tag(digest: &Digest) -> String {
    format!("{}.sig", digest.as_str().replacen(':', "-", 1))
}

fn denied(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "DENIED", message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::RepoPattern;

    struct Pins(Digest);

    impl FleetView for Pins {
        fn device_repositories(&self, _: &str) -> Result<BTreeSet<String>, String> {
            Ok(BTreeSet::from(["acme/tiny".to_owned()]))
        }
        fn pinned(&self, _: &str) -> Result<BTreeSet<Digest>, String> {
            Ok(BTreeSet::from([self.0.clone()]))
        }
    }

    fn principal(role: Role, device: bool, patterns: &[&str]) -> Principal {
        let repositories = patterns.iter().map(|p| RepoPattern::parse(p).expect("pattern")).collect();
        Principal { name: "x".into(), role, device, repositories }
    }

    fn digest(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64)).parse().expect("digest")
    }

    #[test]
    fn scopes_and_pins_decide() {
        let fleet = Pins(digest('a'));
        let reach = |repository, mount_from, deletes, force| Reach { repository, mount_from, deletes, force };
        let no_tags = |_: &str| None;
        let ci = principal(Role::Push, false, &["acme/*"]);
        assert!(check(&fleet, &ci, &reach("acme/qwen", None, None, false), no_tags).is_ok());
        assert!(check(&fleet, &ci, &reach("other/qwen", None, None, false), no_tags).is_err());
        assert!(check(&fleet, &ci, &reach("acme/qwen", Some("other/x"), None, false), no_tags).is_err(), "mount");
        let device = principal(Role::Agent, true, &[]);
        assert!(check(&fleet, &device, &reach("acme/tiny", None, None, false), no_tags).is_ok());
        assert!(check(&fleet, &device, &reach("acme/other", None, None, false), no_tags).is_err());

        let pinned = Reference::Digest(digest('a'));
        let error = check(&fleet, &ci, &reach("acme/qwen", None, Some(&pinned), false), no_tags).expect_err("pinned");
        assert_eq!((error.status, error.code), (StatusCode::FORBIDDEN, "DENIED"));
        let sig_tag = Reference::Tag(signature_tag(&digest('a')));
        assert!(check(&fleet, &ci, &reach("acme/qwen", None, Some(&sig_tag), false), no_tags).is_err());
        let sig_manifest = Reference::Digest(digest('e'));
        let tags = |t: &str| (t == signature_tag(&digest('a'))).then(|| digest('e'));
        assert!(check(&fleet, &ci, &reach("acme/qwen", None, Some(&sig_manifest), false), tags).is_err());
        let free = Reference::Digest(digest('b'));
        assert!(check(&fleet, &ci, &reach("acme/qwen", None, Some(&free), false), tags).is_ok());
        assert!(
            check(&fleet, &ci, &reach("acme/qwen", None, Some(&pinned), true), no_tags).is_err(),
            "push cannot force"
        );
        let admin = principal(Role::Admin, false, &[]);
        assert!(check(&fleet, &admin, &reach("acme/qwen", None, Some(&pinned), true), no_tags).is_ok());
    }
}
