//! LoRA training: the run's config, jsonl data into padded batches, AdamW with clipping and
//! schedules, and the trainer that writes a PEFT adapter and metrics.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod loss;
pub mod optim;
pub mod plot;
pub mod run;
pub mod trainer;

pub use config::{Schedule, TargetModules, TrainConfig};
pub use trainer::{StepReport, TrainReport, Trainer};
