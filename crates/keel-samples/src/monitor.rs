//! `WeatherMonitor`: the monitor pattern (Durable Functions' `E3_Monitor`). Checks the
//! weather at a location, waits on a durable timer between checks, and sends an alert
//! when the sky is clear — or gives up when the monitor expires.
//!
//! Input: `{"location":{"state":"WA","city":"Redmond"},"phone":"+1-555-0100",
//! "pollingIntervalSeconds":1800,"expirySeconds":21600}` (the interval and expiry are
//! optional: 30 minutes and 6 hours). The weather service double reports a clear sky
//! from the third check on, except in Seattle, where it always rains.
//! Output: `{"checks":N,"alertSent":BOOL}`.

use std::time::Duration;

use keel::{ActivityContext, ActivityError, OrchestrationContext, OrchestrationError, WorkerBuilder};
use serde::{Deserialize, Serialize};

const DEFAULT_POLLING_INTERVAL: Duration = Duration::from_secs(30 * 60);
const DEFAULT_EXPIRY: Duration = Duration::from_secs(6 * 60 * 60);

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MonitorRequest {
    pub location: Option<Location>,
    pub phone: Option<String>,
    pub polling_interval_seconds: Option<u64>,
    pub expiry_seconds: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Location {
    pub state: String,
    pub city: String,
}

/// One weather check: where, and which check of the monitor it is.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WeatherCheck {
    pub location: Location,
    pub check: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MonitorOutcome {
    pub checks: u32,
    pub alert_sent: bool,
}

/// Registers `WeatherMonitor`, `GetIsClear` and `SendGoodWeatherAlert`.
pub fn register(worker: WorkerBuilder) -> WorkerBuilder {
    worker
        .orchestrator("WeatherMonitor", weather_monitor)
        .activity("GetIsClear", get_is_clear)
        .activity("SendGoodWeatherAlert", send_good_weather_alert)
}

/// The orchestrator: check, then sleep on a durable timer, until clear or expired.
pub async fn weather_monitor(ctx: OrchestrationContext) -> Result<MonitorOutcome, OrchestrationError> {
    let request: Option<MonitorRequest> = ctx.input()?;
    let missing = |what: &str| OrchestrationError::new("InvalidInput", format!("the monitor request needs a {what}"));
    let request = request.ok_or_else(|| missing("body"))?;
    let location = request.location.clone().ok_or_else(|| missing("location"))?;
    let phone = request.phone.clone().filter(|phone| !phone.is_empty()).ok_or_else(|| missing("phone"))?;
    let interval = request.polling_interval_seconds.map_or(DEFAULT_POLLING_INTERVAL, Duration::from_secs);
    let expiry = request.expiry_seconds.map_or(DEFAULT_EXPIRY, Duration::from_secs);
    let expires_at = ctx.current_utc_datetime() + to_chrono(expiry);

    let mut checks = 0;
    while ctx.current_utc_datetime() < expires_at {
        checks += 1;
        let check = WeatherCheck { location: location.clone(), check: checks };
        let clear: bool = ctx.call_activity("GetIsClear", &check).await?;
        ctx.set_custom_status(&serde_json::json!({ "checks": checks, "clear": clear }));
        if clear {
            ctx.call_activity::<()>("SendGoodWeatherAlert", &phone).await?;
            return Ok(MonitorOutcome { checks, alert_sent: true });
        }
        ctx.log(tracing::Level::INFO, format!("not clear yet after {checks} checks; next check in {interval:?}"));
        ctx.create_timer(ctx.current_utc_datetime() + to_chrono(interval)).await;
    }
    Ok(MonitorOutcome { checks, alert_sent: false })
}

fn to_chrono(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

async fn get_is_clear(ctx: ActivityContext, check: WeatherCheck) -> Result<bool, ActivityError> {
    let clear = !check.location.city.eq_ignore_ascii_case("Seattle") && check.check >= 3;
    tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, city = %check.location.city, clear, "weather checked");
    Ok(clear)
}

async fn send_good_weather_alert(ctx: ActivityContext, phone: String) -> Result<(), ActivityError> {
    tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, %phone, "good weather alert sent");
    Ok(())
}
