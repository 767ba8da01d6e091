//! The training configuration: TOML, every key documented in the embedded default
//! ([`DEFAULT_TOML`]), unknown keys rejected, `--set section.key=value` overrides.
//!
//! The embedded default is the single source of defaults: a user file is merged over it key by
//! key, then the merged table is deserialised into [`TrainConfig`] (whose structs deny unknown
//! fields) and validated. Every error names the key it is about.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// The documented default configuration (`opt-rs train` with no arguments runs it).
pub const DEFAULT_TOML: &str = include_str!("default.toml");

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub optim: OptimSection,
    pub schedule: ScheduleSection,
    pub train: TrainSection,
    pub fp16: Fp16Section,
    pub guards: GuardSection,
    pub run: RunSection,
    pub sample: SampleSection,
    pub parallel: ParallelSection,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub preset: String,
    pub init_from: String,
    pub dropout: f32,
    pub attention_dropout: f32,
    pub init_std: f32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadRowPolicy {
    Fail,
    Skip,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub train: String,
    pub valid: String,
    pub seq_len: usize,
    pub packing: bool,
    pub shuffle: bool,
    pub on_bad_row: BadRowPolicy,
    pub tokenizer: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecayScope {
    All,
    Matrices,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub decay: DecayScope,
    pub clip_norm: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    pub end_lr: f64,
    pub total_steps: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
    Fp16,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_steps: u64,
    pub seed: u64,
    pub precision: Precision,
    /// Recompute each layer's activations in the backward pass instead of keeping them.
    pub recompute: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fp16Section {
    pub init_scale: f64,
    pub scale_window: u64,
    pub min_scale: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardSection {
    pub enabled: bool,
    pub ewma_decay: f64,
    pub spike_ratio: f64,
    pub warmup_steps: u64,
    pub max_spikes: usize,
    pub spike_window: u64,
    pub max_nonfinite: usize,
    pub rollback_lr_factor: f64,
    pub max_rollbacks: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub dir: String,
    pub checkpoint_every: u64,
    pub keep_last: usize,
    pub log_every: u64,
    pub eval_every: u64,
    pub eval_batches: usize,
    pub peak_gflops: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleSection {
    pub prompts: Vec<String>,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
}

/// `[parallel]`: how a multi-rank launch (`mpirun`, torchrun) splits the run. opt-train only
/// checks what it can on its own (degrees at least 1, batch rows per data rank); the world size
/// and the model's shape are checked where the ranks are connected (`opt_dist::ParallelPlan`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelSection {
    pub tp: usize,
    pub fsdp: usize,
    pub dp: usize,
    /// With `fsdp > 1`: gather each layer just before use and free it after (ZeRO-3), instead
    /// of keeping the whole slice gathered (ZeRO-2; each layer's gradient is reduce-scattered after its backward in both).
    pub reshard_after_forward: bool,
}

impl ParallelSection {
    /// Ranks that take different rows of each batch: `fsdp · dp`.
    pub fn data_ranks(&self) -> usize {
        self.fsdp * self.dp
    }
    pub fn world(&self) -> usize {
        self.tp * self.fsdp * self.dp
    }
    /// Whether the model streams its layers: fsdp > 1 (ZeRO-3 gathers each layer as it is
    /// used; ZeRO-2, `reshard_after_forward = false`, copies it out of the gathered slice).
    pub fn streams_layers(&self) -> bool {
        self.fsdp > 1
    }
}

impl TrainConfig {
    /// The embedded default.
    pub fn default_config() -> Result<Self> {
        Self::load(None, &[])
    }

    /// Build a config: the embedded default, then `file` merged over it (if given), then each
    /// `section.key=value` override in order; then validate.
    pub fn load(file: Option<&Path>, sets: &[String]) -> Result<Self> {
        let text = match file {
            Some(p) => Some((std::fs::read_to_string(p).map_err(|e| TrainError::io(p, e))?, p.display().to_string())),
            None => None,
        };
        Self::from_parts(text.as_ref().map(|(t, o)| (t.as_str(), o.as_str())), sets)
    }

    /// Like [`TrainConfig::load`] with the file's text given directly (`(text, origin)`).
    pub fn from_parts(file: Option<(&str, &str)>, sets: &[String]) -> Result<Self> {
        let mut table = parse_table(DEFAULT_TOML, "embedded default config")?;
        if let Some((text, origin)) = file {
            let user = parse_table(text, origin)?;
            merge(&mut table, user, "");
        }
        for s in sets {
            apply_set(&mut table, s)?;
        }
        let cfg = TrainConfig::deserialize(toml::Value::Table(table)).map_err(de_error)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The effective configuration as TOML (what the run folder's `config.toml` holds).
    pub fn to_toml(&self) -> Result<String> {
        let body =
            toml::to_string(self).map_err(|e| TrainError::Config { key: "(all)".into(), detail: e.to_string() })?;
        Ok(format!(
            "# Effective configuration of this run (written by opt-rs train).\n\
             # Every key is documented in `opt-rs train --print-config`.\n\n{body}"
        ))
    }

    /// The run folder.
    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from(&self.run.dir)
    }

    /// Steps the LR decay spans (`schedule.total_steps`, or `train.max_steps` when 0).
    pub fn schedule_total(&self) -> u64 {
        if self.schedule.total_steps == 0 {
            self.train.max_steps
        } else {
            self.schedule.total_steps
        }
    }

    /// Sequences per micro-batch.
    pub fn micro_batch(&self) -> usize {
        self.train.batch_size / self.train.grad_accum.max(1)
    }

    /// Check values the types cannot; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, detail: String| Err(TrainError::Config { key: key.into(), detail });
        let m = &self.model;
        if m.init_from.is_empty() && opt_model::OptConfig::preset(&m.preset).is_err() {
            return bad(
                "model.preset",
                format!("unknown preset '{}' (known: {})", m.preset, opt_model::PRESETS.join(", ")),
            );
        }
        for (key, p) in [("model.dropout", m.dropout), ("model.attention_dropout", m.attention_dropout)] {
            if !(0.0..1.0).contains(&p) {
                return bad(key, format!("{p} is outside [0, 1)"));
            }
        }
        if !(m.init_std > 0.0 && m.init_std.is_finite()) {
            return bad("model.init_std", format!("must be positive, got {}", m.init_std));
        }
        let d = &self.data;
        if d.train.is_empty() {
            return bad("data.train", "no training data given".into());
        }
        if d.seq_len < 2 {
            return bad("data.seq_len", format!("must be at least 2 (one input and one target), got {}", d.seq_len));
        }
        let o = &self.optim;
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return bad("optim.lr", format!("must be positive, got {}", o.lr));
        }
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return bad("optim.betas", format!("beta{} = {b} is outside [0, 1)", i + 1));
            }
        }
        if !(o.eps > 0.0 && o.eps.is_finite()) {
            return bad("optim.eps", format!("must be positive, got {}", o.eps));
        }
        if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
            return bad("optim.weight_decay", format!("must be >= 0, got {}", o.weight_decay));
        }
        if !(o.clip_norm >= 0.0 && o.clip_norm.is_finite()) {
            return bad("optim.clip_norm", format!("must be >= 0 (0 = off), got {}", o.clip_norm));
        }
        let s = &self.schedule;
        if !(s.end_lr >= 0.0 && s.end_lr.is_finite()) {
            return bad("schedule.end_lr", format!("must be >= 0, got {}", s.end_lr));
        }
        let t = &self.train;
        if t.batch_size == 0 {
            return bad("train.batch_size", "must be positive".into());
        }
        if t.grad_accum == 0 || !t.batch_size.is_multiple_of(t.grad_accum) {
            return bad(
                "train.grad_accum",
                format!("must divide train.batch_size ({}), got {}", t.batch_size, t.grad_accum),
            );
        }
        if t.max_steps == 0 {
            return bad("train.max_steps", "must be positive".into());
        }
        let f = &self.fp16;
        if !(f.init_scale > 0.0 && f.init_scale.is_finite()) {
            return bad("fp16.init_scale", format!("must be positive, got {}", f.init_scale));
        }
        if f.scale_window == 0 {
            return bad("fp16.scale_window", "must be positive".into());
        }
        if !(f.min_scale > 0.0 && f.min_scale <= f.init_scale) {
            return bad(
                "fp16.min_scale",
                format!("must be in (0, init_scale = {}], got {}", f.init_scale, f.min_scale),
            );
        }
        let g = &self.guards;
        if !(0.0..1.0).contains(&g.ewma_decay) {
            return bad("guards.ewma_decay", format!("{} is outside [0, 1)", g.ewma_decay));
        }
        if g.spike_ratio.is_nan() || g.spike_ratio <= 1.0 {
            return bad("guards.spike_ratio", format!("must be above 1, got {}", g.spike_ratio));
        }
        if g.max_spikes == 0 {
            return bad("guards.max_spikes", "must be positive".into());
        }
        if g.max_nonfinite == 0 {
            return bad("guards.max_nonfinite", "must be positive".into());
        }
        if !(g.rollback_lr_factor > 0.0 && g.rollback_lr_factor <= 1.0) {
            return bad("guards.rollback_lr_factor", format!("must be in (0, 1], got {}", g.rollback_lr_factor));
        }
        let r = &self.run;
        if r.dir.is_empty() {
            return bad("run.dir", "no run folder given".into());
        }
        if r.keep_last == 0 {
            return bad("run.keep_last", "must keep at least one checkpoint".into());
        }
        if r.log_every == 0 {
            return bad("run.log_every", "must be positive".into());
        }
        if !(r.peak_gflops > 0.0 && r.peak_gflops.is_finite()) {
            return bad("run.peak_gflops", format!("must be positive, got {}", r.peak_gflops));
        }
        let sm = &self.sample;
        if !(sm.temperature >= 0.0 && sm.temperature.is_finite()) {
            return bad("sample.temperature", format!("must be >= 0 (0 = greedy), got {}", sm.temperature));
        }
        let p = &self.parallel;
        for (key, v) in [("parallel.tp", p.tp), ("parallel.fsdp", p.fsdp), ("parallel.dp", p.dp)] {
            if v == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if !self.micro_batch().is_multiple_of(p.data_ranks()) {
            return bad(
                "train.batch_size",
                format!(
                    "each micro-batch of {} rows (batch_size / grad_accum) must split evenly over the \
                     parallel.fsdp × parallel.dp = {} data ranks",
                    self.micro_batch(),
                    p.data_ranks()
                ),
            );
        }
        Ok(())
    }
}

fn parse_table(text: &str, origin: &str) -> Result<toml::Table> {
    text.parse::<toml::Table>().map_err(|e| TrainError::ConfigSyntax { origin: origin.into(), detail: e.to_string() })
}

/// Merge `over` into `base`: tables recursively, any other value replaced.
fn merge(base: &mut toml::Table, over: toml::Table, _path: &str) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o, &k),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Apply one `section.key=value` override. The value is parsed as TOML (`3`, `1e-3`, `true`,
/// `[0.9, 0.95]`, `"text"`); anything that does not parse as a TOML value is taken as a string,
/// so `--set run.dir=runs/x` works without quotes.
fn apply_set(table: &mut toml::Table, set: &str) -> Result<()> {
    let (key, raw) = set
        .split_once('=')
        .ok_or_else(|| TrainError::Config { key: set.into(), detail: "expected section.key=value".into() })?;
    let key = key.trim();
    let raw = raw.trim();
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(TrainError::Config { key: key.into(), detail: "expected section.key=value".into() });
    }
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry = cur.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(TrainError::Config { key: key.into(), detail: format!("'{p}' is not a section") }),
        };
    }
    let last = parts[parts.len() - 1];
    if let Some(toml::Value::Table(_)) = cur.get(last) {
        return Err(TrainError::Config { key: key.into(), detail: "is a section; set one of its keys".into() });
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

/// Turn toml's deserialisation error ("message\nin `section.key`") into one naming the key.
fn de_error(e: toml::de::Error) -> TrainError {
    let text = e.to_string();
    let (msg, path) = match text.rsplit_once("\nin `") {
        Some((m, p)) => (m.trim().to_string(), p.trim_end_matches(['`', '\n']).to_string()),
        None => (text.trim().to_string(), String::new()),
    };
    // For an unknown field the path is its section; name the field itself too.
    let key = match (msg.strip_prefix("unknown field `").and_then(|r| r.split_once('`')), path.is_empty()) {
        (Some((field, _)), true) => field.to_string(),
        (Some((field, _)), false) => format!("{path}.{field}"),
        (None, true) => "(config)".to_string(),
        (None, false) => path,
    };
    TrainError::Config { key, detail: msg }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_parses_and_validates() {
        let c = TrainConfig::default_config().expect("default config");
        assert_eq!(c.model.preset, "tiny");
        assert_eq!(c.optim.betas, [0.9, 0.95]);
        assert_eq!(c.schedule.kind, ScheduleKind::Linear);
        // The saved form round-trips.
        let text = c.to_toml().expect("toml");
        let back = TrainConfig::from_parts(Some((&text, "saved")), &[]).expect("reload");
        assert_eq!(back, c);
    }

    #[test]
    fn sets_are_typed() {
        let sets = [
            "train.max_steps=12".to_string(),
            "schedule.warmup_steps=2".into(),
            "optim.betas=[0.8, 0.9]".into(),
            "run.dir=runs/x y".into(),
            "data.packing=false".into(),
            "train.precision=\"bf16\"".into(),
        ];
        let c = TrainConfig::load(None, &sets).expect("config");
        assert_eq!(c.train.max_steps, 12);
        assert_eq!(c.optim.betas, [0.8, 0.9]);
        assert_eq!(c.run.dir, "runs/x y");
        assert!(!c.data.packing);
        assert_eq!(c.train.precision, Precision::Bf16);
    }

    #[test]
    fn parallel_section_is_checked() {
        let c = TrainConfig::load(None, &["parallel.tp=2".into(), "parallel.dp=2".into()]).expect("config");
        assert_eq!((c.parallel.tp, c.parallel.fsdp, c.parallel.dp), (2, 1, 2));
        assert_eq!(c.parallel.world(), 4);
        let key = |sets: &[&str]| match TrainConfig::load(None, &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        {
            Err(TrainError::Config { key, .. }) => key,
            other => panic!("expected a config error, got {other:?}"),
        };
        assert_eq!(key(&["parallel.fsdp=0"]), "parallel.fsdp");
        // 8 rows do not split over 3 data ranks.
        assert_eq!(key(&["parallel.dp=3"]), "train.batch_size");
        assert_eq!(key(&["parallel.pp=2"]), "parallel.pp");
    }
}
