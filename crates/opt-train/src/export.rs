//! `opt-rs export`: a run's checkpoint as a Hugging Face model folder (config.json,
//! model.safetensors in the chosen dtype, generation_config.json, and the tokenizer files), so
//! `OPTForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` load it as they would a
//! `facebook/opt-*` download.

use std::path::{Path, PathBuf};

use opt_model::OptModel;
use opt_tensor::{CpuBackend, DType};

use crate::checkpoint;
use crate::config::TrainConfig;
use crate::{Result, TrainError};

const BUNDLED_VOCAB: &str = include_str!("../../../assets/tokenizer/vocab.json");
const BUNDLED_MERGES: &str = include_str!("../../../assets/tokenizer/merges.txt");

/// What HF's OPT repositories put in tokenizer_config.json (GPT-2 BPE, `</s>` as BOS/EOS, no
/// prefix space, BOS prepended).
const TOKENIZER_CONFIG: &str = r#"{
  "tokenizer_class": "GPT2Tokenizer",
  "add_bos_token": true,
  "add_prefix_space": false,
  "bos_token": "</s>",
  "eos_token": "</s>",
  "unk_token": "</s>",
  "pad_token": "<pad>",
  "errors": "replace",
  "model_max_length": 1000000000000000019884624838656
}
"#;

/// Export the checkpoint at `step` (the newest when `None`) of the run in `run_dir` to `out`
/// with weights in `dtype`. Returns the checkpoint folder used. A sharded checkpoint (a
/// multi-rank run's) needs its shards consolidated first: see [`export_run_with`].
pub fn export_run(run_dir: &Path, step: Option<u64>, out: &Path, dtype: DType) -> Result<PathBuf> {
    export_run_with(run_dir, step, out, dtype, &|dir: &Path, dtype| {
        if checkpoint::sharded_meta(dir)?.is_some() {
            return Err(TrainError::Checkpoint {
                path: dir.to_path_buf(),
                detail: "a sharded checkpoint (parallel.json): `opt-rs export` consolidates it, or run                          `opt-rs checkpoint reshard DIR OUT --tp 1 --fsdp 1` first"
                    .into(),
            });
        }
        Ok(OptModel::from_folder(CpuBackend::new(), dir, dtype)?)
    })
}

/// How [`export_run_with`] reads a checkpoint folder's model.
pub type LoadModel<'a> = &'a dyn Fn(&Path, DType) -> Result<OptModel<CpuBackend>>;

/// [`export_run`] with the checkpoint's model read by `load` (opt-rs consolidates sharded
/// checkpoints with opt-dist, tensor by tensor).
pub fn export_run_with(
    run_dir: &Path,
    step: Option<u64>,
    out: &Path,
    dtype: DType,
    load: LoadModel<'_>,
) -> Result<PathBuf> {
    let root = run_dir.join(checkpoint::CHECKPOINTS);
    let all = checkpoint::list(&root)?;
    let dir = match step {
        None => all.last().map(|(_, p)| p.clone()),
        Some(s) => all.iter().find(|(k, _)| *k == s).map(|(_, p)| p.clone()),
    }
    .ok_or_else(|| TrainError::Checkpoint {
        path: root.clone(),
        detail: match step {
            None => "no checkpoint in this run folder".into(),
            Some(s) => format!(
                "no checkpoint for step {s} (available: {})",
                all.iter().map(|(k, _)| k.to_string()).collect::<Vec<_>>().join(", ")
            ),
        },
    })?;
    let model = load(&dir, dtype)?;
    model.save_hf(out)?;
    let cfg = &model.cfg;
    let gen = serde_json::json!({
        "_from_model_config": true,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    });
    write(&out.join("generation_config.json"), &format!("{gen:#}\n"))?;
    // The run's tokenizer: a configured folder's files, or the bundled OPT tokenizer.
    let tok_dir = TrainConfig::load(Some(&dir.join("config.toml")), &[]).map(|c| c.data.tokenizer).unwrap_or_default();
    if tok_dir.is_empty() {
        write(&out.join("vocab.json"), BUNDLED_VOCAB)?;
        write(&out.join("merges.txt"), BUNDLED_MERGES)?;
        write(&out.join("tokenizer_config.json"), TOKENIZER_CONFIG)?;
    } else {
        for f in ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
            let src = Path::new(&tok_dir).join(f);
            if src.is_file() {
                std::fs::copy(&src, out.join(f)).map_err(|e| TrainError::io(&src, e))?;
            }
        }
    }
    Ok(dir)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| TrainError::io(path, e))
}
