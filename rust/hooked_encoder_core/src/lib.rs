//! A BERT-style encoder forward (and backward) pass on [Candle](https://github.com/huggingface/candle)
//! with a named hook point on every interesting activation, following TransformerLens's
//! `HookedEncoder` (3.x); BERT, RoBERTa/XLM-R/CamemBERT, DistilBERT, MPNet, ELECTRA and
//! ModernBERT checkpoints load (what each family changes is in [`Family`]).
//!
//! The crate is pure Rust: no Python. The PyO3 binding (`hooked_encoder_py`) and the Python
//! package on top of it implement the user-facing API.
//!
//! * [`BertConfig`] describes the architecture with TransformerLens field names.
//! * [`HookedBert`] holds the weights and runs [`HookedBert::forward`].
//! * [`HookPoint`] names every activation exactly as TransformerLens does
//!   (`blocks.0.attn.hook_pattern`), and [`Hooks`] is the callback interface through which a
//!   caller records or replaces activations. A hook point nobody asked for costs one bit test.
#![deny(missing_docs)]

mod config;
mod cpu;
mod cuda;
mod edits;
mod error;
mod family;
mod hooks;
mod kernels;
mod model;
#[doc(hidden)]
pub mod packed_matmul;
pub mod simd;
mod weights;

pub use config::{Activation, AttentionDir, AttnType, BertConfig};
pub use cuda::open_device as open_cuda_device;
pub use edits::{Edit, EditOp};
pub use error::{Error, Result};
pub use family::{Family, Positions};
pub use hooks::{BlockHook, HookPoint, HookSet, Hooks, NoHooks, RecordingHooks};
pub use model::{ForwardInput, HookedBert, Output, Part, Start, Tape};
pub use weights::{TensorSource, WeightFiles, WeightMap};
