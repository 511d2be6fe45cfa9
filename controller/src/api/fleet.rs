//! `FleetService`: what operators, CI and dashboards ask of the controller.

use alki_shared::ids::{DeviceId, RolloutId};
use alki_shared::proto::{self, fleet_service_server::FleetService};
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::auth::Role;
use crate::bundles::ListError;
use crate::fleet::labels;
use crate::rollout::create::{self, CreateError};
use crate::rollout::engine::Verb;
use crate::rollout::reconcile::{self, OperateError};
use crate::store::Keyed;
use crate::trust::CandidateError;

pub struct FleetApi {
    pub app: App,
}

#[tonic::async_trait]
impl FleetService for FleetApi {
    async fn list_devices(
        &self,
        request: Request<proto::ListDevicesRequest>,
    ) -> Result<Response<proto::ListDevicesResponse>, Status> {
        super::principal(&request)?;
        let devices = self.app.fleet.devices(&request.get_ref().selector).map_err(super::internal)?;
        let total = u32::try_from(devices.len()).unwrap_or(u32::MAX);
        Ok(Response::new(proto::ListDevicesResponse { devices, total }))
    }

    async fn get_device(&self, request: Request<proto::GetDeviceRequest>) -> Result<Response<proto::Device>, Status> {
        super::principal(&request)?;
        let id = &request.get_ref().id;
        let not_found = || Status::not_found(format!("device {id:?} is not known to this controller"));
        // An id that does not parse names no device.
        let device_id = DeviceId::new(id.clone()).map_err(|_| not_found())?;
        match self.app.fleet.device(&device_id).map_err(super::internal)? {
            Some(device) => Ok(Response::new(device)),
            None => Err(not_found()),
        }
    }

    async fn label_device(
        &self,
        request: Request<proto::LabelDeviceRequest>,
    ) -> Result<Response<proto::Device>, Status> {
        let who = super::principal(&request)?;
        let req = request.into_inner();
        let change = labels::Change::parse(req.set, req.remove).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let not_found = || Status::not_found(format!("device {:?} is not known to this controller", req.device_id));
        let device_id = DeviceId::new(req.device_id.clone()).map_err(|_| not_found())?;
        let (id, trust) = (device_id.clone(), self.app.label_trust.clone());
        let labelled = super::with_store(&self.app.store, move |store| labels::relabel(store, &id, &change, &trust))
            .await?
            .ok_or_else(not_found)?
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(%device_id, by = %who.name, labels = ?labelled.labels, "Labelled a device.");
        let welcome = self.app.welcome(&device_id, &labelled.labels);
        self.app.fleet.hub.send(device_id.as_str(), proto::controller_message::Msg::Welcome(welcome));
        self.app.fleet.changed.notify_one();
        Ok(Response::new(labelled))
    }

    async fn list_bundles(
        &self,
        request: Request<proto::ListBundlesRequest>,
    ) -> Result<Response<proto::ListBundlesResponse>, Status> {
        super::principal(&request)?;
        let repository = Some(request.into_inner().repository).filter(|r| !r.is_empty());
        let app = self.app.clone();
        // Reading the index and the manifests is blocking file and database I/O.
        let bundles = super::blocking(move || {
            let sources = &app.sources;
            crate::bundles::list(&sources.registry, &app.store, &sources.trusted_keys, repository.as_deref())
        })
        .await?
        .map_err(|e: ListError| super::internal(e))?;
        Ok(Response::new(proto::ListBundlesResponse { bundles }))
    }

    async fn create_rollout(
        &self,
        request: Request<proto::CreateRolloutRequest>,
    ) -> Result<Response<proto::Rollout>, Status> {
        let principal = super::principal(&request)?;
        let request = request.into_inner();
        let spec = request.spec.ok_or_else(|| Status::invalid_argument("a rollout needs a spec"))?;
        let create = create::Request {
            spec,
            override_signature_check: request.override_signature_check,
            override_reason: request.override_reason,
            by: principal.name.clone(),
        };
        let now = self.app.clock.now();
        let created = create::create(&self.app.rollouts, &self.app.sources, create, now).await;
        let rollout = created.map_err(create_status)?;
        tracing::info!(rollout_id = %rollout.id, by = %principal.name, "Rollout created.");
        Ok(Response::new(rollout))
    }

    async fn get_rollout(
        &self,
        request: Request<proto::GetRolloutRequest>,
    ) -> Result<Response<proto::Rollout>, Status> {
        super::principal(&request)?;
        let id = &request.get_ref().id;
        let not_found = || Status::not_found(format!("rollout {id:?} does not exist"));
        // An id that does not parse names no rollout.
        let rollout_id = RolloutId::new(id.clone()).map_err(|_| not_found())?;
        match self.app.store.rollout(&rollout_id).map_err(super::internal)? {
            Some(r) => Ok(Response::new(r)),
            None => Err(not_found()),
        }
    }

    async fn list_rollouts(
        &self,
        request: Request<proto::ListRolloutsRequest>,
    ) -> Result<Response<proto::ListRolloutsResponse>, Status> {
        super::principal(&request)?;
        let stored = self.app.store.rollouts().map_err(super::internal)?;
        let mut rollouts: Vec<proto::Rollout> = stored.into_iter().map(Keyed::into_record).collect();
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
        super::principal(&request)?;
        let req = request.into_inner();
        let id = self.require_rollout(&req.id)?;
        let events = self.app.store.rollout_events(&id, req.after_seq).map_err(super::internal)?;
        Ok(Response::new(proto::ListRolloutEventsResponse { events }))
    }

    async fn list_rollout_devices(
        &self,
        request: Request<proto::ListRolloutDevicesRequest>,
    ) -> Result<Response<proto::ListRolloutDevicesResponse>, Status> {
        super::principal(&request)?;
        let id = self.require_rollout(&request.into_inner().id)?;
        let stored = self.app.store.rollout_devices(&id).map_err(super::internal)?;
        let devices = stored.into_iter().map(Keyed::into_record).collect();
        Ok(Response::new(proto::ListRolloutDevicesResponse { devices }))
    }

    async fn create_token(
        &self,
        request: Request<proto::CreateTokenRequest>,
    ) -> Result<Response<proto::CreateTokenResponse>, Status> {
        let principal = super::principal(&request)?;
        let req = request.into_inner();
        let role = proto::Role::try_from(req.role)
            .ok()
            .and_then(Role::from_proto)
            .ok_or_else(|| Status::invalid_argument("choose a role: viewer, operator, admin, push or agent"))?;
        let (auth, name, repositories) = (self.app.auth.clone(), req.name.clone(), req.repositories.clone());
        let token = super::blocking(move || auth.create_token(&name, role, &repositories))
            .await?
            .map_err(super::token_status)?;
        tracing::info!(name = %req.name, ?role, repositories = ?req.repositories, by = %principal.name, "Token created.");
        Ok(Response::new(proto::CreateTokenResponse {
            token,
            name: req.name,
            role: role.to_proto() as i32,
            repositories: req.repositories,
        }))
    }
}

impl FleetApi {
    /// The rollout the request names, if it exists.
    fn require_rollout(&self, id: &str) -> Result<RolloutId, Status> {
        let not_found = || Status::not_found(format!("rollout {id:?} does not exist; alkictl rollout list shows them"));
        // An id that does not parse names no rollout.
        let rollout_id = RolloutId::new(id).map_err(|_| not_found())?;
        match self.app.store.rollout(&rollout_id).map_err(super::internal)? {
            Some(_) => Ok(rollout_id),
            None => Err(not_found()),
        }
    }

    async fn operate(
        &self,
        request: Request<proto::RolloutActionRequest>,
        verb: Verb,
    ) -> Result<Response<proto::Rollout>, Status> {
        let principal = super::principal(&request)?;
        let req = request.into_inner();
        let (rollouts, now) = (self.app.rollouts.clone(), self.app.clock.now());
        let operate = move || reconcile::operate_by(&rollouts, &req.id, verb, &req.reason, &principal.name, now);
        let rollout = super::blocking(operate).await?.map_err(operate_status)?;
        Ok(Response::new(rollout))
    }
}

fn create_status(error: CreateError) -> Status {
    match error {
        e @ (CreateError::Invalid(_) | CreateError::Refused(_)) => Status::invalid_argument(e.to_string()),
        CreateError::Signature(e @ CandidateError::Read { .. }) => Status::unavailable(e.to_string()),
        CreateError::Signature(e) => Status::failed_precondition(e.to_string()),
        e @ CreateError::BundleNotFound { .. } => Status::not_found(e.to_string()),
        e @ CreateError::Conflict { .. } => Status::failed_precondition(e.to_string()),
        e @ CreateError::External(_) => Status::unavailable(e.to_string()),
        CreateError::Suite(e) => super::suite_status(e),
        e => super::internal(e),
    }
}

fn operate_status(error: OperateError) -> Status {
    match error {
        e @ OperateError::NotFound(_) => Status::not_found(e.to_string()),
        e @ OperateError::Verb(_) => Status::failed_precondition(e.to_string()),
        e => super::internal(e),
    }
}
