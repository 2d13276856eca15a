//! Human-readable output: an instance's status as labelled lines, instance lists,
//! entity lists and histories as aligned tables.

use serde_json::Value;

/// A JSON value as text: strings without quotes, everything else as compact JSON,
/// null as empty.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// A payload as compact JSON ("-" when there is none).
fn payload(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

pub fn print_status(status: &Value) {
    let rows = [
        ("Instance", text(&status["instanceId"])),
        ("Name", text(&status["name"])),
        ("Version", status["version"].as_str().unwrap_or("-").to_string()),
        ("Status", text(&status["runtimeStatus"])),
        ("Created", text(&status["createdTime"])),
        ("Last updated", text(&status["lastUpdatedTime"])),
        ("Input", payload(&status["input"])),
        ("Output", payload(&status["output"])),
        ("Custom status", payload(&status["customStatus"])),
    ];
    for (label, value) in rows {
        println!("{:<14} {value}", format!("{label}:"));
    }
}

pub fn print_instances(instances: &[Value]) {
    let rows: Vec<Vec<String>> = instances
        .iter()
        .map(|instance| {
            ["instanceId", "name", "runtimeStatus", "createdTime", "lastUpdatedTime"]
                .iter()
                .map(|field| text(&instance[*field]))
                .collect()
        })
        .collect();
    print_table(&["INSTANCE ID", "NAME", "STATUS", "CREATED", "LAST UPDATED"], &rows);
    println!("{} instance(s)", instances.len());
}

pub fn print_entities(entities: &[Value], with_state: bool) {
    let rows: Vec<Vec<String>> = entities
        .iter()
        .map(|entity| {
            let mut row = vec![
                text(&entity["entityId"]["name"]),
                text(&entity["entityId"]["key"]),
                text(&entity["lastOperationTime"]),
            ];
            if with_state {
                row.push(payload(&entity["state"]));
            }
            row
        })
        .collect();
    let header: &[&str] =
        if with_state { &["NAME", "KEY", "LAST OPERATION", "STATE"] } else { &["NAME", "KEY", "LAST OPERATION"] };
    print_table(header, &rows);
    println!("{} entit{}", entities.len(), if entities.len() == 1 { "y" } else { "ies" });
}

pub fn print_history(events: &Value) {
    let events = events.as_array().map(Vec::as_slice).unwrap_or_default();
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|event| {
            let details: Vec<String> = event
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(name, value)| !matches!(name.as_str(), "EventType" | "Timestamp") && !value.is_null())
                .map(|(name, value)| format!("{name}={}", text(value)))
                .collect();
            vec![text(&event["Timestamp"]), text(&event["EventType"]), details.join(" ")]
        })
        .collect();
    print_table(&["TIMESTAMP", "EVENT", "DETAILS"], &rows);
}

/// Prints rows under a header with columns padded to their widest cell (the last
/// column is not padded).
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|title| title.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(
                |(index, cell)| {
                    if index == last {
                        cell.to_string()
                    } else {
                        format!("{cell:<width$}", width = widths[index])
                    }
                },
            )
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
