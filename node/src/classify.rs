//! Errors that classify themselves: each error type of the node says what
//! kind of failure it is ([`Code`]) and names it for metrics
//! ([`Classify::kind`]), next to its own definition; [`status`] is the one
//! mapping from codes to gRPC statuses. So a new error variant is classified
//! where it is written (the compiler asks for it), not in a distant match
//! that must be kept in step by hand.

use tonic::Status;

/// What kind of failure an error is, as its caller must learn it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The caller's identity could not be established.
    Unauthenticated,
    /// The caller, its capability or the policy refuses the request.
    PermissionDenied,
    /// The request itself is malformed or asks what cannot be.
    InvalidArgument,
    /// The request is well formed but the node's state does not allow it
    /// (yet, or any more).
    FailedPrecondition,
    NotFound,
    AlreadyExists,
    /// A budget or limit is spent.
    ResourceExhausted,
    /// The node failed; the caller learns only that.
    Internal,
}

/// An error that knows its [`Code`] and its metric name.
pub trait Classify: std::fmt::Display {
    fn code(&self) -> Code;
    /// A short fixed name for metrics (never free text).
    fn kind(&self) -> &'static str;
}

/// The message an internal failure gives its caller: storage details stay
/// in the node's log.
pub const INTERNAL: &str =
    "the node failed to answer; its administrator can see why in the node log";

/// The gRPC status of `error`: its message under its code, or for an
/// internal failure a fixed message (the error itself goes to the log).
pub fn status(error: &dyn Classify) -> Status {
    let message = error.to_string();
    match error.code() {
        Code::Unauthenticated => Status::unauthenticated(message),
        Code::PermissionDenied => Status::permission_denied(message),
        Code::InvalidArgument => Status::invalid_argument(message),
        Code::FailedPrecondition => Status::failed_precondition(message),
        Code::NotFound => Status::not_found(message),
        Code::AlreadyExists => Status::already_exists(message),
        Code::ResourceExhausted => Status::resource_exhausted(message),
        Code::Internal => {
            tracing::error!(error = %message, "request failed inside the node");
            Status::internal(INTERNAL)
        }
    }
}
