//! The model: config switches, layers, attention, the one decoder, and loading a whole
//! checkpoint (weights + tokenizer + generation settings) into a ready-to-run bundle.

pub mod attention;
mod attention_kernels;
mod cache;
mod checkpointing;
pub mod config;
mod decode_attention;
pub mod decoder;
pub mod gguf_export;
mod gguf_requantize;
pub mod inspect;
mod int8_products;
pub mod layers;
pub mod load;
pub mod norm;
pub mod rope;
mod train_layer;
pub(crate) mod train_ops;

pub use config::{Family, ModelConfig, RopeScaling};
pub use decoder::{Cache, Model};
pub use load::{LoadOptions, LoadedModel};
