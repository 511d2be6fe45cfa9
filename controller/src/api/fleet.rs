//! `FleetService`: what operators, CI and dashboards ask of the controller.

use std::sync::Arc;

use alki_shared::bundle::VariantInfo;
use alki_shared::oci::Manifest;
use alki_shared::proto::{self, fleet_service_server::FleetService};
use tonic::{Request, Response, Status};

use crate::auth::{Action, Authenticator, Role};
use crate::fleet::Fleet;
use crate::registry::{ManifestEntry, Registry};
use crate::rollout::engine::Verb;
use crate::rollout::{self, CreateError, OperateError};

pub struct FleetApi {
    pub fleet: Fleet,
    pub auth: Authenticator,
    pub registry: Arc<Registry>,
    /// host:port agents use to reach the embedded registry.
    pub registry_host: String,
    /// External registries rollouts may name (see `rollout::external`).
    pub external_registries: Arc<[crate::config::ExternalRegistry]>,
    /// Keys a rollout candidate must be signed with (see `trust`).
    pub trusted_keys: Arc<[alki_shared::signing::PublicKey]>,
}

#[tonic::async_trait]
impl FleetService for FleetApi {
    async fn list_devices(
        &self,
        request: Request<proto::ListDevicesRequest>,
    ) -> Result<Response<proto::ListDevicesResponse>, Status> {
        super::authorize(&self.auth, &request, Action::ReadFleet)?;
        let devices = self.fleet.devices(&request.get_ref().selector).map_err(super::internal)?;
        Ok(Response::new(proto::ListDevicesResponse { devices }))
    }

    async fn get_device(&self, request: Request<proto::GetDeviceRequest>) -> Result<Response<proto::Device>, Status> {
        super::authorize(&self.auth, &request, Action::ReadFleet)?;
        let id = &request.get_ref().id;
        match self.fleet.device(id).map_err(super::internal)? {
            Some(device) => Ok(Response::new(device)),
            None => Err(Status::not_found(format!("device {id:?} is not known to this controller"))),
        }
    }

    async fn list_bundles(
        &self,
        request: Request<proto::ListBundlesRequest>,
    ) -> Result<Response<proto::ListBundlesResponse>, Status> {
        super::authorize(&self.auth, &request, Action::ReadFleet)?;
        let repository = Some(request.into_inner().repository).filter(|r| !r.is_empty());
        // Reading the index and the manifests is blocking file and database I/O.
        let registry = self.registry.clone();
        let keys = self.trusted_keys.clone();
        let store = self.fleet.store.clone();
        let bundles = tokio::task::spawn_blocking(move || {
            let entries = registry.manifests(repository.as_deref()).map_err(super::internal)?;
            let mut bundles = bundles_from(&registry, &entries, &keys);
            bundles.extend(external_bundles(&store, repository.as_deref()).map_err(super::internal)?);
            Ok::<_, Status>(bundles)
        })
        .await
        .map_err(super::internal)??;
        Ok(Response::new(proto::ListBundlesResponse { bundles }))
    }

    async fn create_rollout(
        &self,
        request: Request<proto::CreateRolloutRequest>,
    ) -> Result<Response<proto::Rollout>, Status> {
        let principal = super::authorize(&self.auth, &request, Action::WriteFleet)?;
        let request = request.into_inner();
        let spec = request.spec.ok_or_else(|| Status::invalid_argument("a rollout needs a spec"))?;
        crate::limits::check_labels("rollout selector", spec.selector.iter())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let check =
            crate::trust::check_candidate(&self.registry, &self.external_registries, &self.trusted_keys, &spec).await;
        let overridden = match check {
            Ok(_) => None,
            Err(e) if request.override_signature_check => {
                if request.override_reason.trim().is_empty() {
                    return Err(Status::invalid_argument(
                        "overriding the signature check needs a reason (alkictl rollout create --reason \"...\"); it is \
                         kept in the rollout's events",
                    ));
                }
                Some(e.to_string())
            }
            Err(e @ crate::trust::CandidateError::Read { .. }) => return Err(Status::unavailable(e.to_string())),
            Err(e) => return Err(Status::failed_precondition(e.to_string())),
        };
        let created = rollout::create_any(
            &self.fleet,
            &self.registry,
            &self.registry_host,
            &self.external_registries,
            spec,
            crate::now_unix_ms(),
        )
        .await;
        match created {
            Ok(r) => {
                tracing::info!(rollout_id = %r.id, by = %principal.name, "Rollout created.");
                if let Some(problem) = overridden {
                    let (fleet, id, by, reason) =
                        (self.fleet.clone(), r.id.clone(), principal.name.clone(), request.override_reason.clone());
                    tokio::task::spawn_blocking(move || {
                        crate::trust::record_override(&fleet, &id, &by, &reason, &problem, crate::now_unix_ms())
                    })
                    .await
                    .map_err(super::internal)?
                    .map_err(super::internal)?;
                }
                Ok(Response::new(r))
            }
            Err(e @ CreateError::Invalid(_)) => Err(Status::invalid_argument(e.to_string())),
            Err(e @ CreateError::BundleNotFound { .. }) => Err(Status::not_found(e.to_string())),
            Err(e @ CreateError::Conflict { .. }) => Err(Status::failed_precondition(e.to_string())),
            Err(e @ CreateError::External(_)) => Err(Status::unavailable(e.to_string())),
            Err(e) => Err(super::internal(e)),
        }
    }

    async fn get_rollout(
        &self,
        request: Request<proto::GetRolloutRequest>,
    ) -> Result<Response<proto::Rollout>, Status> {
        super::authorize(&self.auth, &request, Action::ReadFleet)?;
        let id = &request.get_ref().id;
        match self.fleet.store.rollout(id).map_err(super::internal)? {
            Some(r) => Ok(Response::new(r)),
            None => Err(Status::not_found(format!("rollout {id:?} does not exist"))),
        }
    }

    async fn list_rollouts(
        &self,
        request: Request<proto::ListRolloutsRequest>,
    ) -> Result<Response<proto::ListRolloutsResponse>, Status> {
        super::authorize(&self.auth, &request, Action::ReadFleet)?;
        let mut rollouts = self.fleet.store.rollouts().map_err(super::internal)?;
        rollouts.sort_by_key(|r| std::cmp::Reverse(r.created_unix_ms));
        Ok(Response::new(proto::ListRolloutsResponse { rollouts }))
    }

    async fn pause_rollout(
        &self,
        request: Request<proto::RolloutActionRequest>,
    ) -> Result<Response<proto::Rollout>, Status> {
        self.operate(request, Verb::Pause).await
    }

    async fn resume_rollout(
        &self,
        request: Request<proto::RolloutActionRequest>,
    ) -> Result<Response<proto::Rollout>, Status> {
        self.operate(request, Verb::Resume).await
    }

    async fn promote_rollout(
        &self,
        request: Request<proto::RolloutActionRequest>,
    ) -> Result<Response<proto::Rollout>, Status> {
        self.operate(request, Verb::Promote).await
    }

    async fn abort_rollout(
        &self,
        request: Request<proto::RolloutActionRequest>,
    ) -> Result<Response<proto::Rollout>, Status> {
        self.operate(request, Verb::Abort).await
    }

    async fn retry_rollout(
        &self,
        request: Request<proto::RolloutActionRequest>,
    ) -> Result<Response<proto::Rollout>, Status> {
        self.operate(request, Verb::Retry).await
    }

    async fn list_rollout_events(
        &self,
        request: Request<proto::ListRolloutEventsRequest>,
    ) -> Result<Response<proto::ListRolloutEventsResponse>, Status> {
        super::authorize(&self.auth, &request, Action::ReadFleet)?;
        let req = request.into_inner();
        self.require_rollout(&req.id)?;
        let events = self.fleet.store.rollout_events(&req.id, req.after_seq).map_err(super::internal)?;
        Ok(Response::new(proto::ListRolloutEventsResponse { events }))
    }

    async fn list_rollout_devices(
        &self,
        request: Request<proto::ListRolloutDevicesRequest>,
    ) -> Result<Response<proto::ListRolloutDevicesResponse>, Status> {
        super::authorize(&self.auth, &request, Action::ReadFleet)?;
        let id = request.into_inner().id;
        self.require_rollout(&id)?;
        let devices = self.fleet.store.rollout_devices(&id).map_err(super::internal)?;
        Ok(Response::new(proto::ListRolloutDevicesResponse { devices }))
    }

    async fn create_token(
        &self,
        request: Request<proto::CreateTokenRequest>,
    ) -> Result<Response<proto::CreateTokenResponse>, Status> {
        let principal = super::authorize(&self.auth, &request, Action::ManageTokens)?;
        let req = request.into_inner();
        let role = proto::Role::try_from(req.role)
            .ok()
            .and_then(Role::from_proto)
            .ok_or_else(|| Status::invalid_argument("choose a role: viewer, operator, admin, push or agent"))?;
        let (auth, name) = (self.auth.clone(), req.name.clone());
        let token = tokio::task::spawn_blocking(move || auth.create_token(&name, role))
            .await
            .map_err(super::internal)?
            .map_err(super::token_status)?;
        tracing::info!(name = %req.name, ?role, by = %principal.name, "Token created.");
        Ok(Response::new(proto::CreateTokenResponse { token, name: req.name, role: role.to_proto() as i32 }))
    }
}

impl FleetApi {
    fn require_rollout(&self, id: &str) -> Result<(), Status> {
        match self.fleet.store.rollout(id).map_err(super::internal)? {
            Some(_) => Ok(()),
            None => Err(Status::not_found(format!("rollout {id:?} does not exist; alkictl rollout list shows them"))),
        }
    }

    async fn operate(
        &self,
        request: Request<proto::RolloutActionRequest>,
        verb: Verb,
    ) -> Result<Response<proto::Rollout>, Status> {
        let principal = super::authorize(&self.auth, &request, Action::WriteFleet)?;
        let req = request.into_inner();
        let fleet = self.fleet.clone();
        let reason = if req.reason.is_empty() { format!("by {}", principal.name) } else { req.reason.clone() };
        let id = req.id.clone();
        let result =
            tokio::task::spawn_blocking(move || rollout::operate(&fleet, &id, verb, &reason, crate::now_unix_ms()))
                .await
                .map_err(super::internal)?;
        match result {
            Ok(r) => {
                tracing::info!(rollout_id = %r.id, verb = verb.label(), by = %principal.name, "Rollout verb applied.");
                Ok(Response::new(r))
            }
            Err(e @ OperateError::NotFound(_)) => Err(Status::not_found(e.to_string())),
            Err(e @ OperateError::Verb(_)) => Err(Status::failed_precondition(e.to_string())),
            Err(e) => Err(super::internal(e)),
        }
    }
}

/// The variants and total weight size of a bundle manifest: an index whose entries carry quantizations, or
/// a single ModelPack manifest. None for anything else (signatures, runtime builds, other artifacts).
pub(crate) fn summarize(manifest: &Manifest) -> Option<(Vec<proto::Variant>, u64)> {
    match manifest {
        Manifest::Index(index) => {
            let variants: Vec<VariantInfo> = alki_shared::bundle::variants(index);
            if variants.iter().all(|v| v.quantization.is_empty()) {
                return None;
            }
            let total = variants.iter().map(|v| v.weights_bytes).sum();
            let variants = variants
                .into_iter()
                .map(|v| proto::Variant {
                    digest: v.descriptor.digest.to_string(),
                    name: v.model_name,
                    architecture: v.architecture,
                    quantization: v.quantization,
                    size: v.weights_bytes,
                })
                .collect();
            Some((variants, total))
        }
        Manifest::Image(image) => (image.artifact_type.as_deref() == Some(alki_shared::bundle::ARTIFACT_TYPE_MODEL))
            .then(|| (Vec::new(), image.layers.iter().map(|l| l.size).sum())),
    }
}

/// The bundles of external registries the controller has pinned for rollouts, in `repository` if given
/// (either the repository inside the registry or `host/repository`).
pub(crate) fn external_bundles(
    store: &crate::store::Store,
    repository: Option<&str>,
) -> Result<Vec<proto::Bundle>, crate::store::StoreError> {
    let mut bundles = store.external_bundles()?;
    if let Some(wanted) = repository {
        bundles.retain(|b| b.repository == wanted || format!("{}/{}", b.registry, b.repository) == wanted);
    }
    bundles.sort_by(|a, b| {
        (&a.registry, &a.repository, b.pushed_unix_ms).cmp(&(&b.registry, &b.repository, a.pushed_unix_ms))
    });
    Ok(bundles)
}

/// Bundles are the model manifests and indexes in the registry (signatures and other artifacts are not).
/// Variant manifests listed by an index are shown inside it, not on their own.
pub(crate) fn bundles_from(
    registry: &Registry,
    entries: &[ManifestEntry],
    keys: &[alki_shared::signing::PublicKey],
) -> Vec<proto::Bundle> {
    let mut in_index = std::collections::HashSet::new();
    let mut bundles = Vec::new();
    for entry in entries {
        let Ok(Some(stored)) = registry.resolve(&entry.repository, entry.digest.as_str()) else { continue };
        let Ok(manifest) = Manifest::parse(&stored.bytes, Some(&stored.media_type)) else { continue };
        match &manifest {
            Manifest::Index(index) => {
                in_index.extend(index.manifests.iter().map(|d| (entry.repository.clone(), d.digest.clone())));
            }
            Manifest::Image(_) => {}
        }
        let Some((variants, total_size)) = summarize(&manifest) else { continue };
        bundles.push(proto::Bundle {
            repository: entry.repository.clone(),
            digest: entry.digest.to_string(),
            tags: entry.tags.clone(),
            media_type: entry.media_type.clone(),
            total_size,
            pushed_unix_ms: entry.pushed_unix_ms,
            signatures: crate::trust::signature_infos(
                &entry.digest,
                &crate::trust::embedded_signatures(registry, &entry.repository, &entry.digest),
                keys,
            ),
            variants,
            registry: String::new(),
        });
    }
    bundles.retain(|b| {
        !b.digest.parse().is_ok_and(|d: alki_shared::digest::Digest| in_index.contains(&(b.repository.clone(), d)))
    });
    bundles.sort_by(|a, b| (&a.repository, b.pushed_unix_ms).cmp(&(&b.repository, a.pushed_unix_ms)));
    bundles
}
