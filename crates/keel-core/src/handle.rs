//! Typed handles: a function's name together with its input, output and failure types,
//! declared once as a `const` and used everywhere the function is registered, called or
//! started, so that the compiler checks every use against the function.
//!
//! ```
//! use keel_core::handle::{Activity, Event, Orchestration};
//!
//! pub const PROCESS_PAYMENT: Activity<u64, String> = Activity::new("ProcessPayment");
//! pub const PLACE_ORDER: Orchestration<u64, String> = Orchestration::new("PlaceOrder");
//! pub const APPROVAL: Event<bool> = Event::new("Approval");
//! assert_eq!(PROCESS_PAYMENT.name(), "ProcessPayment");
//! ```
//!
//! Names are what histories record: renaming a handle's name breaks running instances,
//! renaming the `const` does not.

use std::fmt;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::failure::{ActivityError, Failure, Never};

/// An activity that takes `I`, returns `O` and fails with `E`.
pub struct Activity<I, O, E = ActivityError> {
    name: &'static str,
    types: PhantomData<fn(I) -> Result<O, E>>,
}

/// An orchestration that takes `I` and returns `O`.
pub struct Orchestration<I, O> {
    name: &'static str,
    types: PhantomData<fn(I) -> O>,
}

/// An external event that carries a `T`.
pub struct Event<T> {
    name: &'static str,
    types: PhantomData<fn(T)>,
}

macro_rules! handle_impls {
    ($handle:ident < $($param:ident),* >) => {
        impl<$($param),*> $handle<$($param),*> {
            /// The handle of the function or event named `name` (case-insensitive, as
            /// Durable Functions matches names).
            pub const fn new(name: &'static str) -> Self {
                $handle { name, types: PhantomData }
            }

            /// The name the handle was declared with: what histories record and what
            /// registration and calls match.
            pub const fn name(&self) -> &'static str {
                self.name
            }
        }

        impl<$($param),*> Clone for $handle<$($param),*> {
            fn clone(&self) -> Self {
                *self
            }
        }

        impl<$($param),*> Copy for $handle<$($param),*> {}

        impl<$($param),*> fmt::Debug for $handle<$($param),*> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($handle), self.name)
            }
        }
    };
}

handle_impls!(Activity<I, O, E>);
handle_impls!(Orchestration<I, O>);
handle_impls!(Event<T>);

/// What a call runs: an activity or a sub-orchestration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The activity with this name.
    Activity(&'static str),
    /// The orchestration with this name, run as a child instance.
    SubOrchestration(&'static str),
}

/// A handle an orchestration can call: [`Activity`] or [`Orchestration`]. Sealed.
pub trait Callable: Copy + private::Sealed {
    /// What the function takes; serialized to JSON when the call is scheduled.
    type Input: Serialize;
    /// What the function returns; deserialized from the JSON result.
    type Output: DeserializeOwned;
    /// What the caller gets in [`crate::failure::TaskFailure::Activity`].
    type Failure: Failure;
    /// What a call of this handle runs.
    fn target(&self) -> Target;
}

impl<I: Serialize, O: DeserializeOwned, E: Failure> Callable for Activity<I, O, E> {
    type Input = I;
    type Output = O;
    type Failure = E;
    fn target(&self) -> Target {
        Target::Activity(self.name)
    }
}

/// A sub-orchestration's failure is always [`crate::failure::TaskFailure::Other`], with the
/// failure details its orchestration ended with.
impl<I: Serialize, O: DeserializeOwned> Callable for Orchestration<I, O> {
    type Input = I;
    type Output = O;
    type Failure = Never;
    fn target(&self) -> Target {
        Target::SubOrchestration(self.name)
    }
}

mod private {
    pub trait Sealed {}
    impl<I, O, E> Sealed for super::Activity<I, O, E> {}
    impl<I, O> Sealed for super::Orchestration<I, O> {}
}
