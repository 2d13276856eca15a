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

use keel::{Activity, ActivityContext, Never, Orchestration, OrchestrationContext, OrchestrationError, WorkerBuilder};
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

/// The input may be missing (`null`): the monitor then fails with a clear error.
pub const WEATHER_MONITOR: Orchestration<Option<MonitorRequest>, MonitorOutcome> = Orchestration::new("WeatherMonitor");
pub const GET_IS_CLEAR: Activity<WeatherCheck, bool, Never> = Activity::new("GetIsClear");
pub const SEND_GOOD_WEATHER_ALERT: Activity<String, (), Never> = Activity::new("SendGoodWeatherAlert");

/// Registers `WeatherMonitor`, `GetIsClear` and `SendGoodWeatherAlert`.
pub fn register(worker: WorkerBuilder) -> WorkerBuilder {
    worker
        .orchestration(WEATHER_MONITOR, weather_monitor)
        .activity(GET_IS_CLEAR, get_is_clear)
        .activity(SEND_GOOD_WEATHER_ALERT, send_good_weather_alert)
}

/// The orchestrator: check, then sleep on a durable timer, until clear or expired.
pub async fn weather_monitor(
    ctx: OrchestrationContext,
    request: Option<MonitorRequest>,
) -> Result<MonitorOutcome, OrchestrationError> {
    let missing = |what: &str| OrchestrationError::new("InvalidInput", format!("the monitor request needs a {what}"));
    let request = request.ok_or_else(|| missing("body"))?;
    let location = request.location.clone().ok_or_else(|| missing("location"))?;
    let phone = request.phone.clone().filter(|phone| !phone.is_empty()).ok_or_else(|| missing("phone"))?;
    let interval = request.polling_interval_seconds.map_or(DEFAULT_POLLING_INTERVAL, Duration::from_secs);
    let expiry = request.expiry_seconds.map_or(DEFAULT_EXPIRY, Duration::from_secs);
    let started_at = ctx.current_utc_datetime();

    let mut checks = 0;
    while (ctx.current_utc_datetime() - started_at).to_std().unwrap_or_default() < expiry {
        checks += 1;
        let check = WeatherCheck { location: location.clone(), check: checks };
        let clear = ctx.call(GET_IS_CLEAR, &check).await?;
        ctx.set_custom_status(&serde_json::json!({ "checks": checks, "clear": clear }));
        if clear {
            ctx.call(SEND_GOOD_WEATHER_ALERT, &phone).await?;
            return Ok(MonitorOutcome { checks, alert_sent: true });
        }
        ctx.log(tracing::Level::INFO, format!("not clear yet after {checks} checks; next check in {interval:?}"));
        ctx.sleep(interval).await;
    }
    Ok(MonitorOutcome { checks, alert_sent: false })
}

async fn get_is_clear(ctx: ActivityContext, check: WeatherCheck) -> Result<bool, Never> {
    let clear = !check.location.city.eq_ignore_ascii_case("Seattle") && check.check >= 3;
    tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, city = %check.location.city, clear, "weather checked");
    Ok(clear)
}

async fn send_good_weather_alert(ctx: ActivityContext, phone: String) -> Result<(), Never> {
    tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, %phone, "good weather alert sent");
    Ok(())
}
