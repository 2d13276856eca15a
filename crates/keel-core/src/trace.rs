//! W3C trace context as history keeps it: the `traceparent` (and `tracestate`) a
//! workflow's spans hang under, carried from the request that started an instance to its
//! activities, sub-orchestrations and entity operations, in every process that runs
//! them and across restarts.
//!
//! Only the format lives here; the runtime turns these into OpenTelemetry contexts. An
//! orchestration execution's own span id is not stored: it is derived from the
//! execution id ([`orchestration_span_id`]), so every process that replays the
//! execution names the same span.

use serde::{Deserialize, Serialize};

use crate::history::{EventKind, HistoryEvent};

/// A W3C trace context: the parent of the spans of what carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// `00-{32 hex trace id}-{16 hex parent span id}-{2 hex flags}`, lower case.
    pub trace_parent: String,
    /// The vendor-specific `tracestate` list, as received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_state: Option<String>,
}

/// A `traceparent` or `tracestate` that is not valid W3C trace context.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid trace context: {0}")]
pub struct InvalidTraceContext(pub &'static str);

/// The longest `tracestate` accepted (the W3C limit is 32 members of at most 256 bytes).
pub const MAX_TRACE_STATE_LEN: usize = 8192;

impl TraceContext {
    /// Checks `trace_parent` (version `00`, a non-zero trace id and span id in lower-case
    /// hex, two hex flag digits) and `trace_state` (printable ASCII, bounded) and keeps
    /// both. Upper-case hex is accepted and lowered.
    pub fn parse(trace_parent: &str, trace_state: Option<&str>) -> Result<TraceContext, InvalidTraceContext> {
        let trace_parent = trace_parent.trim().to_ascii_lowercase();
        let parts: Vec<&str> = trace_parent.split('-').collect();
        let [version, trace_id, span_id, flags] = parts[..] else {
            return Err(InvalidTraceContext("traceparent must have four dash-separated fields"));
        };
        if version != "00" {
            return Err(InvalidTraceContext("traceparent version must be 00"));
        }
        if !is_hex(trace_id, 32) || trace_id.bytes().all(|b| b == b'0') {
            return Err(InvalidTraceContext("traceparent trace id must be 32 hex digits, not all zero"));
        }
        if !is_hex(span_id, 16) || span_id.bytes().all(|b| b == b'0') {
            return Err(InvalidTraceContext("traceparent parent id must be 16 hex digits, not all zero"));
        }
        if !is_hex(flags, 2) {
            return Err(InvalidTraceContext("traceparent flags must be 2 hex digits"));
        }
        let trace_state = trace_state.map(str::trim).filter(|state| !state.is_empty());
        if let Some(state) = trace_state {
            if state.len() > MAX_TRACE_STATE_LEN || !state.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                return Err(InvalidTraceContext("tracestate must be printable ASCII of at most 8192 bytes"));
            }
        }
        Ok(TraceContext { trace_parent, trace_state: trace_state.map(str::to_owned) })
    }

    /// The context of a child span `span_id` (16 hex digits) in the same trace, with the
    /// same flags and state.
    pub fn child(&self, span_id: &str) -> TraceContext {
        debug_assert!(is_hex(span_id, 16), "a span id is 16 hex digits");
        TraceContext {
            trace_parent: format!("00-{}-{span_id}-{}", self.trace_id(), self.flags()),
            trace_state: self.trace_state.clone(),
        }
    }

    /// The trace id: 32 lower-case hex digits.
    pub fn trace_id(&self) -> &str {
        &self.trace_parent[3..35]
    }

    /// The parent span id: 16 lower-case hex digits.
    pub fn span_id(&self) -> &str {
        &self.trace_parent[36..52]
    }

    /// The trace flags: 2 hex digits (`01`: sampled).
    pub fn flags(&self) -> &str {
        &self.trace_parent[53..55]
    }
}

/// The span id of an orchestration execution's span: the last 16 hex digits of its
/// execution id when that is 32 hex digits (Keel's are), else a hash of the id. Every
/// process derives the same id, so spans emitted after a restart still name their parent.
pub fn orchestration_span_id(execution_id: &str) -> String {
    let tail = execution_id.get(execution_id.len().saturating_sub(16)..).unwrap_or("");
    if is_hex(tail, 16) && !tail.bytes().all(|b| b == b'0') {
        return tail.to_ascii_lowercase();
    }
    // FNV-1a, 64 bits: stable across processes and builds (std's hashers are not).
    let hash = execution_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3));
    format!("{:016x}", hash.max(1))
}

/// The context an orchestration execution's work hangs under: the execution's own span
/// (its id from [`orchestration_span_id`]) in the trace its `ExecutionStarted` event
/// carries; `None` for any other event, or when the execution has no trace.
pub fn orchestration_trace(started: &EventKind) -> Option<TraceContext> {
    match started {
        EventKind::ExecutionStarted { execution_id, trace: Some(trace), .. } => {
            Some(trace.child(&orchestration_span_id(execution_id)))
        }
        _ => None,
    }
}

/// [`orchestration_trace`] of the first `ExecutionStarted` event in `history`.
pub fn history_trace<'a>(history: impl IntoIterator<Item = &'a HistoryEvent>) -> Option<TraceContext> {
    history
        .into_iter()
        .find(|event| matches!(event.kind, EventKind::ExecutionStarted { .. }))
        .and_then(|event| orchestration_trace(&event.kind))
}

/// The trace context the `ExecutionStarted` event in `history` was started under (the
/// parent of the execution's span): a continue-as-new passes it to the next execution.
pub fn started_trace<'a>(history: impl IntoIterator<Item = &'a HistoryEvent>) -> Option<TraceContext> {
    history.into_iter().find_map(|event| match &event.kind {
        EventKind::ExecutionStarted { trace, .. } => Some(trace.clone()),
        _ => None,
    })?
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_kept_and_split() {
        let context =
            TraceContext::parse("00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01", Some("a=1")).expect("valid");
        assert_eq!(context.trace_parent, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert_eq!(context.trace_id(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(context.span_id(), "b7ad6b7169203331");
        assert_eq!(context.flags(), "01");
        assert_eq!(context.trace_state.as_deref(), Some("a=1"));
        let child = context.child("00f067aa0ba902b7");
        assert_eq!(child.trace_parent, "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01");
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c8031zz-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
        ] {
            assert!(TraceContext::parse(bad, None).is_err(), "{bad:?} must be refused");
        }
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert!(TraceContext::parse(parent, Some("a=\u{7}")).is_err(), "control characters in tracestate");
    }

    #[test]
    fn orchestration_span_ids_are_derived_from_the_execution_id() {
        assert_eq!(orchestration_span_id("0123456789abcdef0123456789ABCDEF"), "0123456789abcdef");
        let other = orchestration_span_id("not-hex");
        assert_eq!(other.len(), 16);
        assert_eq!(other, orchestration_span_id("not-hex"), "stable");
        assert_ne!(other, orchestration_span_id("not-hex2"));
    }
}
