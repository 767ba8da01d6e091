//! `opt-rs convert --from metaseq`: a metaseq checkpoint (consolidated, tensor-parallel parts or
//! FSDP shards) to an HF model folder, streamed tensor by tensor.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use opt_metaseq::{ConvertOptions, MetaseqCheckpoint};
use opt_model::OptConfig;
use opt_tensor::DType;

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Format of the input files. `metaseq`: restored.pt / consolidated.pt,
    /// reshard-model_part-N.pt, or FSDP *-model_part-N-shardK.pt with shard_metadata.
    #[arg(long, value_parser = ["metaseq"])]
    from: String,
    /// The model's HF config.json (or a folder holding one).
    #[arg(long, conflicts_with = "preset", required_unless_present = "preset")]
    config: Option<PathBuf>,
    /// A named OPT size instead of --config: 125m, 350m, 1.3b, 2.7b, 6.7b, 13b, 30b, 66b, 175b.
    #[arg(long)]
    preset: Option<String>,
    /// Output folder (created): config.json and model.safetensors, or shards and an index.
    #[arg(long)]
    out: PathBuf,
    /// Output dtype: f32, bf16 or f16 (default: the checkpoint's own, f16 for the OPT release).
    #[arg(long)]
    dtype: Option<String>,
    /// Largest safetensors file, e.g. 5GB, 500MB, 2GiB; a larger model is sharded.
    #[arg(long, default_value = "5GB")]
    max_shard_size: String,
    /// The checkpoint's files, or folders of *.pt files: every model part and FSDP shard.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

/// Parses `5GB`, `500MB`, `2GiB`, `123` (bytes). Decimal units as HF's `max_shard_size`.
fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().with_context(|| format!("--max-shard-size {s:?}: expected a size such as 5GB"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("--max-shard-size {s:?}: unknown unit {other:?} (use B, KB, MB, GB, KiB, MiB, GiB)"),
    };
    let bytes = num * mult;
    if !(bytes >= 1.0 && bytes.is_finite()) {
        bail!("--max-shard-size {s:?} must be at least one byte");
    }
    Ok(bytes as u64)
}

fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

/// Peak resident memory of this process so far (Linux), for the summary line.
fn peak_rss() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(format!("{:.0} MiB", kb / 1024.0))
}

pub fn run(a: ConvertArgs) -> Result<()> {
    if a.from != "metaseq" {
        bail!("--from {}: only metaseq is supported", a.from);
    }
    let cfg = match (&a.config, &a.preset) {
        (Some(p), _) => OptConfig::from_path(p).with_context(|| format!("--config {}", p.display()))?,
        (None, Some(name)) => OptConfig::preset(name).context("--preset")?,
        (None, None) => bail!("give --config CONFIG.json or --preset NAME"),
    };
    let dtype: Option<DType> = match &a.dtype {
        Some(d) => Some(d.parse().map_err(anyhow::Error::msg).context("--dtype")?),
        None => None,
    };
    let opts = ConvertOptions { dtype, max_shard_bytes: parse_size(&a.max_shard_size)? };

    let start = Instant::now();
    let ck = MetaseqCheckpoint::open(&a.files, &cfg).context("reading the metaseq checkpoint")?;
    let dtype = opts.dtype.unwrap_or_else(|| ck.source_dtype());
    eprintln!(
        "opt-rs convert: {} → {} ({} tensors, {} parameters, {dtype})",
        ck.describe(),
        a.out.display(),
        ck.tensors().len(),
        ck.tensors().iter().map(|t| t.numel()).sum::<usize>(),
    );
    for d in ck.dropped() {
        eprintln!("  dropped {d}");
    }

    let pb = ProgressBar::with_draw_target(Some(ck.tensors().len() as u64), ProgressDrawTarget::stderr_with_hz(4));
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:28.cyan/blue}] {pos}/{len} tensors {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    if !std::io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    let report = opt_metaseq::convert(&ck, &a.out, &opts, &mut |t| {
        pb.set_message(t.name.clone());
        pb.inc(1);
    })
    .with_context(|| format!("converting into {}", a.out.display()))?;
    pb.finish_and_clear();

    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} tensors, {} of {} in {secs:.1} s{}:",
        report.tensors,
        human_bytes(report.bytes),
        report.dtype,
        peak_rss().map(|m| format!(" (peak memory {m})")).unwrap_or_default(),
    );
    for f in &report.files {
        eprintln!("  {}", f.display());
    }
    eprintln!("next: opt-rs generate --model {} \"Hello, my name is\"", a.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB").ok(), Some(5_000_000_000));
        assert_eq!(parse_size("500MB").ok(), Some(500_000_000));
        assert_eq!(parse_size("2GiB").ok(), Some(2 << 30));
        assert_eq!(parse_size("1.5kb").ok(), Some(1500));
        assert_eq!(parse_size("123").ok(), Some(123));
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("GB").is_err());
    }
}
