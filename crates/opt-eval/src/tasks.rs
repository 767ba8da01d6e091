//! Tasks: the built-ins (read from a data folder laid out as `shared/data/eval`) and llm-foundry
//! jsonl files, whose format is detected from the keys of their first record.
//!
//! | task | file(s) | request per choice | acc_norm divisor |
//! | --- | --- | --- | --- |
//! | `lambada` | `lambada_test.jsonl` `{"text"}` | context = text up to its last space, continuation = `" " + last word` | – |
//! | `hellaswag` | `hellaswag_val_full.txt` or `.part{k}of{n}.txt`, 6 lines a task | [`harness::hellaswag_query`], `" " + preprocess(ending)` | ending's characters |
//! | `piqa` | `piqa_valid.jsonl` `{goal, sol1, sol2}` + `piqa_valid-labels.lst` | `"Question: {goal}\nAnswer:"`, `" " + sol` | sol's characters |
//! | `arc_easy` | `llmfoundry_arc_easy.jsonl` `{query, choices, gold}` | `query + "\nAnswer:"` (the query already starts with `"Question: "`), `" " + choice` | choice's characters |
//! | `wikitext` | `wikitext-2-raw-test.lf.txt`, one dataset row a line | sliding-window perplexity of `"\n\n".join(rows)` | – |
//! | file, `multiple_choice` | `{"query", "choices", "gold"}` | `query`, `" " + choice` | choice's characters |
//! | file, `schema` | `{"context_options", "continuation", "gold"}` | each option, `" " + continuation` | continuation's characters |
//! | file, `lambada` | `{"text"}` | as `lambada` | – |
//!
//! The prompts are lm-evaluation-harness's (`piqa.yaml`, `arc_easy.yaml`, `lambada_openai.yaml`,
//! `hellaswag/utils.py`); a space between context and choice is the harness's
//! `target_delimiter`. acc_norm divides by the length of the choice text without that space, as
//! the harness's `completion_len` does.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::harness::{hellaswag_preprocess, hellaswag_query};
use crate::{EvalError, Result};

/// Names accepted by [`load_task`] (besides file paths).
pub const BUILTIN_TASKS: &[&str] = &["lambada", "hellaswag", "piqa", "arc_easy", "wikitext"];

/// A multiple-choice item: one `(context, continuation)` request per choice.
#[derive(Clone, Debug, PartialEq)]
pub struct ChoiceDoc {
    pub requests: Vec<(String, String)>,
    /// acc_norm divides each log-likelihood by these (characters of the choice text).
    pub norm_lens: Vec<usize>,
    pub gold: usize,
}

/// A LAMBADA-style item: is the target the greedy continuation, and how likely is it.
#[derive(Clone, Debug, PartialEq)]
pub struct LastWordDoc {
    pub context: String,
    pub target: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TaskData {
    Choice(Vec<ChoiceDoc>),
    LastWord(Vec<LastWordDoc>),
    /// One long text scored with a sliding window.
    Rolling {
        text: String,
        rows: usize,
    },
}

/// A loaded task.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    /// The built-in name, or the file's stem.
    pub name: String,
    /// Where the data came from, for messages.
    pub origin: String,
    pub data: TaskData,
}

impl Task {
    /// Items (documents; rows of text for `Rolling`).
    pub fn len(&self) -> usize {
        match &self.data {
            TaskData::Choice(d) => d.len(),
            TaskData::LastWord(d) => d.len(),
            TaskData::Rolling { rows, .. } => *rows,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Loads a built-in task by name (its data read from `data_dir`) or a jsonl task file by path.
/// `limit` keeps the first N items (for `wikitext`, the first N rows of the text).
pub fn load_task(name_or_file: &str, data_dir: Option<&Path>, limit: Option<usize>) -> Result<Task> {
    let limit = limit.unwrap_or(usize::MAX);
    if let Some(name) = builtin_name(name_or_file) {
        let dir = data_dir.ok_or_else(|| {
            EvalError::Input(format!("built-in task '{name}' reads its data from a folder: pass --data-dir DIR"))
        })?;
        return match name {
            "lambada" => load_lambada(name, &need(name, dir.join("lambada_test.jsonl"))?, limit),
            "hellaswag" => load_hellaswag(dir, limit),
            "piqa" => load_piqa(dir, limit),
            "arc_easy" => load_arc_easy(&need(name, dir.join("llmfoundry_arc_easy.jsonl"))?, limit),
            _ => load_wikitext(&need(name, dir.join("wikitext-2-raw-test.lf.txt"))?, limit),
        };
    }
    let path = Path::new(name_or_file);
    if path.is_file() {
        return load_file(path, limit);
    }
    let looks_like_path =
        name_or_file.contains(['/', '\\']) || name_or_file.ends_with(".jsonl") || name_or_file.ends_with(".json");
    if looks_like_path {
        return Err(EvalError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    Err(EvalError::UnknownTask { name: name_or_file.to_string() })
}

/// The built-in task a name refers to (case-insensitive, with lm-eval's aliases), if any.
pub fn builtin_name(name: &str) -> Option<&'static str> {
    match name.to_ascii_lowercase().as_str() {
        "lambada" | "lambada_openai" => Some("lambada"),
        "hellaswag" => Some("hellaswag"),
        "piqa" => Some("piqa"),
        "arc_easy" | "arc-easy" => Some("arc_easy"),
        "wikitext" | "wikitext2" | "wikitext-2" => Some("wikitext"),
        _ => None,
    }
}

fn need(task: &str, path: PathBuf) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(EvalError::MissingData { task: task.into(), path })
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| EvalError::Io { path: path.to_path_buf(), source: e })
}

/// Lines of a text file with their 1-based numbers (`\r\n` tolerated; no final empty line).
fn numbered_lines(text: &str) -> Vec<(usize, &str)> {
    let mut lines: Vec<(usize, &str)> =
        text.split('\n').enumerate().map(|(i, l)| (i + 1, l.strip_suffix('\r').unwrap_or(l))).collect();
    if text.ends_with('\n') {
        lines.pop();
    }
    lines
}

fn fmt_err(path: &Path, line: usize, msg: impl Into<String>) -> EvalError {
    EvalError::Format { path: path.to_path_buf(), line, msg: msg.into() }
}

/// The JSON objects of a jsonl file with their line numbers (blank lines skipped).
fn jsonl(path: &Path, text: &str) -> Result<Vec<(usize, Map<String, Value>)>> {
    let mut out = Vec::new();
    for (n, line) in numbered_lines(text) {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(o)) => out.push((n, o)),
            Ok(other) => return Err(fmt_err(path, n, format!("expected a JSON object, got {}", kind(&other)))),
            Err(e) => return Err(fmt_err(path, n, format!("invalid JSON: {e}"))),
        }
    }
    Ok(out)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed access to one record's fields; errors carry file:line and the field name.
struct Rec<'a> {
    path: &'a Path,
    line: usize,
    obj: &'a Map<String, Value>,
}

impl Rec<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.obj.get(key).ok_or_else(|| fmt_err(self.path, self.line, format!("missing field \"{key}\"")))
    }
    fn str(&self, key: &str) -> Result<String> {
        match self.get(key)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(fmt_err(self.path, self.line, format!("\"{key}\" must be a string, got {}", kind(other)))),
        }
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let bad = |what: String| fmt_err(self.path, self.line, format!("\"{key}\" must be an array of strings{what}"));
        match self.get(key)? {
            Value::Array(a) => {
                let v: Vec<String> = a
                    .iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad(String::new()))?;
                if v.len() < 2 {
                    return Err(bad(format!(" with at least 2 entries, got {}", v.len())));
                }
                Ok(v)
            }
            other => Err(bad(format!(", got {}", kind(other)))),
        }
    }
    fn gold(&self, n_choices: usize) -> Result<usize> {
        let v = self.get("gold")?;
        match v.as_u64() {
            Some(g) if (g as usize) < n_choices => Ok(g as usize),
            _ => Err(fmt_err(
                self.path,
                self.line,
                format!("\"gold\" must be an index below {n_choices} (the number of choices), got {v}"),
            )),
        }
    }
}

fn stem(path: &Path) -> String {
    path.file_stem().map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned())
}

/// A jsonl task file; the format comes from the first record's keys.
fn load_file(path: &Path, limit: usize) -> Result<Task> {
    let text = read(path)?;
    let records = jsonl(path, &text)?;
    let Some((first_line, first)) = records.first() else {
        return Err(fmt_err(path, 1, "the file has no records"));
    };
    let has = |k: &str| first.contains_key(k);
    let name = stem(path);
    if has("query") && has("choices") {
        choice_task(name, path, &records, limit, |r| {
            let choices = r.strings("choices")?;
            let gold = r.gold(choices.len())?;
            Ok(mc_doc(r.str("query")?, &choices, gold))
        })
    } else if has("context_options") && has("continuation") {
        choice_task(name, path, &records, limit, |r| {
            let options = r.strings("context_options")?;
            let gold = r.gold(options.len())?;
            let cont = r.str("continuation")?;
            // Every option is scored on the same continuation, so acc_norm equals acc here.
            let n = cont.chars().count();
            Ok(ChoiceDoc {
                norm_lens: vec![n; options.len()],
                requests: options.into_iter().map(|o| (o, format!(" {cont}"))).collect(),
                gold,
            })
        })
    } else if has("text") {
        load_lambada(&name, path, limit)
    } else {
        let keys: Vec<&str> = first.keys().map(String::as_str).collect();
        Err(fmt_err(
            path,
            *first_line,
            format!(
                "unrecognised record with keys {keys:?}: expected llm-foundry multiple_choice {{\"query\", \"choices\", \"gold\"}}, \
                 schema {{\"context_options\", \"continuation\", \"gold\"}}, or lambada-style {{\"text\"}}"
            ),
        ))
    }
}

fn mc_doc(query: String, choices: &[String], gold: usize) -> ChoiceDoc {
    ChoiceDoc {
        requests: choices.iter().map(|c| (query.clone(), format!(" {c}"))).collect(),
        norm_lens: choices.iter().map(|c| c.chars().count()).collect(),
        gold,
    }
}

fn choice_task(
    name: String,
    path: &Path,
    records: &[(usize, Map<String, Value>)],
    limit: usize,
    f: impl Fn(&Rec<'_>) -> Result<ChoiceDoc>,
) -> Result<Task> {
    let docs =
        records.iter().take(limit).map(|(line, obj)| f(&Rec { path, line: *line, obj })).collect::<Result<Vec<_>>>()?;
    Ok(Task { name, origin: path.display().to_string(), data: TaskData::Choice(docs) })
}

/// lambada_openai: context = `text` up to its last space, target = `" " + last word`.
fn load_lambada(name: &str, path: &Path, limit: usize) -> Result<Task> {
    let text = read(path)?;
    let mut docs = Vec::new();
    for (line, obj) in jsonl(path, &text)?.into_iter().take(limit) {
        let t = Rec { path, line, obj: &obj }.str("text")?;
        let Some(cut) = t.rfind(' ') else {
            return Err(fmt_err(path, line, "\"text\" has no space, so no last word to predict"));
        };
        docs.push(LastWordDoc { context: t[..cut].to_string(), target: t[cut..].to_string() });
    }
    Ok(Task { name: name.into(), origin: path.display().to_string(), data: TaskData::LastWord(docs) })
}

/// arc_easy from llm-foundry's jsonl, with lm-eval's prompt `"Question: {q}\nAnswer:"`: the
/// query already holds `"Question: {q}"`, so only `"\nAnswer:"` is appended.
fn load_arc_easy(path: &Path, limit: usize) -> Result<Task> {
    let text = read(path)?;
    let records = jsonl(path, &text)?;
    choice_task("arc_easy".into(), path, &records, limit, |r| {
        let choices = r.strings("choices")?;
        let gold = r.gold(choices.len())?;
        Ok(mc_doc(format!("{}\nAnswer:", r.str("query")?), &choices, gold))
    })
}

/// PIQA: `piqa_valid.jsonl` and the line-aligned `piqa_valid-labels.lst`.
fn load_piqa(dir: &Path, limit: usize) -> Result<Task> {
    let path = need("piqa", dir.join("piqa_valid.jsonl"))?;
    let lpath = need("piqa", dir.join("piqa_valid-labels.lst"))?;
    let text = read(&path)?;
    let ltext = read(&lpath)?;
    let records = jsonl(&path, &text)?;
    let labels: Vec<(usize, &str)> = numbered_lines(&ltext).into_iter().filter(|(_, l)| !l.trim().is_empty()).collect();
    if labels.len() != records.len() {
        let line = labels.len().min(records.len()) + 1;
        return Err(fmt_err(
            &lpath,
            line,
            format!("{} labels for {} questions in {}", labels.len(), records.len(), path.display()),
        ));
    }
    let mut docs = Vec::new();
    for ((line, obj), (lline, lab)) in records.iter().zip(&labels).take(limit) {
        let r = Rec { path: &path, line: *line, obj };
        let gold = match lab.trim() {
            "0" => 0,
            "1" => 1,
            other => return Err(fmt_err(&lpath, *lline, format!("label must be 0 or 1, got {other:?}"))),
        };
        let query = format!("Question: {}\nAnswer:", r.str("goal")?);
        let sols = [r.str("sol1")?, r.str("sol2")?];
        docs.push(ChoiceDoc {
            requests: sols.iter().map(|s| (query.clone(), format!(" {s}"))).collect(),
            norm_lens: sols.iter().map(|s| s.chars().count()).collect(),
            gold,
        });
    }
    Ok(Task { name: "piqa".into(), origin: path.display().to_string(), data: TaskData::Choice(docs) })
}

/// HellaSwag's 6-line layout: `activity_label: ctx`, the gold index, 4 endings.
fn load_hellaswag(dir: &Path, limit: usize) -> Result<Task> {
    let files = hellaswag_files(dir)?;
    // (file, line number, text) over all parts, in order.
    let mut texts = Vec::new();
    for f in &files {
        texts.push((f.clone(), read(f)?));
    }
    let mut lines: Vec<(&Path, usize, &str)> = Vec::new();
    for (f, t) in &texts {
        let mut ls = numbered_lines(t);
        while ls.last().is_some_and(|(_, l)| l.trim().is_empty()) {
            ls.pop();
        }
        lines.extend(ls.into_iter().map(|(n, l)| (f.as_path(), n, l)));
    }
    let mut docs = Vec::new();
    for task in lines.chunks(6).take(limit) {
        let &(path, line, _) = &task[0];
        if task.len() < 6 {
            let &(lpath, lline, _) = &task[task.len() - 1];
            return Err(fmt_err(
                lpath,
                lline,
                format!(
                    "incomplete HellaSwag task starting at line {line}: 6 lines expected (context, gold, 4 endings)"
                ),
            ));
        }
        let (gpath, gline, gtext) = task[1];
        let gold = match gtext.trim().parse::<usize>() {
            Ok(g) if g < 4 => g,
            _ => return Err(fmt_err(gpath, gline, format!("expected the gold ending's index 0-3, got {gtext:?}"))),
        };
        let query = hellaswag_query(task[0].2);
        if query.is_empty() {
            return Err(fmt_err(path, line, "empty HellaSwag context"));
        }
        let endings: Vec<String> = task[2..].iter().map(|(_, _, e)| hellaswag_preprocess(e)).collect();
        docs.push(ChoiceDoc {
            requests: endings.iter().map(|e| (query.clone(), format!(" {e}"))).collect(),
            norm_lens: endings.iter().map(|e| e.chars().count()).collect(),
            gold,
        });
    }
    let origin = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
    Ok(Task { name: "hellaswag".into(), origin, data: TaskData::Choice(docs) })
}

/// `hellaswag_val_full.txt`, or its parts `hellaswag_val_full.part{k}of{n}.txt` in order of k.
fn hellaswag_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let full = dir.join("hellaswag_val_full.txt");
    if full.is_file() {
        return Ok(vec![full]);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| EvalError::Io { path: dir.to_path_buf(), source: e })?;
    let mut parts: Vec<(usize, PathBuf)> = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let k = name
            .strip_prefix("hellaswag_val_full.part")
            .and_then(|r| r.strip_suffix(".txt"))
            .and_then(|r| r.split_once("of"))
            .and_then(|(k, _)| k.parse::<usize>().ok());
        if let Some(k) = k {
            parts.push((k, entry.path()));
        }
    }
    if parts.is_empty() {
        return Err(EvalError::MissingData { task: "hellaswag".into(), path: full });
    }
    parts.sort();
    Ok(parts.into_iter().map(|(_, p)| p).collect())
}

/// WikiText-2 raw test, one HF dataset row a line. Non-empty rows end with `"\n"` in the dataset
/// (here, the line break); empty rows are `""`. The text is `"\n\n".join(rows)`, as the guide's
/// `tokenizer("\n\n".join(test["text"]))`.
fn load_wikitext(path: &Path, limit: usize) -> Result<Task> {
    let text = read(path)?;
    let rows: Vec<String> = numbered_lines(&text)
        .into_iter()
        .take(limit)
        .map(|(_, l)| if l.is_empty() { String::new() } else { format!("{l}\n") })
        .collect();
    Ok(Task {
        name: "wikitext".into(),
        origin: path.display().to_string(),
        data: TaskData::Rolling { text: rows.join("\n\n"), rows: rows.len() },
    })
}
