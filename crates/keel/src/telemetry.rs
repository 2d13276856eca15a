//! OpenTelemetry traces of the runtime: a span per instance start, orchestration
//! execution (start to end, across restarts), episode, activity execution, timer and
//! entity operation, named and attributed as the Durable Task SDKs name theirs
//! (`orchestration:Name`, `activity:Name`, `durabletask.task.instance_id`, …).
//!
//! Spans go to the global OpenTelemetry tracer provider. Nothing is built unless
//! tracing is switched on ([`set_enabled`]; `init_from_env` with the `otlp` feature does
//! it), so a host without tracing pays one relaxed atomic load per would-be span.
//!
//! The trace travels in history ([`keel_core::trace`]): the context a start request
//! carried (`traceparent`, or the SDK's `parentTraceContext`) becomes the parent of the
//! execution's span, whose id is derived from the execution id, so any process that
//! runs the execution later — after a restart, on another machine — emits its spans in
//! the same trace. A span with a chosen id needs the id generator of
//! `id_generator` in the provider (`init_from_env` installs it); with another
//! generator the execution's span gets a random id and its children point at the
//! derived one.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use keel_core::history::{EventKind, FailureDetails};
use keel_core::trace::TraceContext;
use keel_core::Timestamp;
use keel_store::ActivityItem;
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};

use crate::entity::BatchOutcome;
use crate::entity_episode::EntityEpisode;
use crate::episode::EpisodeSpans;

#[cfg(feature = "otlp")]
mod otlp;
#[cfg(feature = "otlp")]
pub use otlp::{id_generator, init_from_env, KeelIdGenerator, Telemetry, TelemetryError};

static ENABLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The id the next span built on this thread must have (see `id_generator`).
    static NEXT_SPAN_ID: Cell<Option<SpanId>> = const { Cell::new(None) };
    /// The trace id the next root span built on this thread must have.
    static NEXT_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// Switches the runtime's spans on or off (off by default). Turn it on after installing
/// a global tracer provider (`opentelemetry::global::set_tracer_provider`);
/// `init_from_env` does both.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Whether the runtime emits spans.
pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The span id asked for the span being built on this thread, if any; taking it clears it.
#[cfg(feature = "otlp")]
pub(crate) fn take_requested_span_id() -> Option<SpanId> {
    NEXT_SPAN_ID.with(Cell::take)
}

/// The trace id asked for the root span being built on this thread, if any; taking it
/// clears it.
#[cfg(feature = "otlp")]
pub(crate) fn take_requested_trace_id() -> Option<TraceId> {
    NEXT_TRACE_ID.with(Cell::take)
}

/// What a span is about, as the Durable Task SDKs label it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum TaskType {
    CreateOrchestration,
    Orchestration,
    Episode,
    Activity,
    Timer,
    Entity,
}

impl TaskType {
    fn label(self) -> &'static str {
        match self {
            TaskType::CreateOrchestration => "create_orchestration",
            TaskType::Orchestration => "orchestration",
            TaskType::Episode => "episode",
            TaskType::Activity => "activity",
            TaskType::Timer => "timer",
            TaskType::Entity => "entity",
        }
    }

    fn kind(self) -> SpanKind {
        match self {
            TaskType::CreateOrchestration => SpanKind::Producer,
            TaskType::Orchestration | TaskType::Activity | TaskType::Entity => SpanKind::Server,
            TaskType::Episode | TaskType::Timer => SpanKind::Internal,
        }
    }
}

/// One span to emit, with its times already known.
pub(crate) struct SpanRecord<'a> {
    pub(crate) task_type: TaskType,
    /// The span's name: `{type}:{function}` (`orchestration:Order:timer` for a timer).
    pub(crate) name: String,
    pub(crate) instance_id: &'a str,
    /// The function's name (orchestrator, activity, entity).
    pub(crate) function: &'a str,
    pub(crate) parent: Option<&'a TraceContext>,
    /// The span's own id (16 hex), when it is fixed (an execution's span, a start's).
    pub(crate) span_id: Option<&'a str>,
    /// The trace id (32 hex) of a root span whose id is fixed (a start without a caller).
    pub(crate) trace_id: Option<&'a str>,
    pub(crate) start: SystemTime,
    pub(crate) end: SystemTime,
    pub(crate) attributes: Vec<KeyValue>,
    pub(crate) failure: Option<&'a FailureDetails>,
}

impl SpanRecord<'_> {
    /// Emits the span (when tracing is on).
    pub(crate) fn emit(self) {
        if !is_enabled() {
            return;
        }
        let mut attributes = vec![
            KeyValue::new("durabletask.type", self.task_type.label()),
            KeyValue::new("durabletask.task.name", self.function.to_string()),
            KeyValue::new("durabletask.task.instance_id", self.instance_id.to_string()),
        ];
        attributes.extend(self.attributes);
        let builder = SpanBuilder::from_name(self.name)
            .with_kind(self.task_type.kind())
            .with_start_time(self.start)
            .with_attributes(attributes);
        let requested = self.span_id.and_then(|id| SpanId::from_hex(id).ok());
        let requested_trace = self.trace_id.and_then(|id| TraceId::from_hex(id).ok());
        NEXT_SPAN_ID.with(|next| next.set(requested));
        NEXT_TRACE_ID.with(|next| next.set(requested_trace));
        let mut span = opentelemetry::global::tracer("keel").build_with_context(builder, &parent_context(self.parent));
        NEXT_SPAN_ID.with(|next| next.set(None));
        NEXT_TRACE_ID.with(|next| next.set(None));
        if let Some(failure) = self.failure {
            span.set_status(Status::error(failure.to_string()));
        }
        span.end_with_timestamp(self.end);
    }
}

/// The trace of a start request: [`StartTrace::context`] goes into the instance's
/// `ExecutionStarted` before it is written, and [`StartTrace::emit`] emits the start's
/// span once the write succeeded (a refused start leaves no span). With tracing off the
/// caller's context (if any) is kept as it is, so SDK workers still see it.
#[derive(Debug)]
pub(crate) struct StartTrace {
    /// The caller's context: the parent of the start's span.
    parent: Option<TraceContext>,
    /// The start span's own context, chosen ahead (tracing on); `None` when off.
    own: Option<TraceContext>,
}

impl StartTrace {
    /// Chooses the start span's ids (a new trace when the caller has none).
    pub(crate) fn plan(parent: Option<TraceContext>) -> StartTrace {
        if !is_enabled() {
            return StartTrace { parent, own: None };
        }
        let random = uuid::Uuid::new_v4().simple().to_string();
        let span_id = &random[16..];
        let own = match &parent {
            Some(parent) => parent.child(span_id),
            None => {
                let trace_id = uuid::Uuid::new_v4().simple().to_string();
                TraceContext::parse(&format!("00-{trace_id}-{span_id}-01"), None)
                    .expect("random hex ids make a valid traceparent")
            }
        };
        StartTrace { parent, own: Some(own) }
    }

    /// What the instance's `ExecutionStarted` keeps: the start span's context, or the
    /// caller's when tracing is off.
    pub(crate) fn context(&self) -> Option<TraceContext> {
        self.own.clone().or_else(|| self.parent.clone())
    }

    /// Emits the start's span (when tracing is on), now that the instance was written.
    pub(crate) fn emit(&self, name: &str, instance_id: &str, version: Option<&str>) {
        let Some(own) = &self.own else { return };
        let now = SystemTime::now();
        let mut attributes = Vec::new();
        if let Some(version) = version {
            attributes.push(KeyValue::new("durabletask.task.version", version.to_string()));
        }
        SpanRecord {
            task_type: TaskType::CreateOrchestration,
            name: format!("create_orchestration:{name}"),
            instance_id,
            function: name,
            parent: self.parent.as_ref(),
            span_id: Some(own.span_id()),
            trace_id: Some(own.trace_id()),
            start: now,
            end: now,
            attributes,
            failure: None,
        }
        .emit();
    }
}

/// The spans of a committed in-process episode: the episode itself, the timers that
/// fired in it, and each execution that ended in it (its span covers the whole
/// execution and has the id derived from the execution id).
pub(crate) fn emit_episode_spans(instance_id: &str, name: &str, spans: &EpisodeSpans, started: SystemTime) {
    let now = SystemTime::now();
    let parent = spans.execution.as_ref();
    SpanRecord {
        task_type: TaskType::Episode,
        name: format!("orchestration:{name}:episode"),
        instance_id,
        function: name,
        parent,
        span_id: None,
        trace_id: None,
        start: started,
        end: now,
        attributes: Vec::new(),
        failure: None,
    }
    .emit();
    for timer in &spans.timers {
        SpanRecord {
            task_type: TaskType::Timer,
            name: format!("orchestration:{name}:timer"),
            instance_id,
            function: name,
            parent,
            span_id: None,
            trace_id: None,
            start: system_time(timer.created_at.unwrap_or(timer.fire_at)),
            end: system_time(timer.fire_at).max(started).min(now),
            attributes: vec![
                KeyValue::new("durabletask.fire_at", timer.fire_at.to_rfc3339()),
                KeyValue::new("durabletask.task.task_id", i64::from(timer.id)),
            ],
            failure: None,
        }
        .emit();
    }
    for ended in &spans.ended {
        let span_id = keel_core::trace::orchestration_span_id(&ended.execution_id);
        SpanRecord {
            task_type: TaskType::Orchestration,
            name: format!("orchestration:{name}"),
            instance_id,
            function: name,
            parent: ended.started_trace.as_ref(),
            span_id: Some(&span_id),
            trace_id: None,
            start: ended.started_at.map_or(started, system_time),
            end: now,
            attributes: vec![
                KeyValue::new("durabletask.task.execution_id", ended.execution_id.clone()),
                KeyValue::new("durabletask.task.status", ended.status.to_string()),
            ],
            failure: ended.failure.as_ref(),
        }
        .emit();
    }
}

/// The span of one execution of an activity, from its start to its result.
pub(crate) fn emit_activity_span(item: &ActivityItem, started: SystemTime, failure: Option<&FailureDetails>) {
    SpanRecord {
        task_type: TaskType::Activity,
        name: format!("activity:{}", item.name),
        instance_id: &item.instance_id,
        function: &item.name,
        parent: item.trace.as_ref(),
        span_id: None,
        trace_id: None,
        start: started,
        end: SystemTime::now(),
        attributes: vec![
            KeyValue::new("durabletask.task.task_id", i64::from(item.task_id)),
            KeyValue::new("keel.activity.attempt", i64::from(item.delivery_attempts)),
        ],
        failure,
    }
    .emit();
}

/// The spans of an entity batch run here: one per operation, under the trace its
/// request carried (the batch runs its operations back to back, so each span covers the
/// batch).
pub(crate) fn emit_entity_spans(episode: &EntityEpisode, outcome: &BatchOutcome, started: SystemTime) {
    let end = SystemTime::now();
    let instance_id = episode.id.instance_id();
    for (request, result) in episode.operations.iter().zip(&outcome.results) {
        let parent = match &request.event.kind {
            EventKind::EntityOperationSignaled { trace, .. } | EventKind::EntityOperationCalled { trace, .. } => {
                trace.as_ref()
            }
            _ => None,
        };
        SpanRecord {
            task_type: TaskType::Entity,
            name: format!("entity:{}:{}", episode.id.name, request.operation),
            instance_id: &instance_id,
            function: &episode.id.name,
            parent,
            span_id: None,
            trace_id: None,
            start: started,
            end,
            attributes: vec![KeyValue::new("durabletask.entity.operation", request.operation.clone())],
            failure: result.as_ref().err(),
        }
        .emit();
    }
}

/// A history timestamp as a span time.
fn system_time(at: Timestamp) -> SystemTime {
    at.into()
}

fn parent_context(parent: Option<&TraceContext>) -> Context {
    match parent.and_then(span_context) {
        Some(span_context) => Context::new().with_remote_span_context(span_context),
        None => Context::new(),
    }
}

fn span_context(trace: &TraceContext) -> Option<SpanContext> {
    let trace_id = TraceId::from_hex(trace.trace_id()).ok()?;
    let span_id = SpanId::from_hex(trace.span_id()).ok()?;
    let flags = u8::from_str_radix(trace.flags(), 16).ok()?;
    let state = trace.trace_state.as_deref().and_then(|state| state.parse::<TraceState>().ok()).unwrap_or_default();
    Some(SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_contexts_become_remote_span_contexts() {
        let trace =
            TraceContext::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", Some("k=v")).expect("valid");
        let span_context = span_context(&trace).expect("converts");
        assert!(span_context.is_remote() && span_context.is_sampled());
        assert_eq!(span_context.trace_id().to_string(), trace.trace_id());
        assert_eq!(span_context.span_id().to_string(), trace.span_id());
        assert_eq!(span_context.trace_state().header(), "k=v");
    }

    #[test]
    fn with_tracing_off_a_start_keeps_the_callers_context() {
        set_enabled(false);
        let caller = TraceContext::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", None).ok();
        assert_eq!(StartTrace::plan(caller.clone()).context(), caller);
        assert_eq!(StartTrace::plan(None).context(), None);
    }
}
