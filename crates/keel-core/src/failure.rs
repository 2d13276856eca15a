//! Typed failures: how a function's own error type travels through history and comes
//! back to the orchestrator that called it as a value it can `match` on.
//!
//! A failure type implements [`Failure`] (one line: `impl Failure for PaymentError {}`
//! for any serde + `Display` type). It is recorded as [`FailureDetails`] that Durable
//! Functions clients and the SDKs read as they always did: `error_type` is the type's
//! full path, `error_message` its `Display`, and the value itself is kept as JSON in the
//! details' properties so that the caller gets it back. [`ActivityError`] is the untyped
//! failure for functions that declare none.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::history::FailureDetails;

/// The property of [`FailureDetails`] that holds a typed failure's value as JSON.
pub const FAILURE_VALUE_PROPERTY: &str = "keel.failure";

/// An error type a function can fail with and its caller can match on.
///
/// Any serde + `Display` type gets the trait from [`impl_failure!`](crate::impl_failure):
///
/// ```
/// use keel_core::failure::{Failure, TaskFailure};
/// use keel_core::TaskError;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// enum PaymentError {
///     Declined { reason: String },
///     Unavailable,
/// }
///
/// impl std::fmt::Display for PaymentError {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
///         match self {
///             PaymentError::Declined { reason } => write!(f, "the card was declined: {reason}"),
///             PaymentError::Unavailable => f.write_str("the gateway is unavailable"),
///         }
///     }
/// }
///
/// keel_core::impl_failure!(PaymentError);
///
/// // What history records: the full type path, the message and the value.
/// let details = PaymentError::Declined { reason: "expired".into() }.to_details();
/// assert!(details.error_type.ends_with("PaymentError"));
/// assert_eq!(details.error_message, "the card was declined: expired");
///
/// // What the calling orchestrator gets back: a value to match on.
/// let error = TaskError { task: "activity 'ProcessPayment' (#0)".into(), details };
/// match TaskFailure::<PaymentError>::from_task_error(error) {
///     TaskFailure::Activity(PaymentError::Declined { reason }) => assert_eq!(reason, "expired"),
///     other => panic!("unexpected failure: {other:?}"),
/// }
/// ```
pub trait Failure: Sized + Send + 'static {
    /// The failure as history records it.
    fn to_details(&self) -> FailureDetails;

    /// The failure back from its details; `None` when they hold another failure (a
    /// panic, an unregistered function, another type).
    fn from_details(details: &FailureDetails) -> Option<Self>;

    /// Whether retry policies may try again after this failure (default: yes).
    fn is_retriable(&self) -> bool {
        true
    }
}

/// The default [`Failure::to_details`] of a serde + `Display` type: its full type path,
/// its message, and its value as JSON.
pub fn typed_details<E: Serialize + fmt::Display + Failure>(failure: &E) -> FailureDetails {
    let mut details = FailureDetails::new(std::any::type_name::<E>(), failure.to_string());
    details.is_non_retriable = !failure.is_retriable();
    if let Ok(value) = serde_json::to_value(failure) {
        details.properties.insert(FAILURE_VALUE_PROPERTY.to_string(), value);
    }
    details
}

/// The default [`Failure::from_details`] of a serde type: the value, if the details
/// were made from this type.
pub fn typed_from_details<E: DeserializeOwned>(details: &FailureDetails) -> Option<E> {
    if details.error_type != std::any::type_name::<E>() {
        return None;
    }
    let value = details.properties.get(FAILURE_VALUE_PROPERTY)?;
    serde_json::from_value(value.clone()).ok()
}

/// Implements [`Failure`] for serde + `Display` types with the defaults above:
/// `keel_core::impl_failure!(PaymentError);` (several types may be listed). Types whose
/// failures are not all retriable implement the trait by hand. [`Failure`] has an example.
#[macro_export]
macro_rules! impl_failure {
    ($($failure:ty),+ $(,)?) => {$(
        impl $crate::failure::Failure for $failure {
            fn to_details(&self) -> $crate::history::FailureDetails {
                $crate::failure::typed_details(self)
            }

            fn from_details(details: &$crate::history::FailureDetails) -> Option<Self> {
                $crate::failure::typed_from_details(details)
            }
        }
    )+};
}

/// A failure type with no values: the function cannot fail on its own (it can still
/// panic or time out, which the caller sees as [`TaskFailure::Other`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Never {}

impl fmt::Display for Never {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {}
    }
}

impl Failure for Never {
    fn to_details(&self) -> FailureDetails {
        match *self {}
    }

    fn from_details(_: &FailureDetails) -> Option<Never> {
        None
    }
}

/// The untyped failure of a function: any details. Any `std::error::Error` converts into
/// it with `?` (its full type path becomes the error type).
#[derive(Clone, Debug, PartialEq)]
pub struct ActivityError(pub FailureDetails);

impl ActivityError {
    /// A failure with this error type and message.
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> ActivityError {
        ActivityError(FailureDetails::new(error_type, message))
    }

    /// A failure with error type `ActivityError`.
    pub fn msg(message: impl Into<String>) -> ActivityError {
        ActivityError::new("ActivityError", message)
    }

    /// Marks the failure as one that retry policies must not retry.
    pub fn non_retriable(mut self) -> ActivityError {
        self.0.is_non_retriable = true;
        self
    }

    /// The error type: the full type path of the error it was made from with `?`,
    /// `ActivityError` for [`ActivityError::msg`], or what [`ActivityError::new`] was given.
    pub fn error_type(&self) -> &str {
        &self.0.error_type
    }

    /// The failure's message, for people to read.
    pub fn message(&self) -> &str {
        &self.0.error_message
    }
}

impl fmt::Display for ActivityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: std::error::Error> From<E> for ActivityError {
    fn from(error: E) -> ActivityError {
        let mut details = FailureDetails::new(std::any::type_name::<E>(), error.to_string());
        if let Some(source) = error.source() {
            details.inner_failure = Some(Box::new(FailureDetails::new("Source", source.to_string())));
        }
        ActivityError(details)
    }
}

impl Failure for ActivityError {
    fn to_details(&self) -> FailureDetails {
        self.0.clone()
    }

    /// Any details: an untyped caller sees every failure.
    fn from_details(details: &FailureDetails) -> Option<ActivityError> {
        Some(ActivityError(details.clone()))
    }

    fn is_retriable(&self) -> bool {
        !self.0.is_non_retriable
    }
}

/// Why a typed call failed: the function's own failure, or anything else (a panic, an
/// unregistered function, a payload that does not fit, a broken locking rule, a lost
/// sub-orchestration).
#[derive(Clone, Debug, PartialEq)]
pub enum TaskFailure<E> {
    /// The called activity failed with its declared failure type.
    Activity(E),
    /// Any other failure.
    Other(crate::context::TaskError),
}

impl<E: Failure> TaskFailure<E> {
    /// Sorts a failure: the declared type if it is one, else `Other`.
    pub fn from_task_error(error: crate::context::TaskError) -> TaskFailure<E> {
        match E::from_details(&error.details) {
            Some(failure) => TaskFailure::Activity(failure),
            None => TaskFailure::Other(error),
        }
    }

    /// The failure as history records it.
    pub fn details(&self) -> FailureDetails {
        match self {
            TaskFailure::Activity(failure) => failure.to_details(),
            TaskFailure::Other(error) => error.details.clone(),
        }
    }
}

impl<E: Failure + fmt::Display> fmt::Display for TaskFailure<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskFailure::Activity(failure) => failure.fmt(f),
            TaskFailure::Other(error) => error.fmt(f),
        }
    }
}

impl<E: Failure + fmt::Debug + fmt::Display> std::error::Error for TaskFailure<E> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum PaymentError {
        Declined { customer: String },
        Unavailable,
    }

    impl fmt::Display for PaymentError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                PaymentError::Declined { customer } => write!(f, "the card of {customer} was declined"),
                PaymentError::Unavailable => f.write_str("the gateway is unavailable"),
            }
        }
    }

    crate::impl_failure!(PaymentError);

    #[test]
    fn a_typed_failure_round_trips_through_its_details() {
        let declined = PaymentError::Declined { customer: "ada".into() };
        let details = declined.to_details();
        assert_eq!(details.error_type, std::any::type_name::<PaymentError>());
        assert!(details.error_type.ends_with("::PaymentError"), "the full path: {}", details.error_type);
        assert_eq!(details.error_message, "the card of ada was declined");
        let json = serde_json::to_string(&details).unwrap();
        let back: FailureDetails = serde_json::from_str(&json).unwrap();
        assert_eq!(PaymentError::from_details(&back), Some(declined));
        assert_eq!(PaymentError::from_details(&FailureDetails::new("Panic", "boom")), None, "another failure");
        assert_eq!(Never::from_details(&details), None);
    }

    #[test]
    fn std_errors_keep_their_full_type_path() {
        let io: ActivityError = std::io::Error::other("disk full").into();
        let json: ActivityError = serde_json::from_str::<u32>("x").unwrap_err().into();
        assert_eq!(io.error_type(), "std::io::error::Error");
        assert_eq!(json.error_type(), "serde_json::error::Error");
        assert_ne!(io.error_type(), json.error_type());
    }
}
