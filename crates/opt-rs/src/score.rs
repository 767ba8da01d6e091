//! `opt-rs score`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use opt_model::score_sequence;
use opt_tensor::{Backend, DType};
use serde_json::{json, Map, Value};

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// HF model folder (config.json + weights; int8 folders of `opt-rs quantize` too), or a
    /// metaseq checkpoint (a .pt file or a folder of them; give --config or --preset).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    metaseq: crate::load::MetaseqArgs,
    /// Text to score (tokenized with the model folder's tokenizer, or the bundled one).
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    text: Option<String>,
    /// Token ids to score, comma-separated (e.g. 2,100,7). Needs no tokenizer.
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<u32>>,
    /// Number of top alternatives to show per position.
    #[arg(long, default_value_t = 0)]
    top_logprobs: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Weight dtype on load (compute is f32 on CPU).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Tokenizer folder (default: the model folder if it has one, else the bundled OPT tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

/// The tokenizer for a model folder: an explicit one, the folder's own, or the bundled one.
pub fn tokenizer_for(model_dir: &Path, explicit: Option<&Path>) -> Result<opt_tokenizer::OptTokenizer> {
    if let Some(d) = explicit {
        return crate::load_tokenizer(Some(d));
    }
    let has_own = ["tokenizer.json", "vocab.json"].iter().any(|f| model_dir.join(f).exists());
    crate::load_tokenizer(has_own.then_some(model_dir))
}

/// `opt-rs score` on any backend.
pub struct ScoreJob(pub ScoreArgs);

impl crate::device::Job for ScoreJob {
    type Output = ();
    fn run<B: Backend + 'static>(self, backend: B) -> Result<()> {
        run(self.0, backend)
    }
}

fn run<B: Backend>(a: ScoreArgs, backend: B) -> Result<()> {
    let dtype: DType = a.dtype.parse().map_err(anyhow::Error::msg).context("--dtype")?;
    let model = crate::load::load_model(backend, &a.model, dtype, &a.metaseq)?;
    // Text input needs a tokenizer; with ids, one is only used to show token strings.
    let tok = match (&a.text, a.json) {
        (Some(_), _) => Some(tokenizer_for(&a.model, a.tokenizer.as_deref())?),
        (None, false) => tokenizer_for(&a.model, a.tokenizer.as_deref()).ok(),
        (None, true) => None,
    };
    let ids = match (&a.text, &a.ids) {
        (Some(text), _) => {
            let tok = tok.as_ref().context("a tokenizer is needed for --text")?;
            if tok.vocab_size() > model.cfg.vocab_size {
                bail!(
                    "the tokenizer has {} tokens but the model's vocabulary is {}: wrong tokenizer for {}",
                    tok.vocab_size(),
                    model.cfg.vocab_size,
                    a.model.display()
                );
            }
            tok.encode(text, true)?
        }
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("give --text or --ids"),
    };
    let s = score_sequence(&model, &ids, a.top_logprobs)?;
    if a.json {
        let top: Vec<Value> = s
            .top_logprobs
            .iter()
            .map(|alts| match alts {
                None => Value::Null,
                Some(v) => {
                    let m: Map<String, Value> = v.iter().map(|(id, lp)| (id.to_string(), json!(lp))).collect();
                    Value::Object(m)
                }
            })
            .collect();
        let out = json!({
            "tokens": s.tokens,
            "token_logprobs": s.token_logprobs,
            "top_logprobs": top,
            "perplexity": s.perplexity(),
        });
        println!("{out}");
        return Ok(());
    }
    let show = |id: u32| -> String {
        match &tok {
            Some(t) => format!("{:?}", t.token_text(id)),
            None => String::new(),
        }
    };
    println!("{:>5}  {:>6}  {:<16} {:>10}  top alternatives", "pos", "id", "token", "logprob");
    for (i, &id) in s.tokens.iter().enumerate() {
        let lp = s.token_logprobs[i].map_or("-".to_string(), |x| format!("{x:.4}"));
        let alts = s.top_logprobs[i]
            .as_ref()
            .map(|v| v.iter().map(|(t, lp)| format!("{}{} {:.3}", t, show(*t), lp)).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        println!("{i:>5}  {id:>6}  {:<16} {lp:>10}  {alts}", show(id));
    }
    println!("perplexity: {:.4} over {} scored tokens", s.perplexity(), s.tokens.len().saturating_sub(1));
    Ok(())
}
