//! LoRA adapters: PEFT's files (config and weights, read and written), adapters bound to a
//! base model's linear layers, the batched LoRA forward, the registry of named adapters, and
//! merging an adapter into a checkpoint.

pub mod adapter;
pub mod apply;
pub mod config;
mod kernel;
pub mod merge;
pub mod registry;

pub use adapter::{LoraAdapter, LoraPair, Slot, SlotTable};
pub use apply::{BatchAdapters, GradSink, HalfProducts};
pub use config::{AdapterConfig, Excludes, Targets};
pub use registry::{AdapterInfo, AdapterRegistry};
