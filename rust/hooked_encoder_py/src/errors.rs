//! Mapping core errors onto Python exceptions.

use hooked_encoder_core::Error;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyKeyError, PyKeyboardInterrupt, PyValueError};
use pyo3::PyErr;

create_exception!(
    hooked_encoder._core,
    HookedEncoderError,
    PyException,
    "Base class of the errors raised by hooked_encoder itself."
);
create_exception!(
    hooked_encoder._core,
    CheckpointError,
    HookedEncoderError,
    "A checkpoint (config or weights) is missing, unreadable, or does not fit its config."
);

/// Converts a core error. A Python exception raised inside a user's hook travels through the
/// core boxed in [`Error::Hook`] and comes back out as the very same exception object.
pub fn to_py_err(err: Error) -> PyErr {
    match err {
        Error::Hook { source, name } => match source.downcast::<PyErr>() {
            Ok(py_err) => *py_err,
            Err(other) => HookedEncoderError::new_err(format!("hook on {name:?} failed: {other}")),
        },
        Error::Config(_)
        | Error::Input(_)
        | Error::HookReplacement { .. }
        | Error::MissingHead(_) => PyValueError::new_err(err.to_string()),
        Error::UnknownHook(_) => PyKeyError::new_err(err.to_string()),
        Error::Checkpoint(_) => CheckpointError::new_err(err.to_string()),
        Error::Interrupted => PyKeyboardInterrupt::new_err(err.to_string()),
        Error::Candle(_) => HookedEncoderError::new_err(err.to_string()),
    }
}
