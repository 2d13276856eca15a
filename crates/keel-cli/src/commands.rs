//! The client subcommands: each one is a call on a running host's management API
//! (instances, and entities for `keel entity …`), printed as a table or, with `--json`,
//! as the host's JSON.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hyper::{Method, StatusCode};
use keel_http::management::CONTINUATION_HEADER;
use keel_http::{percent_encode, MANAGEMENT_BASE_PATH as API};
use serde_json::{json, Value};

use crate::output;
use crate::remote::Remote;

/// How often `wait` asks, and how often it reports progress when not on a terminal.
const WAIT_POLL: Duration = Duration::from_millis(250);
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// A connection to a host plus the output mode.
pub struct Session {
    remote: Remote,
    json: bool,
}

/// The filter of `keel list`.
pub struct ListFilter {
    pub statuses: Vec<String>,
    pub prefix: Option<String>,
    pub name: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub top: usize,
    pub all: bool,
}

/// A query string from name/value pairs (values percent-encoded).
fn query(pairs: &[(&str, &str)]) -> String {
    let encoded: Vec<String> = pairs.iter().map(|(name, value)| format!("{name}={}", percent_encode(value))).collect();
    if encoded.is_empty() {
        String::new()
    } else {
        format!("?{}", encoded.join("&"))
    }
}

fn instance_path(instance_id: &str) -> String {
    format!("{API}/instances/{}", percent_encode(instance_id))
}

fn entity_path(name: &str, key: &str) -> String {
    format!("{API}/entities/{}/{}", percent_encode(name), percent_encode(key))
}

/// The filter of `keel entity list`.
pub struct EntityFilter {
    pub name: Option<String>,
    pub prefix: Option<String>,
    pub state: bool,
    pub transient: bool,
    pub from: Option<String>,
    pub to: Option<String>,
    pub top: usize,
    pub all: bool,
}

impl Session {
    pub fn new(url: &str, api_key: Option<String>, json: bool) -> anyhow::Result<Session> {
        Ok(Session { remote: Remote::new(url, api_key.filter(|key| !key.is_empty()))?, json })
    }

    fn print_json(&self, value: &Value) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(value)?);
        Ok(())
    }

    /// The items of a list route: its first page, or with `all` every page (following
    /// `x-ms-continuation-token`). Says on stderr when more pages were left out.
    async fn pages(&self, path: &str, all: bool, what: &str) -> anyhow::Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let headers: Vec<(&str, &str)> =
                continuation.iter().map(|token| (CONTINUATION_HEADER, token.as_str())).collect();
            let reply =
                self.remote.send_with_headers(Method::GET, path, None, &headers).await?.expect(&[StatusCode::OK])?;
            let next = reply.headers.get(CONTINUATION_HEADER).and_then(|value| value.to_str().ok()).map(str::to_string);
            match reply.json()? {
                Value::Array(page) => items.extend(page),
                other => bail!("the host answered with something that is not a list: {other}"),
            }
            match next {
                Some(token) if all => continuation = Some(token),
                Some(_) => {
                    if !self.json {
                        eprintln!("(more {what} match: use --all to list every page)");
                    }
                    return Ok(items);
                }
                None => return Ok(items),
            }
        }
    }

    pub async fn start(
        &self,
        name: &str,
        instance_id: Option<&str>,
        version: Option<&str>,
        input: Option<String>,
    ) -> anyhow::Result<()> {
        let mut path = format!("{API}/orchestrators/{}", percent_encode(name));
        if let Some(instance_id) = instance_id {
            path = format!("{path}/{}", percent_encode(instance_id));
        }
        let parameters: Vec<(&str, &str)> = version.iter().map(|version| ("version", *version)).collect();
        path.push_str(&query(&parameters));
        let reply = self.remote.send(Method::POST, &path, input).await?.expect(&[StatusCode::ACCEPTED])?;
        let payload = reply.json()?;
        if self.json {
            return self.print_json(&payload);
        }
        println!("Started {name} as instance {}", output::text(&payload["id"]));
        println!("  status: {}", output::text(&payload["statusQueryGetUri"]));
        Ok(())
    }

    async fn get_status(&self, instance_id: &str, with_history: bool) -> anyhow::Result<Value> {
        let parameters: &[(&str, &str)] =
            if with_history { &[("showHistory", "true"), ("showHistoryOutput", "true")] } else { &[] };
        let path = format!("{}{}", instance_path(instance_id), query(parameters));
        let reply =
            self.remote.send(Method::GET, &path, None).await?.expect(&[StatusCode::OK, StatusCode::ACCEPTED])?;
        reply.json()
    }

    pub async fn status(&self, instance_id: &str, with_history: bool) -> anyhow::Result<()> {
        let status = self.get_status(instance_id, with_history).await?;
        if self.json {
            return self.print_json(&status);
        }
        output::print_status(&status);
        if with_history {
            println!();
            output::print_history(&status["historyEvents"]);
        }
        Ok(())
    }

    pub async fn wait(&self, instance_id: &str, timeout_seconds: f64) -> anyhow::Result<()> {
        let timeout = Duration::try_from_secs_f64(timeout_seconds).context("--timeout must be a positive number")?;
        let started = Instant::now();
        let on_terminal = std::io::stderr().is_terminal();
        let mut last_report = Instant::now();
        loop {
            let status = self.get_status(instance_id, false).await?;
            let runtime_status = output::text(&status["runtimeStatus"]);
            if ["Completed", "Failed", "Terminated", "Canceled"].contains(&runtime_status.as_str()) {
                if on_terminal {
                    eprintln!();
                }
                if self.json {
                    return self.print_json(&status);
                }
                output::print_status(&status);
                return Ok(());
            }
            let waited = started.elapsed();
            if waited >= timeout {
                if on_terminal {
                    eprintln!();
                }
                bail!("instance {instance_id} did not finish within {timeout_seconds}s (it is {runtime_status})");
            }
            if on_terminal {
                eprint!("\rwaiting for {instance_id}: {runtime_status} ({}s)   ", waited.as_secs());
            } else if last_report.elapsed() >= PROGRESS_EVERY {
                eprintln!("waiting for {instance_id}: {runtime_status} ({}s)", waited.as_secs());
                last_report = Instant::now();
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    }

    pub async fn list(&self, filter: &ListFilter) -> anyhow::Result<()> {
        let top = filter.top.to_string();
        let statuses = filter.statuses.join(",");
        let mut parameters = vec![("top", top.as_str())];
        // The table shows no inputs; `--json` prints the host's list as it is (with them).
        if !self.json {
            parameters.push(("showInput", "false"));
        }
        if !statuses.is_empty() {
            parameters.push(("runtimeStatus", &statuses));
        }
        let optional = [
            ("instanceIdPrefix", &filter.prefix),
            ("namePrefix", &filter.name),
            ("createdTimeFrom", &filter.from),
            ("createdTimeTo", &filter.to),
        ];
        for (name, value) in &optional {
            if let Some(value) = value {
                parameters.push((name, value));
            }
        }
        let path = format!("{API}/instances{}", query(&parameters));
        let instances = self.pages(&path, filter.all, "instances").await?;
        if self.json {
            return self.print_json(&Value::Array(instances));
        }
        output::print_instances(&instances);
        Ok(())
    }

    pub async fn raise(&self, instance_id: &str, event: &str, data: Option<String>) -> anyhow::Result<()> {
        let path = format!("{}/raiseEvent/{}", instance_path(instance_id), percent_encode(event));
        let data = data.unwrap_or_else(|| "null".to_string());
        self.remote.send(Method::POST, &path, Some(data)).await?.expect(&[StatusCode::ACCEPTED])?;
        if self.json {
            return self.print_json(&json!({ "instanceId": instance_id, "event": event, "accepted": true }));
        }
        println!("Raised {event} on {instance_id}");
        Ok(())
    }

    /// terminate, suspend, resume, rewind.
    pub async fn control(&self, instance_id: &str, action: &str, reason: Option<String>) -> anyhow::Result<()> {
        let parameters: Vec<(&str, &str)> = reason.iter().map(|reason| ("reason", reason.as_str())).collect();
        let path = format!("{}/{action}{}", instance_path(instance_id), query(&parameters));
        self.remote.send(Method::POST, &path, None).await?.expect(&[StatusCode::ACCEPTED])?;
        if self.json {
            return self.print_json(&json!({ "instanceId": instance_id, "action": action, "accepted": true }));
        }
        println!("Requested {action} of {instance_id}");
        Ok(())
    }

    pub async fn restart(&self, instance_id: &str, same_id: bool) -> anyhow::Result<()> {
        let parameters: &[(&str, &str)] = if same_id { &[("restartWithNewInstanceId", "false")] } else { &[] };
        let path = format!("{}/restart{}", instance_path(instance_id), query(parameters));
        let reply = self.remote.send(Method::POST, &path, None).await?.expect(&[StatusCode::ACCEPTED])?;
        let payload = reply.json()?;
        if self.json {
            return self.print_json(&payload);
        }
        println!("Restarted {instance_id} as instance {}", output::text(&payload["id"]));
        Ok(())
    }

    pub async fn purge_one(&self, instance_id: &str) -> anyhow::Result<()> {
        let reply = self.remote.send(Method::DELETE, &instance_path(instance_id), None).await?;
        let result = reply.expect(&[StatusCode::OK])?.json()?;
        if self.json {
            return self.print_json(&result);
        }
        println!("Purged {instance_id}");
        Ok(())
    }

    pub async fn purge_where(&self, from: &str, to: Option<&str>, statuses: &[String]) -> anyhow::Result<()> {
        let statuses = statuses.join(",");
        let mut parameters = vec![("createdTimeFrom", from)];
        if let Some(to) = to {
            parameters.push(("createdTimeTo", to));
        }
        if !statuses.is_empty() {
            parameters.push(("runtimeStatus", &statuses));
        }
        let path = format!("{API}/instances{}", query(&parameters));
        let reply = self.remote.send(Method::DELETE, &path, None).await?;
        // 404 means nothing matched: for a filter that is a count of zero, not an error.
        let result = match reply.status {
            StatusCode::NOT_FOUND => json!({ "instancesDeleted": 0 }),
            _ => reply.expect(&[StatusCode::OK])?.json()?,
        };
        if self.json {
            return self.print_json(&result);
        }
        println!("Purged {} instances", result["instancesDeleted"]);
        Ok(())
    }

    /// The history as a table; with `--json`, the host's export of it
    /// (`GET …/instances/{id}/history`) exactly as the host sent it, which `keel verify
    /// --history` reads back.
    pub async fn history(&self, instance_id: &str) -> anyhow::Result<()> {
        if self.json {
            let path = format!("{}/history", instance_path(instance_id));
            let reply = self.remote.send(Method::GET, &path, None).await?.expect(&[StatusCode::OK])?;
            reply.json()?; // refuse to export something that is not JSON
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&reply.body)?;
            if !reply.body.ends_with(b"\n") {
                stdout.write_all(b"\n")?;
            }
            return Ok(stdout.flush()?);
        }
        let status = self.get_status(instance_id, true).await?;
        output::print_history(&status["historyEvents"]);
        Ok(())
    }

    pub async fn signal_entity(
        &self,
        name: &str,
        key: &str,
        operation: &str,
        input: Option<String>,
        at: Option<&str>,
    ) -> anyhow::Result<()> {
        let mut parameters = vec![("op", operation)];
        if let Some(at) = at {
            parameters.push(("scheduledTime", at));
        }
        let path = format!("{}{}", entity_path(name, key), query(&parameters));
        self.remote.send(Method::POST, &path, input).await?.expect(&[StatusCode::ACCEPTED])?;
        if self.json {
            let signalled =
                json!({ "entityId": { "name": name, "key": key }, "operation": operation, "accepted": true });
            return self.print_json(&signalled);
        }
        match at {
            Some(at) => println!("Signalled {operation} on {name}/{key} for {at}"),
            None => println!("Signalled {operation} on {name}/{key}"),
        }
        Ok(())
    }

    pub async fn get_entity(&self, name: &str, key: &str) -> anyhow::Result<()> {
        let reply = self.remote.send(Method::GET, &entity_path(name, key), None).await?.expect(&[StatusCode::OK])?;
        self.print_json(&reply.json()?)
    }

    pub async fn delete_entity(&self, name: &str, key: &str) -> anyhow::Result<()> {
        self.remote.send(Method::DELETE, &entity_path(name, key), None).await?.expect(&[StatusCode::ACCEPTED])?;
        if self.json {
            let signalled =
                json!({ "entityId": { "name": name, "key": key }, "operation": "delete", "accepted": true });
            return self.print_json(&signalled);
        }
        println!("Signalled delete on {name}/{key}");
        Ok(())
    }

    pub async fn list_entities(&self, filter: &EntityFilter) -> anyhow::Result<()> {
        let top = filter.top.to_string();
        let mut parameters = vec![("top", top.as_str())];
        if filter.state {
            parameters.push(("fetchState", "true"));
        }
        if filter.transient {
            parameters.push(("includeTransient", "true"));
        }
        let optional = [
            ("namePrefix", &filter.prefix),
            ("lastOperationTimeFrom", &filter.from),
            ("lastOperationTimeTo", &filter.to),
        ];
        for (name, value) in &optional {
            if let Some(value) = value {
                parameters.push((name, value));
            }
        }
        let base = match &filter.name {
            Some(name) => format!("{API}/entities/{}", percent_encode(name)),
            None => format!("{API}/entities"),
        };
        let entities = self.pages(&format!("{base}{}", query(&parameters)), filter.all, "entities").await?;
        if self.json {
            return self.print_json(&Value::Array(entities));
        }
        output::print_entities(&entities, filter.state);
        Ok(())
    }

    pub async fn clean_entities(&self, remove_empty: bool, release_orphaned_locks: bool) -> anyhow::Result<()> {
        let (remove_empty, release) = (remove_empty.to_string(), release_orphaned_locks.to_string());
        let parameters = [("removeEmptyEntities", remove_empty.as_str()), ("releaseOrphanedLocks", release.as_str())];
        let path = format!("{API}/entities/clean{}", query(&parameters));
        let result = self.remote.send(Method::POST, &path, None).await?.expect(&[StatusCode::OK])?.json()?;
        if self.json {
            return self.print_json(&result);
        }
        println!(
            "Removed {} empty entities; released {} orphaned locks",
            result["emptyEntitiesRemoved"], result["orphanedLocksReleased"]
        );
        Ok(())
    }
}
