//! `opt-rs generate`: decode prompts with every option of `opt-generate`, streaming text to the
//! terminal or printing one JSON object per prompt.
//!
//! Tokenizer: `--tokenizer DIR`, else the model folder's own files, else the bundled OPT
//! tokenizer when the model's vocabulary is OPT's (≥ 50265 ids). Otherwise (e.g. the 512-token
//! test fixtures) there is none: prompts must be `--ids`, and outputs carry ids only (`text` is
//! omitted from JSON; the terminal shows ids).

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use opt_generate::{
    Completion, EarlyStopping, GenerateError, GenerateRequest, Generator, Prompt, PromptOutput, SamplingParams,
    StreamEvent, TokenLogprob,
};
use opt_model::{OptConfig, OptModel};
use opt_tensor::{Backend, DType};
use opt_tokenizer::OptTokenizer;
use serde_json::{json, Map, Value};

use crate::tp_infer::TpGroup;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// HF model folder (config.json + weights; int8 folders of `opt-rs quantize` too), or a
    /// metaseq checkpoint (a .pt file or a folder of them; give --config or --preset).
    #[arg(long, required_unless_present = "random_preset")]
    model: Option<PathBuf>,
    #[command(flatten)]
    metaseq: crate::load::MetaseqArgs,
    /// Benchmarks only: random weights of a preset (tiny, 125m, ...) instead of --model.
    #[arg(long, hide = true, conflicts_with = "model")]
    random_preset: Option<String>,
    /// Text prompts (each tokenized with `</s>` prepended). Several prompts run as one batch.
    prompts: Vec<String>,
    /// JSON lines, one prompt each: a string, a list of ids, or {"prompt": string-or-ids}.
    #[arg(long)]
    prompts_file: Option<PathBuf>,
    /// A prompt as token ids, comma-separated (e.g. 2,100,7); repeat for several. No tokenizer needed.
    #[arg(long = "ids", value_name = "ID,ID,...")]
    ids: Vec<String>,
    /// Print one JSON object per prompt instead of streaming text.
    #[arg(long)]
    json: bool,
    /// New tokens per sequence at most (fewer if the model's context runs out).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Suppress EOS until this many new tokens exist.
    #[arg(long, default_value_t = 0)]
    min_new_tokens: usize,
    /// Argmax decoding (the default is sampling at temperature 1).
    #[arg(long)]
    greedy: bool,
    /// Sampling temperature (0 = greedy).
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Sample from the k most likely tokens only (0 = off).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens with probability ≥ p, p in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Locally typical sampling with this probability mass, in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    typical_p: Option<f32>,
    /// HF repetition penalty (> 1 discourages repeats, prompt included).
    #[arg(long, allow_negative_numbers = true)]
    repetition_penalty: Option<f32>,
    /// OpenAI presence penalty in [-2, 2] (generated tokens).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// OpenAI frequency penalty in [-2, 2] (generated tokens).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Never repeat an n-gram of this size (prompt included; 0 = off).
    #[arg(long, default_value_t = 0)]
    no_repeat_ngram_size: usize,
    /// Stop string (repeatable); it may span tokens and is not returned.
    #[arg(long)]
    stop: Vec<String>,
    /// Sequences per prompt.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Beam search with this many beams.
    #[arg(long, default_value_t = 1)]
    num_beams: usize,
    /// Beam score = sum of log-probs / generated_length ** length_penalty (HF).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    length_penalty: f32,
    /// Beam search stops once num_beams hypotheses are finished; `--early-stopping=never` never
    /// stops before the best running beam, scored at full length, cannot win (HF).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    early_stopping: String,
    /// Candidates per prompt of which the n best are returned (sampling: by mean log-prob;
    /// greedy: beam search with best_of beams).
    #[arg(long)]
    best_of: Option<usize>,
    /// Report each token's log-prob and this many alternatives.
    #[arg(long)]
    logprobs: Option<usize>,
    /// Include the prompt (text and log-probs) in the output.
    #[arg(long)]
    echo: bool,
    /// Sampling seed (same seed, same output). Without it one is drawn and printed to stderr.
    #[arg(long)]
    seed: Option<u64>,
    /// Weight dtype on load (compute is f32 on CPU).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Left-truncate prompts that do not fit the context (with a warning) instead of failing.
    #[arg(long)]
    truncate: bool,
    /// Tokenizer folder (default: the model folder's, else the bundled one for OPT vocabularies).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Print timing (seconds, new tokens/s) as a JSON line on stderr.
    #[arg(long, hide = true)]
    timing: bool,
    /// Tensor parallelism: split the model over the N processes of an `mpirun -np N` (or
    /// torchrun-style) launch, each loading only its slice; rank 0 prints.
    #[arg(long, default_value_t = 1)]
    tp: usize,
}

impl GenerateArgs {
    fn params(&self) -> Result<SamplingParams> {
        let early_stopping: EarlyStopping =
            self.early_stopping.parse().map_err(anyhow::Error::msg).context("--early-stopping")?;
        Ok(SamplingParams {
            max_new_tokens: self.max_new_tokens,
            min_new_tokens: self.min_new_tokens,
            greedy: self.greedy,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            typical_p: self.typical_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            stop: self.stop.clone(),
            n: self.n,
            best_of: self.best_of,
            num_beams: self.num_beams,
            length_penalty: self.length_penalty,
            early_stopping,
            logprobs: self.logprobs,
            echo: self.echo,
            seed: self.seed,
            truncate: self.truncate,
        })
    }
}

/// The prompts from the positional arguments, then `--prompts-file`, then each `--ids`.
fn collect_prompts(a: &GenerateArgs) -> Result<Vec<Prompt>> {
    let mut prompts: Vec<Prompt> = a.prompts.iter().cloned().map(Prompt::Text).collect();
    if let Some(path) = &a.prompts_file {
        let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value =
                serde_json::from_str(&line).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            let v = match v {
                Value::Object(mut o) => o
                    .remove("prompt")
                    .with_context(|| format!("{}:{}: object without \"prompt\"", path.display(), i + 1))?,
                other => other,
            };
            let p: Prompt = serde_json::from_value(v)
                .with_context(|| format!("{}:{}: expected a string or a list of token ids", path.display(), i + 1))?;
            prompts.push(p);
        }
    }
    for s in &a.ids {
        let ids = s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| t.parse::<u32>().with_context(|| format!("--ids: '{t}' is not a token id")))
            .collect::<Result<Vec<u32>>>()?;
        prompts.push(Prompt::Ids(ids));
    }
    if prompts.is_empty() {
        bail!("no prompt: give PROMPT text, --prompts-file or --ids (an empty string \"\" starts from </s>)");
    }
    Ok(prompts)
}

/// The tokenizer for a model (see the module docs), or `None` for a non-OPT vocabulary.
fn pick_tokenizer(model_dir: Option<&Path>, explicit: Option<&Path>, cfg: &OptConfig) -> Result<Option<OptTokenizer>> {
    let tok = if let Some(d) = explicit {
        Some(crate::load_tokenizer(Some(d))?)
    } else if let Some(d) = model_dir.filter(|d| ["tokenizer.json", "vocab.json"].iter().any(|f| d.join(f).exists())) {
        Some(crate::load_tokenizer(Some(d))?)
    } else if cfg.vocab_size >= opt_tokenizer::VOCAB_SIZE {
        Some(crate::load_tokenizer(None)?)
    } else {
        None
    };
    if let Some(t) = &tok {
        if t.vocab_size() > cfg.vocab_size {
            bail!(
                "the tokenizer has {} tokens but the model's vocabulary is {}: wrong tokenizer",
                t.vocab_size(),
                cfg.vocab_size
            );
        }
    }
    Ok(tok)
}

/// Library errors with the option spelled as a flag (`top_p` → `--top-p`).
fn cli_error(e: GenerateError) -> anyhow::Error {
    match e {
        GenerateError::Option { option, detail } => {
            anyhow::anyhow!("invalid option --{}: {detail}", option.replace('_', "-"))
        }
        other => other.into(),
    }
}

/// `opt-rs generate` on the backend `--device` names.
pub struct GenerateJob(pub GenerateArgs);

impl crate::device::Job for GenerateJob {
    type Output = ();
    fn run<B: Backend + 'static>(self, backend: B) -> Result<()> {
        run_with(self.0, backend)
    }
}

fn run_with<B: Backend + 'static>(a: GenerateArgs, backend: B) -> Result<()> {
    let dtype: DType = a.dtype.parse().map_err(anyhow::Error::msg).context("--dtype")?;
    let params = a.params()?;
    // Check the options before spending time on loading the model.
    params.validate().map_err(cli_error)?;
    if a.tp > 1 && backend.name() != "cpu" {
        bail!("--tp {} runs tensor-parallel shards on the CPU backend so far; drop --device {}", a.tp, backend.name());
    }
    // `--tp N`: one slice of the model per process (tp_infer.rs).
    match TpGroup::join(a.tp, a.model.as_deref(), a.random_preset.as_deref())? {
        Some(g) => {
            let out = g
                .load(a.model.as_deref(), a.random_preset.as_deref(), dtype)
                .and_then(|model| generate(&a, &model, params, Some(&g), Vec::new()));
            g.finish(out)
        }
        None => {
            let prompts = collect_prompts(&a)?;
            let model = match (&a.model, &a.random_preset) {
                (Some(dir), _) => crate::load::load_model(backend, dir, dtype, &a.metaseq)?,
                (None, Some(preset)) => {
                    let cfg = OptConfig::preset(preset)?;
                    let std = cfg.init_std;
                    OptModel::new_random(backend, cfg, dtype, std, 0)?
                }
                (None, None) => bail!("--model is required"),
            };
            generate(&a, &model, params, None, prompts)
        }
    }
}

/// Generate with a loaded model (the whole model, or this rank's tensor-parallel slice with
/// `group`; then rank 0 reads the prompts and shares them, and `prompts` is empty).
fn generate<B: Backend>(
    a: &GenerateArgs,
    model: &OptModel<B>,
    params: SamplingParams,
    group: Option<&TpGroup>,
    prompts: Vec<Prompt>,
) -> Result<()> {
    let tok = pick_tokenizer(a.model.as_deref(), a.tokenizer.as_deref(), &model.cfg)?;
    let gen = Generator::new(model, tok.as_ref());
    let (prompts, req) = match group {
        None => (prompts.clone(), GenerateRequest::new(prompts, params)),
        Some(g) => {
            // Rank 0 reads the prompts and shares them tokenized, with the seed, so every rank
            // makes the same choices; the others generate in lockstep and print nothing.
            let mut shown = Vec::new();
            let req = g.share(|| {
                shown = collect_prompts(a)?;
                crate::tp_infer::resolve(GenerateRequest::new(shown.clone(), params), tok.as_ref())
            })?;
            if !g.is_leader() {
                gen.generate(&req).map_err(cli_error)?;
                return Ok(());
            }
            (shown, req)
        }
    };

    let n_streams = req.params.n;
    let mut printer = (!a.json).then(|| TextPrinter::new(&prompts, n_streams, tok.as_ref()));
    let start = Instant::now();
    let mut first_event: Option<f64> = None;
    let out = gen
        .generate_stream(&req, |e| {
            first_event.get_or_insert_with(|| start.elapsed().as_secs_f64());
            if let Some(p) = printer.as_mut() {
                p.event(&e);
            }
            ControlFlow::Continue(())
        })
        .map_err(cli_error)?;
    let elapsed = start.elapsed().as_secs_f64();
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    if a.seed.is_none() {
        if let Some(s) = out.seed {
            eprintln!("seed: {s}");
        }
    }
    if a.json {
        let stdout = std::io::stdout();
        let mut w = stdout.lock();
        for (i, p) in out.prompts.iter().enumerate() {
            writeln!(w, "{}", serde_json::to_string(&prompt_json(i, p, tok.as_ref(), req.params.echo))?)?;
        }
    }
    if a.timing {
        let new: usize = out.prompts.iter().flat_map(|p| &p.choices).map(|c| c.token_ids.len()).sum();
        let first = first_event.unwrap_or(elapsed);
        let rows: usize = out.prompts.iter().map(|p| p.choices.len()).sum();
        eprintln!(
            "{}",
            json!({
                "sys": "opt-rs-cpu", "prompts": out.prompts.len(), "threads": rayon::current_num_threads(),
                "dtype": a.dtype, "new_tokens": new, "s": elapsed, "first_token_s": first,
                "new_tok_per_s": new as f64 / elapsed,
                "decode_tok_per_s": (new.saturating_sub(rows)) as f64 / (elapsed - first).max(1e-9),
            })
        );
    }
    Ok(())
}

fn logprob_json(l: &TokenLogprob, tok: Option<&OptTokenizer>) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), json!(l.id));
    if let Some(t) = tok {
        m.insert("text".into(), json!(t.token_text(l.id)));
    }
    m.insert("logprob".into(), json!(l.logprob));
    let top: Vec<Value> = l
        .top
        .iter()
        .map(|&(id, lp)| match tok {
            Some(t) => json!({"id": id, "text": t.token_text(id), "logprob": lp}),
            None => json!({"id": id, "logprob": lp}),
        })
        .collect();
    m.insert("top_logprobs".into(), Value::Array(top));
    Value::Object(m)
}

fn choice_json(c: &Completion, tok: Option<&OptTokenizer>, prompt_text: Option<&str>) -> Map<String, Value> {
    let mut m = Map::new();
    if let Some(text) = &c.text {
        // With --echo the text starts with the prompt, as OpenAI's API returns it.
        m.insert("text".into(), json!(format!("{}{text}", prompt_text.unwrap_or(""))));
    }
    m.insert("token_ids".into(), json!(c.token_ids));
    m.insert("finish_reason".into(), json!(c.finish_reason.as_str()));
    if let Some(lps) = &c.logprobs {
        m.insert("logprobs".into(), Value::Array(lps.iter().map(|l| logprob_json(l, tok)).collect()));
    }
    if let Some(s) = c.score {
        m.insert("score".into(), json!(s));
    }
    m
}

/// One prompt's JSON line: the first choice's fields at the top level, all choices under
/// `choices` when there are several.
fn prompt_json(i: usize, p: &PromptOutput, tok: Option<&OptTokenizer>, echo: bool) -> Value {
    let prompt_text = if echo { p.prompt_text.as_deref() } else { None };
    let mut m = Map::new();
    m.insert("prompt_index".into(), json!(i));
    if let Some(first) = p.choices.first() {
        m.extend(choice_json(first, tok, prompt_text));
    }
    if echo {
        m.insert("prompt_token_ids".into(), json!(p.prompt_token_ids));
        if let Some(lps) = &p.prompt_logprobs {
            m.insert("prompt_logprobs".into(), Value::Array(lps.iter().map(|l| logprob_json(l, tok)).collect()));
        }
    }
    if p.choices.len() > 1 {
        let all: Vec<Value> = p
            .choices
            .iter()
            .map(|c| {
                let mut o = choice_json(c, tok, prompt_text);
                o.insert("index".into(), json!(c.index));
                Value::Object(o)
            })
            .collect();
        m.insert("choices".into(), Value::Array(all));
    }
    Value::Object(m)
}

/// Streams sequences to the terminal in order: the current one live, later ones buffered until
/// their turn (several prompts decode as one batch, so their tokens arrive interleaved).
struct TextPrinter<'t> {
    /// Per stream (prompt-major): header and prompt display.
    heads: Vec<String>,
    per_prompt: usize,
    buffers: HashMap<usize, String>,
    finished: Vec<bool>,
    current: usize,
    tok: Option<&'t OptTokenizer>,
}

impl<'t> TextPrinter<'t> {
    fn new(prompts: &[Prompt], n: usize, tok: Option<&'t OptTokenizer>) -> Self {
        let several = prompts.len() * n > 1;
        let mut heads = Vec::new();
        for (pi, p) in prompts.iter().enumerate() {
            let shown = match (p, tok) {
                (Prompt::Text(s), _) => s.clone(),
                (Prompt::Ids(ids), Some(t)) => t.decode(ids, true).unwrap_or_default(),
                (Prompt::Ids(ids), None) => format!("{ids:?} →"),
            };
            for c in 0..n {
                let head = match (several, n > 1) {
                    (false, _) => String::new(),
                    (true, false) => format!("=== prompt {pi} ===\n"),
                    (true, true) => format!("=== prompt {pi}, sample {c} ===\n"),
                };
                heads.push(format!("{head}{shown}"));
            }
        }
        let mut p = TextPrinter {
            finished: vec![false; heads.len()],
            heads,
            per_prompt: n,
            buffers: HashMap::new(),
            current: 0,
            tok,
        };
        p.start_current();
        p
    }

    fn write(s: &str) {
        let mut out = std::io::stdout().lock();
        // A closed pipe (e.g. `| head`) should not abort generation with a panic.
        let _ = out.write_all(s.as_bytes()).and_then(|_| out.flush());
    }

    fn start_current(&mut self) {
        if let Some(h) = self.heads.get(self.current) {
            let buffered = self.buffers.remove(&self.current).unwrap_or_default();
            Self::write(&format!("{h}{buffered}"));
        }
    }

    fn event(&mut self, e: &StreamEvent) {
        let k = e.prompt * self.per_prompt + e.choice;
        let piece = match self.tok {
            Some(_) => e.text.clone(),
            None => e.token_ids.iter().map(|t| format!(" {t}")).collect(),
        };
        if k == self.current {
            Self::write(&piece);
        } else {
            self.buffers.entry(k).or_default().push_str(&piece);
        }
        if e.finish_reason.is_some() {
            if let Some(f) = self.finished.get_mut(k) {
                *f = true;
            }
            while self.finished.get(self.current).copied().unwrap_or(false) {
                Self::write("\n");
                self.current += 1;
                self.start_current();
            }
        }
    }
}
