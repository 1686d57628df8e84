//! The one error type of the crate.

/// Everything that can go wrong while building or running a [`crate::HookedBert`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is missing a field, has an impossible value, or contradicts itself.
    #[error("invalid config: {0}")]
    Config(String),

    /// The caller's input (tokens, masks, token types) does not fit the model.
    #[error("invalid input: {0}")]
    Input(String),

    /// A weights file could not be read, or holds missing, misshaped or unreadable tensors.
    #[error("{0}")]
    Checkpoint(String),

    /// A hook point name that this model does not have.
    #[error("unknown hook point {0:?}")]
    UnknownHook(String),

    /// A hook returned a replacement that does not fit the activation it replaces.
    #[error("hook on {name:?} returned {got}, expected {expected}")]
    HookReplacement {
        /// Full name of the hook point.
        name: String,
        /// What the activation is (shape and dtype).
        expected: String,
        /// What the hook returned.
        got: String,
    },

    /// A caller's hook failed. The original error is kept whole so that a binding can hand the
    /// very same object back to its caller (a Python exception stays that exception).
    #[error("hook on {name:?} failed: {source}")]
    Hook {
        /// Full name of the hook point.
        name: String,
        /// What the hook raised.
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The checkpoint lacks the head a computation needs (the MLM head for logits, the pooler
    /// and NSP head for next-sentence prediction).
    #[error("{0}")]
    MissingHead(String),

    /// The caller asked to stop (see [`crate::Hooks::interrupted`]).
    #[error("the forward pass was interrupted")]
    Interrupted,

    /// An error from Candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
