//! Task loading: format detection, the harness's token-splitting rules, and errors that point at
//! file:line or list what is known.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use opt_eval::tasks::{ChoiceDoc, LastWordDoc, TaskData};
use opt_eval::{encode_pair, load_task, EvalError, BUILTIN_TASKS};

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

fn err_of(path: &str, data_dir: Option<&Path>) -> String {
    match load_task(path, data_dir, None) {
        Ok(t) => panic!("{path} should not load, got {t:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn formats_are_detected_from_the_keys() {
    let d = tempfile::tempdir().unwrap();
    let mc = write(d.path(), "mc.jsonl", "{\"query\": \"Q: 2+2?\", \"choices\": [\"4\", \"five\"], \"gold\": 0}\n\n{\"query\": \"Sky?\", \"choices\": [\"blue\", \"green\", \"red\"], \"gold\": 2}\n");
    let t = load_task(&mc, None, None).unwrap();
    assert_eq!(t.name, "mc");
    assert_eq!(
        t.data,
        TaskData::Choice(vec![
            ChoiceDoc {
                requests: vec![("Q: 2+2?".into(), " 4".into()), ("Q: 2+2?".into(), " five".into())],
                norm_lens: vec![1, 4],
                gold: 0
            },
            ChoiceDoc {
                requests: vec![
                    ("Sky?".into(), " blue".into()),
                    ("Sky?".into(), " green".into()),
                    ("Sky?".into(), " red".into())
                ],
                norm_lens: vec![4, 5, 3],
                gold: 2
            },
        ])
    );
    assert_eq!(load_task(&mc, None, Some(1)).unwrap().len(), 1);

    let schema = write(
        d.path(),
        "wsc.jsonl",
        "{\"context_options\": [\"A said B\", \"A said C\"], \"continuation\": \"was here.\", \"gold\": 1}\n",
    );
    let t = load_task(&schema, None, None).unwrap();
    assert_eq!(
        t.data,
        TaskData::Choice(vec![ChoiceDoc {
            requests: vec![("A said B".into(), " was here.".into()), ("A said C".into(), " was here.".into())],
            norm_lens: vec![9, 9],
            gold: 1
        }])
    );

    let text = write(d.path(), "lw.jsonl", "{\"text\": \"the end of the story\"}\n");
    let t = load_task(&text, None, None).unwrap();
    assert_eq!(
        t.data,
        TaskData::LastWord(vec![LastWordDoc { context: "the end of the".into(), target: " story".into() }])
    );
}

#[test]
fn bad_files_name_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let good = "{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": 0}";
    let cases = [
        ("bad_json.jsonl", format!("{good}\n{good}\n{{\"query\": oops}}\n"), ":3: invalid JSON"),
        (
            "no_gold.jsonl",
            format!("{good}\n{{\"query\": \"q\", \"choices\": [\"a\", \"b\"]}}\n"),
            ":2: missing field \"gold\"",
        ),
        (
            "big_gold.jsonl",
            "{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": 2}\n".to_string(),
            ":1: \"gold\" must be an index below 2",
        ),
        (
            "neg_gold.jsonl",
            format!("{good}\n\n{{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": -1}}\n"),
            ":3: \"gold\" must be an index",
        ),
        (
            "str_choices.jsonl",
            "{\"query\": \"q\", \"choices\": \"a\", \"gold\": 0}\n".to_string(),
            ":1: \"choices\" must be an array of strings, got a string",
        ),
        (
            "one_choice.jsonl",
            "{\"query\": \"q\", \"choices\": [\"a\"], \"gold\": 0}\n".to_string(),
            ":1: \"choices\" must be an array of strings with at least 2 entries, got 1",
        ),
        (
            "num_query.jsonl",
            format!("{good}\n{{\"query\": 5, \"choices\": [\"a\", \"b\"], \"gold\": 0}}\n"),
            ":2: \"query\" must be a string, got a number",
        ),
        ("array.jsonl", "\n[1, 2]\n".to_string(), ":2: expected a JSON object, got an array"),
        (
            "unknown.jsonl",
            "\n{\"question\": \"q\", \"answer\": \"a\"}\n".to_string(),
            ":2: unrecognised record with keys",
        ),
        ("empty.jsonl", "\n\n".to_string(), ":1: the file has no records"),
        ("no_space.jsonl", "{\"text\": \"a b\"}\n{\"text\": \"word\"}\n".to_string(), ":2: \"text\" has no space"),
        (
            "schema_bad.jsonl",
            "{\"context_options\": [\"a\", \"b\"], \"continuation\": 3, \"gold\": 0}\n".to_string(),
            ":1: \"continuation\" must be a string",
        ),
    ];
    for (name, text, want) in cases {
        let p = write(d.path(), name, &text);
        let e = err_of(&p, None);
        assert!(e.contains(&format!("{name}{want}")), "{name}: {e}");
    }
}

#[test]
fn bad_builtin_data_names_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    // HellaSwag: a gold line that is not 0-3, in the second part file at its line 8.
    let task = "Label: a context. he\n1\nend a\nend b\nend c\nend d\n";
    write(d.path(), "hellaswag_val_full.part1of2.txt", task);
    write(d.path(), "hellaswag_val_full.part2of2.txt", &format!("{task}Label: next.\n7\na\nb\nc\nd\n"));
    let e = err_of("hellaswag", Some(d.path()));
    assert!(e.contains("hellaswag_val_full.part2of2.txt:8: expected the gold ending's index 0-3, got \"7\""), "{e}");
    // The first two tasks (across both parts) load, with the harness's query.
    let t = load_task("hellaswag", Some(d.path()), Some(2)).unwrap();
    let TaskData::Choice(docs) = &t.data else { panic!() };
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[1].requests[3], ("Label: a context. He".to_string(), " end d".to_string()));
    // An incomplete last task points at its last line.
    write(d.path(), "hellaswag_val_full.part2of2.txt", &format!("{task}Label: next.\n0\na\n"));
    let e = err_of("hellaswag", Some(d.path()));
    assert!(e.contains("hellaswag_val_full.part2of2.txt:9: incomplete HellaSwag task starting at line 7"), "{e}");

    // PIQA: labels out of step with the questions, or not 0/1.
    let q = "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\"}\n";
    write(d.path(), "piqa_valid.jsonl", &q.repeat(3));
    write(d.path(), "piqa_valid-labels.lst", "0\n1\n");
    let e = err_of("piqa", Some(d.path()));
    assert!(e.contains("piqa_valid-labels.lst:3: 2 labels for 3 questions"), "{e}");
    write(d.path(), "piqa_valid-labels.lst", "0\n1\nyes\n");
    let e = err_of("piqa", Some(d.path()));
    assert!(e.contains("piqa_valid-labels.lst:3: label must be 0 or 1, got \"yes\""), "{e}");
    write(d.path(), "piqa_valid-labels.lst", "0\n1\n1\n");
    let t = load_task("piqa", Some(d.path()), None).unwrap();
    let TaskData::Choice(docs) = &t.data else { panic!() };
    assert_eq!(docs[2].requests[1], ("Question: g\nAnswer:".to_string(), " b".to_string()));
    assert_eq!(docs[2].gold, 1);
}

#[test]
fn unknown_tasks_and_missing_data_are_explained() {
    let e = err_of("hellaswagg", None);
    for name in BUILTIN_TASKS {
        assert!(e.contains(name), "{e}");
    }
    assert!(e.starts_with("unknown task 'hellaswagg'"), "{e}");
    assert!(matches!(load_task("nope", None, None), Err(EvalError::UnknownTask { .. })));

    let e = err_of("piqa", None);
    assert!(e.contains("--data-dir"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    for (task, file) in [
        ("lambada", "lambada_test.jsonl"),
        ("hellaswag", "hellaswag_val_full.txt"),
        ("piqa", "piqa_valid.jsonl"),
        ("arc_easy", "llmfoundry_arc_easy.jsonl"),
        ("wikitext", "wikitext-2-raw-test.lf.txt"),
    ] {
        let e = err_of(task, Some(empty.path()));
        assert!(e.contains(file) && e.contains("--data-dir"), "{task}: {e}");
    }
    let e = err_of("missing/tasks.jsonl", None);
    assert!(e.contains("missing/tasks.jsonl"), "{e}");
}

#[test]
fn trailing_context_spaces_move_to_the_continuation() {
    let a = encode_pair(tok(), "Question: why?\nAnswer: ", "because").unwrap();
    let b = encode_pair(tok(), "Question: why?\nAnswer:", " because").unwrap();
    assert_eq!(a, b);
    assert_eq!(a.context[0], 2, "</s> is prepended");
    assert_eq!(a.continuation, tok().encode(" because", false).unwrap());
    // Several trailing whitespace characters move together.
    let c = encode_pair(tok(), "End.\n\n", "Next").unwrap();
    assert_eq!(c.context, tok().encode("End.", true).unwrap());
    assert_eq!(c.continuation, tok().encode("End.\n\nNext", true).unwrap()[c.context.len()..].to_vec());
}

#[test]
fn continuation_ids_are_cut_from_the_whole_encoding() {
    // "The cats are" is [</s>, The, Ġcats, Ġare]; enc("The cat") has 3 ids, so the harness's
    // continuation is whole[3..] = [Ġare]: the "s" merged into the context's last token.
    let r = encode_pair(tok(), "The cat", "s are").unwrap();
    let whole = tok().encode("The cats are", true).unwrap();
    assert_eq!(r.context, tok().encode("The cat", true).unwrap());
    assert_eq!(r.context.len(), 3);
    assert_eq!(r.continuation, whole[3..].to_vec());
    assert_eq!(r.continuation, tok().encode(" are", false).unwrap());
    assert_ne!(r.continuation, tok().encode("s are", false).unwrap());
    // An empty context is scored after </s> alone.
    let e = encode_pair(tok(), "", "Hello world").unwrap();
    assert_eq!(e.context, vec![2]);
    assert_eq!(e.continuation, tok().encode("Hello world", false).unwrap());
}

/// The full data sets in ../shared/data/eval (when this checkout has them) load without error,
/// with the sizes their sources state.
#[test]
fn shared_data_sets_load_in_full() {
    let dir = repo().join("../shared/data/eval");
    if !dir.is_dir() {
        eprintln!("skipped: {} not present", dir.display());
        return;
    }
    for (task, n) in [("lambada", 5153), ("hellaswag", 10042), ("piqa", 1838), ("arc_easy", 2376), ("wikitext", 4358)] {
        let t = load_task(task, Some(&dir), None).unwrap_or_else(|e| panic!("{task}: {e}"));
        assert_eq!(t.len(), n, "{task}");
    }
    // The hellaswag fixture is an excerpt of these parts: task 5001 of the full set is item 12
    // of the excerpt.
    let full = load_task("hellaswag", Some(&dir), None).unwrap();
    let excerpt = load_task("hellaswag", Some(&eval_dir()), None).unwrap();
    let (TaskData::Choice(f), TaskData::Choice(e)) = (&full.data, &excerpt.data) else { panic!() };
    assert_eq!(f[5001], e[12]);
    assert_eq!(f[..12], e[..12]);
}
