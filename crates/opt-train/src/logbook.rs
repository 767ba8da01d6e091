//! `RUN_DIR/logbook.jsonl`: one JSON object per line, flushed as written, appended to across
//! resumes. Row kinds (field `kind`):
//!
//! - `"train"`: `step` (updates done, 1-based), `loss` (this step's mean token loss), `lr`,
//!   `grad_norm` (before clipping), `tokens_per_s` (since the previous row, compute time only),
//!   `mfu` (model FLOPs utilisation against `run.peak_gflops`), `tokens` (seen so far),
//!   `elapsed_s`, `peak_rss_mb` (the process's peak resident memory so far, on Linux), and
//!   `loss_scale` in fp16 runs;
//! - `"eval"`: `step`, `valid_loss`, `valid_ppl`, `valid_tokens`;
//! - `"event"`: `step`, `event` (`start`, `resume`, `nonfinite_skipped`, `spike_skipped`,
//!   `rollback`, `overflow`, `loss_scale_up`, `bad_rows_skipped`, `empty_batch`, `checkpoint`,
//!   `seed_kept`, `done`), `detail`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Result, TrainError};

pub struct Logbook {
    path: PathBuf,
    file: File,
}

impl Logbook {
    /// Open for appending (created when missing).
    pub fn open(path: &Path) -> Result<Logbook> {
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| TrainError::io(path, e))?;
        Ok(Logbook { path: path.to_path_buf(), file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, row: &Value) -> Result<()> {
        let mut line = row.to_string();
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(|e| TrainError::io(&self.path, e))?;
        self.file.flush().map_err(|e| TrainError::io(&self.path, e))
    }
}

/// Read every row of a logbook (lines that are not JSON objects are ignored: a crash may cut
/// the last line short).
pub fn read_rows(path: &Path) -> Result<Vec<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(TrainError::io(path, e)),
    };
    Ok(text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(Value::is_object).collect())
}

/// Model FLOPs per trained token: `6·N + 12·L·d·T` (the forward and backward matmuls over
/// all N parameters, tied LM head included, plus attention's scores and mixing).
pub fn flops_per_token(params: usize, layers: usize, d_model: usize, seq: usize) -> f64 {
    6.0 * params as f64 + 12.0 * (layers * d_model * seq) as f64
}

/// Peak resident memory of this process in MiB (Linux's `VmHWM`), when the OS reports it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
