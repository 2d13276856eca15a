//! Human interaction: ask for an approval, wait for the `Approval` event at most a
//! while, escalate when nobody answered in time.
//!
//! `cargo run --release -p keel --example approval`

use std::time::Duration;

use keel::{Activity, ActivityContext, Event, Never, Orchestration, OrchestrationContext, OrchestrationError};

const APPROVAL_WORKFLOW: Orchestration<String, String> = Orchestration::new("ApprovalWorkflow");
const REQUEST_APPROVAL: Activity<String, (), Never> = Activity::new("RequestApproval");
const ESCALATE: Activity<String, (), Never> = Activity::new("Escalate");
const APPROVAL: Event<bool> = Event::new("Approval");

async fn approval(ctx: OrchestrationContext, request: String) -> Result<String, OrchestrationError> {
    ctx.call(REQUEST_APPROVAL, &request).await?;
    Ok(match ctx.wait(APPROVAL).timeout(Duration::from_secs(2)).await? {
        Some(true) => "Approved".into(),
        Some(false) => "Rejected".into(),
        None => {
            ctx.call(ESCALATE, &request).await?;
            "Escalated".into()
        }
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let store = keel::store::open(keel::store::DEFAULT_STORE_URL).await?;
    let worker = keel::Worker::builder(store)
        .orchestration(APPROVAL_WORKFLOW, approval)
        .activity(REQUEST_APPROVAL, |_: ActivityContext, request: String| async move {
            println!("asked: {request}");
            Ok(())
        })
        .activity(ESCALATE, |_: ActivityContext, request: String| async move {
            println!("escalated: {request}");
            Ok(())
        })
        .build()
        .start();
    let client = worker.client();
    let answered = client.start(APPROVAL_WORKFLOW, &"new laptop".to_string()).await?;
    client.raise(answered.id(), APPROVAL, &true).await?;
    let ignored = client.start(APPROVAL_WORKFLOW, &"a pony".to_string()).await?;
    println!("{:?}", answered.wait(Duration::from_secs(30)).await?); // Completed("Approved")
    println!("{:?}", ignored.wait(Duration::from_secs(30)).await?); // Completed("Escalated")
    worker.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
