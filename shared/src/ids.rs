//! Identifier newtypes: devices, rollouts, and desired-state generations.

use std::fmt;

/// A device's identity. Until mTLS lands it is the agent's configured or generated id; afterwards,
/// the certificate's. Limited to a conservative alphabet so it is safe in paths, labels and logs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind} {value:?}: use 1 to 128 characters from a-z, A-Z, 0-9, '.', '_' and '-'")]
pub struct IdError {
    kind: &'static str,
    value: String,
}

fn valid_id(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl DeviceId {
    pub fn new(s: impl Into<String>) -> Result<DeviceId, IdError> {
        let s = s.into();
        if valid_id(&s) { Ok(DeviceId(s)) } else { Err(IdError { kind: "device id", value: s }) }
    }

    /// A fresh random id for an agent that has none configured.
    pub fn generate() -> DeviceId {
        DeviceId(format!("dev-{}", uuid::Uuid::new_v4().simple()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A rollout's identity.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RolloutId(String);

impl RolloutId {
    pub fn new(s: impl Into<String>) -> Result<RolloutId, IdError> {
        let s = s.into();
        if valid_id(&s) { Ok(RolloutId(s)) } else { Err(IdError { kind: "rollout id", value: s }) }
    }

    pub fn generate() -> RolloutId {
        RolloutId(format!("ro-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_newtype_impls {
    ($t:ty) => {
        impl TryFrom<String> for $t {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                <$t>::new(s)
            }
        }
        impl From<$t> for String {
            fn from(id: $t) -> String {
                id.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($t), self.0)
            }
        }
        // Hashes and compares exactly as its string does, so maps keyed by the id are looked up by `&str`
        // (records on the wire and in the store carry ids as strings).
        impl std::borrow::Borrow<str> for $t {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }
    };
}
string_newtype_impls!(DeviceId);
string_newtype_impls!(RolloutId);

/// A desired-state generation: strictly increasing per device, so an agent can tell new from stale.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Generation(pub u64);

impl Generation {
    pub fn next(self) -> Generation {
        Generation(self.0 + 1)
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_looked_up_by_their_string() {
        let mut seen = std::collections::HashMap::new();
        seen.insert(DeviceId::new("pi-1").expect("id"), 1);
        assert_eq!(seen.get("pi-1"), Some(&1));
        assert!(RolloutId::new("ro-1").expect("id") == *"ro-1");
        assert_eq!(Generation(4).next(), Generation(5));
    }

    #[test]
    fn device_ids_are_validated() {
        assert!(DeviceId::new("pi-042.shop_7").is_ok());
        assert!(DeviceId::new("").is_err());
        assert!(DeviceId::new("../etc").is_err());
        assert!(DeviceId::new("a b").is_err());
        assert!(DeviceId::new("x".repeat(129)).is_err());
        assert!(DeviceId::new(DeviceId::generate().to_string()).is_ok());
        assert!(RolloutId::new(RolloutId::generate().to_string()).is_ok());
    }
}
