//! opt-model
