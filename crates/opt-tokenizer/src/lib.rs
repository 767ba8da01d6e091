//! opt-tokenizer
