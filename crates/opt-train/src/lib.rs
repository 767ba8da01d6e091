//! opt-train
