//! opt-generate
