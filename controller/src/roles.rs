//! Roles and actions: who a credential is ([`Role`]) and what a caller wants to do ([`Action`]), with the
//! one permission table [`Role::allows`]. A leaf, so the store can keep a token's role without importing
//! the authenticator (which reads the store).

use alki_shared::proto;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
    Push,
    Agent,
}

impl Role {
    pub fn from_proto(role: proto::Role) -> Option<Role> {
        match role {
            proto::Role::Unspecified => None,
            proto::Role::Viewer => Some(Role::Viewer),
            proto::Role::Operator => Some(Role::Operator),
            proto::Role::Admin => Some(Role::Admin),
            proto::Role::Push => Some(Role::Push),
            proto::Role::Agent => Some(Role::Agent),
        }
    }

    pub fn to_proto(self) -> proto::Role {
        match self {
            Role::Viewer => proto::Role::Viewer,
            Role::Operator => proto::Role::Operator,
            Role::Admin => proto::Role::Admin,
            Role::Push => proto::Role::Push,
            Role::Agent => proto::Role::Agent,
        }
    }

    /// The one table of permissions.
    pub fn allows(self, action: Action) -> bool {
        use Action::*;
        match self {
            Role::Admin => true,
            Role::Operator => matches!(action, ReadFleet | WriteFleet | RegistryRead | RegistryWrite),
            Role::Viewer => matches!(action, ReadFleet | RegistryRead),
            Role::Push => matches!(action, RegistryRead | RegistryWrite),
            Role::Agent => matches!(action, AgentSession | RegistryRead),
        }
    }
}

/// What a caller wants to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    ReadFleet,
    WriteFleet,
    ManageTokens,
    /// Reading the audit log: admin only, since it names every credential and device and shows refused attempts.
    ReadAudit,
    RegistryRead,
    RegistryWrite,
    AgentSession,
    /// Adding, removing and testing webhooks: admin only, since a webhook carries the fleet's events (and a
    /// signing secret) to a URL of its own.
    ManageWebhooks,
}
