//! Measurements behind `tern bench`.
