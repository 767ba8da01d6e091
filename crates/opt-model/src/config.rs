//! OPT configuration: HF `config.json` with every field that changes the math, and named
//! presets for each size in the OPT paper.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{ModelError, Result};
use opt_tensor::Activation;

/// The fields of HF's `OPTConfig` that the computation depends on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptConfig {
    pub vocab_size: usize,
    /// d_model (C).
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub ffn_dim: usize,
    /// Usable positions. OPT's position table has `max_position_embeddings + 2` rows because
    /// positions start at 2 (a fairseq leftover: ids 0/1 were reserved for padding).
    pub max_position_embeddings: usize,
    /// Pre-LN (true, every size but 350M) or post-LN (350M).
    pub do_layer_norm_before: bool,
    /// Width of the token embedding. When it differs from `hidden_size` (350M: 512 vs 1024)
    /// the model has `project_in` (Dp→C) and `project_out` (C→Dp) linear maps without bias.
    pub word_embed_proj_dim: usize,
    /// Biases on the linear layers (false for Galactica).
    pub enable_bias: bool,
    /// LayerNorms have weight and bias (false for Galactica).
    pub layer_norm_elementwise_affine: bool,
    pub activation_function: String,
    /// Drop the final LayerNorm even in pre-LN models (some converted checkpoints).
    #[serde(rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    pub tie_word_embeddings: bool,
    pub dropout: f32,
    pub attention_dropout: f32,
    pub init_std: f32,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
}

/// Layer-norm epsilon (PyTorch's default, used by every OPT LayerNorm).
pub const LN_EPS: f32 = 1e-5;
/// First position id: OPT positions are offset by 2.
pub const POSITION_OFFSET: usize = 2;

impl OptConfig {
    /// Parse HF `config.json` text. Shape fields are required; the others default as HF's
    /// `OPTConfig` does. `origin` names the file in error messages.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| ModelError::Config {
            origin: origin.into(),
            field: "(json)".into(),
            detail: e.to_string(),
        })?;
        let obj = v.as_object().ok_or_else(|| ModelError::Config {
            origin: origin.into(),
            field: "(root)".into(),
            detail: "expected a JSON object".into(),
        })?;
        let err =
            |field: &str, detail: String| ModelError::Config { origin: origin.into(), field: field.into(), detail };
        if let Some(mt) = obj.get("model_type").and_then(Value::as_str) {
            if mt != "opt" {
                return Err(err("model_type", format!("'{mt}' is not an OPT model (expected \"opt\")")));
            }
        }
        let req_usize = |field: &str| -> Result<usize> {
            match obj.get(field) {
                None | Some(Value::Null) => Err(err(field, "missing required field".into())),
                Some(x) => x
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| err(field, format!("expected a non-negative integer, got {x}"))),
            }
        };
        let opt_usize = |field: &str, default: usize| -> Result<usize> {
            match obj.get(field) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| err(field, format!("expected a non-negative integer, got {x}"))),
            }
        };
        let opt_bool = |field: &str, default: bool| -> Result<bool> {
            match obj.get(field) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x.as_bool().ok_or_else(|| err(field, format!("expected true or false, got {x}"))),
            }
        };
        let opt_f32 = |field: &str, default: f32| -> Result<f32> {
            match obj.get(field) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => {
                    x.as_f64().map(|f| f as f32).ok_or_else(|| err(field, format!("expected a number, got {x}")))
                }
            }
        };
        let opt_id = |field: &str, default: u32| -> Result<u32> {
            match obj.get(field) {
                None | Some(Value::Null) => Ok(default),
                // HF allows a list of eos ids; OPT uses one. Take the first.
                Some(Value::Array(a)) if !a.is_empty() => a[0]
                    .as_u64()
                    .map(|n| n as u32)
                    .ok_or_else(|| err(field, format!("expected a token id, got {}", a[0]))),
                Some(x) => {
                    x.as_u64().map(|n| n as u32).ok_or_else(|| err(field, format!("expected a token id, got {x}")))
                }
            }
        };
        let hidden_size = req_usize("hidden_size")?;
        let activation_function = match obj.get("activation_function") {
            None | Some(Value::Null) => "relu".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(x) => return Err(err("activation_function", format!("expected a string, got {x}"))),
        };
        let cfg = OptConfig {
            vocab_size: req_usize("vocab_size")?,
            hidden_size,
            num_hidden_layers: req_usize("num_hidden_layers")?,
            num_attention_heads: req_usize("num_attention_heads")?,
            ffn_dim: req_usize("ffn_dim")?,
            max_position_embeddings: req_usize("max_position_embeddings")?,
            do_layer_norm_before: opt_bool("do_layer_norm_before", true)?,
            word_embed_proj_dim: opt_usize("word_embed_proj_dim", hidden_size)?,
            enable_bias: opt_bool("enable_bias", true)?,
            layer_norm_elementwise_affine: opt_bool("layer_norm_elementwise_affine", true)?,
            activation_function,
            remove_final_layer_norm: opt_bool("_remove_final_layer_norm", false)?,
            tie_word_embeddings: opt_bool("tie_word_embeddings", true)?,
            dropout: opt_f32("dropout", 0.1)?,
            attention_dropout: opt_f32("attention_dropout", 0.0)?,
            init_std: opt_f32("init_std", 0.02)?,
            pad_token_id: opt_id("pad_token_id", 1)?,
            bos_token_id: opt_id("bos_token_id", 2)?,
            eos_token_id: opt_id("eos_token_id", 2)?,
        };
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Read `config.json` from a model folder (or a path to the file itself).
    pub fn from_path(path: &Path) -> Result<Self> {
        // A folder (or a path that does not exist: report the config.json we looked for).
        let file = if path.is_dir() || !path.exists() { path.join("config.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(|e| ModelError::Io { path: file.clone(), source: e })?;
        Self::from_json_str(&text, &file.display().to_string())
    }

    /// Check the invariants the kernels rely on; errors name the field.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let err = |field: &str, detail: String| {
            Err(ModelError::Config { origin: origin.into(), field: field.into(), detail })
        };
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("ffn_dim", self.ffn_dim),
            ("max_position_embeddings", self.max_position_embeddings),
            ("word_embed_proj_dim", self.word_embed_proj_dim),
        ] {
            if v == 0 {
                return err(name, "must be positive".into());
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return err(
                "num_attention_heads",
                format!("{} heads do not divide hidden_size {}", self.num_attention_heads, self.hidden_size),
            );
        }
        if Activation::parse(&self.activation_function).is_none() {
            return err(
                "activation_function",
                format!("unknown activation '{}' (expected relu or gelu)", self.activation_function),
            );
        }
        for (name, p) in [("dropout", self.dropout), ("attention_dropout", self.attention_dropout)] {
            if !(0.0..1.0).contains(&p) {
                return err(name, format!("{p} is outside [0, 1)"));
            }
        }
        for (name, id) in [
            ("pad_token_id", self.pad_token_id),
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if id as usize >= self.vocab_size {
                return err(name, format!("{id} is not below vocab_size {}", self.vocab_size));
            }
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    pub fn activation(&self) -> Activation {
        Activation::parse(&self.activation_function).unwrap_or(Activation::Relu)
    }
    /// 350M-style embedding projection present.
    pub fn has_projection(&self) -> bool {
        self.word_embed_proj_dim != self.hidden_size
    }
    /// The decoder ends with a LayerNorm (pre-LN models unless `_remove_final_layer_norm`).
    pub fn has_final_layer_norm(&self) -> bool {
        self.do_layer_norm_before && !self.remove_final_layer_norm
    }
    /// Rows of the position table (`max_position_embeddings + 2`, see [`POSITION_OFFSET`]).
    pub fn position_rows(&self) -> usize {
        self.max_position_embeddings + POSITION_OFFSET
    }

    /// A named preset: every size of the OPT paper plus `tiny` for tests and the default run.
    pub fn preset(name: &str) -> Result<Self> {
        let (layers, heads, d) = match name.to_ascii_lowercase().trim_start_matches("opt-") {
            "tiny" => (2, 4, 64),
            "125m" => (12, 12, 768),
            "350m" => (24, 16, 1024),
            "1.3b" => (24, 32, 2048),
            "2.7b" => (32, 32, 2560),
            "6.7b" => (32, 32, 4096),
            "13b" => (40, 40, 5120),
            "30b" => (48, 56, 7168),
            "66b" => (64, 72, 9216),
            "175b" => (96, 96, 12288),
            other => {
                return Err(ModelError::Config {
                    origin: "preset".into(),
                    field: "preset".into(),
                    detail: format!("unknown preset '{other}' (known: {})", PRESETS.join(", ")),
                })
            }
        };
        let is_350m = d == 1024;
        Ok(OptConfig {
            vocab_size: 50272,
            hidden_size: d,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            ffn_dim: 4 * d,
            max_position_embeddings: if layers == 2 { 256 } else { 2048 },
            // 350M is the one post-LN OPT, with a 512-wide embedding projected to 1024.
            do_layer_norm_before: !is_350m,
            word_embed_proj_dim: if is_350m { 512 } else { d },
            enable_bias: true,
            layer_norm_elementwise_affine: true,
            activation_function: "relu".into(),
            remove_final_layer_norm: false,
            tie_word_embeddings: true,
            dropout: 0.1,
            attention_dropout: 0.0,
            init_std: 0.006,
            pad_token_id: 1,
            bos_token_id: 2,
            eos_token_id: 2,
        })
    }

    /// The HF `config.json` object for this config (what `save_pretrained` writes).
    pub fn to_hf_json(&self, dtype: opt_tensor::DType) -> Value {
        serde_json::json!({
            "architectures": ["OPTForCausalLM"],
            "model_type": "opt",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "ffn_dim": self.ffn_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "do_layer_norm_before": self.do_layer_norm_before,
            "word_embed_proj_dim": self.word_embed_proj_dim,
            "enable_bias": self.enable_bias,
            "layer_norm_elementwise_affine": self.layer_norm_elementwise_affine,
            "activation_function": self.activation_function,
            "_remove_final_layer_norm": self.remove_final_layer_norm,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
            "init_std": self.init_std,
            "layerdrop": 0.0,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "use_cache": true,
            "dtype": dtype.torch_name(),
        })
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        crate::params::ParamLayout::new(self).total()
    }
}

/// Names accepted by [`OptConfig::preset`].
pub const PRESETS: &[&str] = &["tiny", "125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b", "175b"];

/// Extension: parse activations by their HF names.
pub trait ActivationExt {
    fn parse(s: &str) -> Option<Activation>;
}

impl ActivationExt for Activation {
    fn parse(s: &str) -> Option<Activation> {
        match s {
            "relu" => Some(Activation::Relu),
            "gelu" => Some(Activation::Gelu),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Map<String, Value> {
        serde_json::json!({
            "model_type": "opt", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "ffn_dim": 256, "max_position_embeddings": 64
        })
        .as_object()
        .cloned()
        .unwrap_or_default()
    }

    fn parse(m: &serde_json::Map<String, Value>) -> Result<OptConfig> {
        OptConfig::from_json_str(&Value::Object(m.clone()).to_string(), "test/config.json")
    }

    #[test]
    fn defaults_follow_hf() {
        let c = parse(&base()).expect("valid");
        assert!(c.do_layer_norm_before && c.enable_bias && c.tie_word_embeddings);
        assert_eq!(c.word_embed_proj_dim, 64);
        assert_eq!(c.position_rows(), 66);
        assert_eq!(c.activation(), Activation::Relu);
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let mut m = base();
        m.insert("num_attention_heads".into(), 5.into());
        let e = parse(&m).unwrap_err().to_string();
        assert!(e.contains("num_attention_heads") && e.contains("test/config.json"), "{e}");

        let mut m = base();
        m.insert("activation_function".into(), "swish".into());
        let e = parse(&m).unwrap_err().to_string();
        assert!(e.contains("activation_function") && e.contains("swish"), "{e}");

        let mut m = base();
        m.remove("ffn_dim");
        let e = parse(&m).unwrap_err().to_string();
        assert!(e.contains("ffn_dim") && e.contains("missing"), "{e}");

        let mut m = base();
        m.insert("hidden_size".into(), "big".into());
        let e = parse(&m).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");

        let e = OptConfig::from_json_str("{not json", "x/config.json").unwrap_err().to_string();
        assert!(e.contains("x/config.json"), "{e}");

        let mut m = base();
        m.insert("model_type".into(), "llama".into());
        let e = parse(&m).unwrap_err().to_string();
        assert!(e.contains("model_type"), "{e}");
    }

    #[test]
    fn presets_match_the_paper() {
        let expect = [
            ("125m", 125),
            ("350m", 331),
            ("1.3b", 1316),
            ("2.7b", 2652),
            ("6.7b", 6658),
            ("13b", 12853),
            ("30b", 29975),
            ("66b", 65702),
            ("175b", 174594),
        ];
        for (name, millions) in expect {
            let c = OptConfig::preset(name).expect("preset");
            let n = c.num_params() / 1_000_000;
            assert!(n.abs_diff(millions) <= millions / 50 + 2, "{name}: {n}M params, expected ≈{millions}M");
        }
        let c350 = OptConfig::preset("350m").expect("preset");
        assert!(!c350.do_layer_norm_before && c350.has_projection());
        assert!(OptConfig::preset("7b").is_err());
    }
}
