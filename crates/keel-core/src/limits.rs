//! Every limit Keel enforces, in one place. Stores, the runtime and the front ends
//! check against these; an input beyond a limit is refused with a clear error.

/// Largest payload (input, output, event data, custom status) in bytes: 1 MiB, as the
/// Durable Task Scheduler allows.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Longest instance id in bytes.
pub const MAX_INSTANCE_ID_BYTES: usize = 256;

/// Longest orchestrator, activity or event name in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// Most actions one execution may take (Durable Functions' `maxOrchestrationActions`
/// guards runaway orchestrations; ours is larger so that a 100,000-activity fan-out fits).
pub const MAX_ACTIONS_PER_EXECUTION: usize = 1_000_000;

/// Deepest nesting of arrays and objects in a JSON payload a client sends (an input,
/// event data, a termination output, an entity operation's input): 64 levels. A scalar
/// is at depth 0, `[1]` at depth 1. (serde_json itself stops at 128.)
pub const MAX_JSON_DEPTH: usize = 64;

/// How often an orchestration work item or activity may be picked up without being
/// finished (its worker crashed or panicked each time) before it is failed as poison.
pub const MAX_DELIVERY_ATTEMPTS: u32 = 10;

/// Checks that an instance id is usable: not empty, not too long, no control characters
/// and none of `/ \ # ?` (they break URLs of the HTTP API).
pub fn check_instance_id(instance_id: &str) -> Result<(), String> {
    if instance_id.is_empty() {
        return Err("instance id must not be empty".into());
    }
    if instance_id.len() > MAX_INSTANCE_ID_BYTES {
        return Err(format!("instance id is {} bytes long; the limit is {MAX_INSTANCE_ID_BYTES}", instance_id.len()));
    }
    if let Some(bad) = instance_id.chars().find(|c| c.is_control() || "/\\#?".contains(*c)) {
        return Err(format!("instance id contains the character {bad:?}, which is not allowed"));
    }
    if instance_id == "." || instance_id == ".." {
        return Err(format!("instance id '{instance_id}' is not allowed (it names a path, not an instance)"));
    }
    Ok(())
}

/// Checks a function or event name: not empty, not too long.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err(format!("{what} name must not be empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("{what} name is {} bytes long; the limit is {MAX_NAME_BYTES}", name.len()));
    }
    Ok(())
}

/// Checks that the JSON text `json` nests arrays and objects at most [`MAX_JSON_DEPTH`]
/// levels deep; a JSON string that holds JSON (a payload encoded twice, see
/// [`crate::history::decode_payload`]) is checked as the JSON it holds too. The text is
/// scanned, not parsed, so any depth is checked in one pass without recursion; whether it
/// is JSON at all is for the caller to check.
pub fn check_json_depth(what: &str, json: &str) -> Result<(), String> {
    let depth = json_depth(json);
    let inner = if json.trim_start().starts_with('"') {
        serde_json::from_str::<String>(json).map_or(0, |inner| json_depth(&inner))
    } else {
        0
    };
    match depth.max(inner) {
        depth if depth > MAX_JSON_DEPTH => {
            Err(format!("{what} nests arrays and objects {depth} levels deep; the limit is {MAX_JSON_DEPTH} levels"))
        }
        _ => Ok(()),
    }
}

/// How deep arrays and objects nest in JSON text (brackets inside strings do not count).
fn json_depth(json: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for byte in json.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Checks a payload against [`MAX_PAYLOAD_BYTES`].
pub fn check_payload(what: &str, payload: Option<&str>) -> Result<(), String> {
    match payload {
        Some(text) if text.len() > MAX_PAYLOAD_BYTES => {
            Err(format!("{what} is {} bytes; the limit is {MAX_PAYLOAD_BYTES} bytes", text.len()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_checked() {
        assert!(check_instance_id("order-17").is_ok());
        assert!(check_instance_id("").is_err());
        assert!(check_instance_id("a/b").is_err());
        assert!(check_instance_id("a\nb").is_err());
        assert!(check_instance_id(".").is_err() && check_instance_id("..").is_err());
        assert!(check_instance_id("a.b").is_ok());
        assert!(check_instance_id(&"x".repeat(MAX_INSTANCE_ID_BYTES + 1)).is_err());
    }

    #[test]
    fn json_nested_beyond_the_limit_is_refused() {
        let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        assert_eq!(json_depth("1"), 0);
        assert_eq!(json_depth(r#"{"a":[1,{"b":[]}],"c":{}}"#), 4);
        assert_eq!(json_depth(r#"["[[[{{", "\"[[", "\\"]"#), 1, "brackets in strings do not count");
        assert!(check_json_depth("input", &nested(MAX_JSON_DEPTH)).is_ok());
        let error = check_json_depth("input", &nested(MAX_JSON_DEPTH + 1)).unwrap_err();
        assert!(error.contains("65 levels deep") && error.contains("limit is 64"), "{error}");
        // Far beyond what a recursive parser survives: still one pass, still refused.
        assert!(check_json_depth("input", &nested(1_000_000)).is_err());
        let encoded_twice = serde_json::to_string(&nested(MAX_JSON_DEPTH + 1)).unwrap();
        assert!(check_json_depth("input", &encoded_twice).is_err(), "a JSON string is checked as the JSON it holds");
        assert!(check_json_depth("input", &serde_json::to_string(&nested(MAX_JSON_DEPTH)).unwrap()).is_ok());
    }

    #[test]
    fn payloads_over_the_limit_are_refused() {
        assert!(check_payload("input", Some("42")).is_ok());
        assert!(check_payload("input", None).is_ok());
        let big = "x".repeat(MAX_PAYLOAD_BYTES + 1);
        let err = check_payload("input", Some(&big)).unwrap_err();
        assert!(err.contains("limit"), "{err}");
    }
}
