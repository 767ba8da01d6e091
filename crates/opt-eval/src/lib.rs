//! opt-eval
