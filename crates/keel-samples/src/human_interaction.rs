//! `ApprovalWorkflow`: human interaction. Asks for an approval, then waits for the
//! `Approval` event (a JSON boolean) at most `timeoutSeconds`; without an answer in
//! time the request is escalated.
//!
//! Input: `{"request":"new laptop","approver":"grace@example.com","timeoutSeconds":3600}`
//! (`timeoutSeconds` is optional: one hour). Output: `"Approved"`, `"Rejected"` or
//! `"Escalated"`. Approve with
//! `POST /runtime/webhooks/durabletask/instances/{id}/raiseEvent/Approval` and body `true`.

use std::time::Duration;

use keel::{
    Activity, ActivityContext, Event, Never, Orchestration, OrchestrationContext, OrchestrationError, WorkerBuilder,
};
use serde::{Deserialize, Serialize};

pub const APPROVAL_WORKFLOW: Orchestration<ApprovalRequest, String> = Orchestration::new("ApprovalWorkflow");
pub const REQUEST_APPROVAL: Activity<ApprovalRequest, (), Never> = Activity::new("RequestApproval");
pub const ESCALATE: Activity<ApprovalRequest, (), Never> = Activity::new("Escalate");
/// The event that carries the approver's answer.
pub const APPROVAL: Event<bool> = Event::new("Approval");

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60 * 60);

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRequest {
    pub request: String,
    pub approver: Option<String>,
    pub timeout_seconds: Option<f64>,
}

/// Registers `ApprovalWorkflow`, `RequestApproval` and `Escalate`.
pub fn register(worker: WorkerBuilder) -> WorkerBuilder {
    worker
        .orchestration(APPROVAL_WORKFLOW, approval_workflow)
        .activity(REQUEST_APPROVAL, request_approval)
        .activity(ESCALATE, escalate)
}

/// The orchestrator: request, then wait for the answer or the deadline.
pub async fn approval_workflow(
    ctx: OrchestrationContext,
    request: ApprovalRequest,
) -> Result<String, OrchestrationError> {
    let timeout = match request.timeout_seconds {
        Some(seconds) => Duration::try_from_secs_f64(seconds)
            .map_err(|_| OrchestrationError::new("InvalidInput", "timeoutSeconds must be a positive number"))?,
        None => DEFAULT_TIMEOUT,
    };
    ctx.call(REQUEST_APPROVAL, &request).await?;
    ctx.set_custom_status(&"waiting for approval");
    let outcome = match ctx.wait(APPROVAL).timeout(timeout).await? {
        Some(true) => "Approved",
        Some(false) => "Rejected",
        None => {
            ctx.call(ESCALATE, &request).await?;
            "Escalated"
        }
    };
    ctx.set_custom_status(&outcome);
    Ok(outcome.to_string())
}

async fn request_approval(ctx: ActivityContext, request: ApprovalRequest) -> Result<(), Never> {
    tracing::info!(
        instance_id = %ctx.instance_id,
        function = %ctx.name,
        request = %request.request,
        approver = request.approver.as_deref().unwrap_or("(anyone)"),
        "approval requested"
    );
    Ok(())
}

async fn escalate(ctx: ActivityContext, request: ApprovalRequest) -> Result<(), Never> {
    tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, request = %request.request, "escalated");
    Ok(())
}
