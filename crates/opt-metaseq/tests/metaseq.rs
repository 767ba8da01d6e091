//! metaseq checkpoints of the fixture models (written by tools/reference/generate_metaseq.py):
//! every layout converts and loads to HF's logits, malicious pickles are refused without
//! running anything, and broken file sets fail with errors that name files and keys.

use std::path::{Path, PathBuf};

use opt_checkpoint::pickle::Value;
use opt_checkpoint::{torchzip, Checkpoint, CheckpointError, FileDType};
use opt_metaseq::{convert, is_metaseq, load_model, ConvertOptions, MetaseqCheckpoint, MetaseqError};
use opt_model::{LogitsMode, OptConfig, OptModel};
use opt_tensor::{CpuBackend, DType};

/// (folder under fixtures/metaseq, HF fixture holding the same weights)
const VARIANTS: [(&str, &str); 5] = [
    ("singleton", "pre_ln"),
    ("fused", "post_ln_proj"),
    ("mp2_fused", "pre_ln"),
    ("mp4", "post_ln_proj"),
    ("fsdp", "pre_ln"),
];

/// What the malicious pickles would create if anything executed them.
const PWNED_MARKER: &str = "/tmp/opt-rs-metaseq-pwned";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn metaseq(dir: &str) -> PathBuf {
    fixtures().join("metaseq").join(dir)
}

/// The `*.pt` files of a fixture folder, sorted.
fn files(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(metaseq(dir))
        .expect("fixture folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "pt"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no files in {dir}");
    v
}

fn config(fixture: &str) -> OptConfig {
    OptConfig::from_path(&fixtures().join(fixture)).expect("config.json")
}

fn reference(fixture: &str) -> Checkpoint {
    Checkpoint::open(&fixtures().join(fixture).join("reference.safetensors")).expect("reference")
}

fn ints(ck: &Checkpoint, key: &str) -> Vec<i64> {
    let t = ck.tensor(key).expect(key);
    assert_eq!(t.dtype, FileDType::I64);
    t.bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect()
}

/// Max |Δ| between the model's logits and the reference's `key`, over unpadded positions.
fn logits_diff(model: &OptModel<CpuBackend>, fixture: &str, key: &str) -> f32 {
    let r = reference(fixture);
    let ids: Vec<u32> = ints(&r, "input_ids").iter().map(|&x| x as u32).collect();
    let mask: Vec<u8> = ints(&r, "attention_mask").iter().map(|&x| x as u8).collect();
    let batch = r.tensor("input_ids").expect("ids").shape[0];
    let ours = model.forward(&ids, batch, Some(&mask), None, LogitsMode::All).expect("forward").to_f32_vec();
    let theirs = r.tensor(key).expect(key).to_f32_vec().expect("f32");
    assert_eq!(ours.len(), theirs.len());
    let v = model.cfg.vocab_size;
    let mut d = 0f32;
    for (row, (a, b)) in ours.chunks(v).zip(theirs.chunks(v)).enumerate() {
        if mask[row] != 0 {
            for (x, y) in a.iter().zip(b) {
                d = d.max((x - y).abs());
            }
        }
    }
    d
}

/// Every tensor of the HF fixture, by name, as raw f32 bytes.
fn hf_tensors(fixture: &str) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let ck = Checkpoint::open(&fixtures().join(fixture)).expect("HF fixture");
    ck.tensors()
        .map(|t| {
            let t = t.expect("tensor");
            (t.name.to_string(), t.shape.to_vec(), t.to_vec(DType::F32).expect("f32"))
        })
        .collect()
}

fn expect_err<T>(r: Result<T, MetaseqError>) -> MetaseqError {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn every_variant_plans_the_hf_weights_bit_for_bit() {
    for (dir, fixture) in VARIANTS {
        let ck = MetaseqCheckpoint::open(&files(dir), &config(fixture)).expect(dir);
        let hf = hf_tensors(fixture);
        assert_eq!(ck.tensors().len(), hf.len(), "{dir}");
        for (name, shape, bytes) in hf {
            let t = ck.tensor(name.trim_start_matches("model.")).expect(&name);
            assert_eq!(t.shape, shape, "{dir}: {name}");
            let ours = ck.read_to_vec(t, DType::F32).expect("read");
            assert!(ours == bytes, "{dir}: {name} differs from the HF fixture");
        }
        // metaseq's bookkeeping and the tied output projection are dropped, nothing else.
        let dropped = ck.dropped().join("; ");
        assert!(dropped.contains("decoder.version"), "{dir}: {dropped}");
        // Consolidated files and FSDP's shared parameter carry the tied output projection;
        // tensor-parallel parts project with their embedding shard and have none.
        let has_output_projection = matches!(dir, "singleton" | "fused" | "fsdp");
        assert_eq!(
            dropped.contains("decoder.output_projection.weight (tied"),
            has_output_projection,
            "{dir}: {dropped}"
        );
    }
}

#[test]
fn every_variant_loads_directly_to_hf_logits() {
    for (dir, fixture) in VARIANTS {
        let model = load_model(CpuBackend::new(), &files(dir), config(fixture), DType::F32)
            .unwrap_or_else(|e| panic!("{dir}: {e}"));
        let d = logits_diff(&model, fixture, "logits");
        assert!(d <= 1e-4, "{dir}: max |Δ| = {d:e}");
    }
}

#[test]
fn every_variant_converts_to_an_hf_folder() {
    for (dir, fixture) in VARIANTS {
        let out = tempfile::tempdir().expect("tempdir");
        let ck = MetaseqCheckpoint::open(&files(dir), &config(fixture)).expect(dir);
        let mut seen = 0usize;
        let report = convert(&ck, out.path(), &ConvertOptions::default(), &mut |_| seen += 1).expect("convert");
        assert_eq!(report.dtype, DType::F32, "{dir}: the fixtures are stored in f32");
        assert_eq!((report.tensors, seen), (ck.tensors().len(), ck.tensors().len()));
        let names: Vec<String> =
            report.files.iter().map(|p| p.file_name().expect("name").to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["model.safetensors", "config.json"], "{dir}");

        // The folder holds exactly the HF fixture's tensors, under the same names, bit for bit.
        let written = Checkpoint::open(out.path()).expect("open converted");
        let hf = hf_tensors(fixture);
        assert_eq!(written.len(), hf.len());
        for (name, shape, bytes) in hf {
            let t = written.tensor(&name).expect(&name);
            assert_eq!((t.dtype, t.shape), (FileDType::F32, shape.as_slice()), "{name}");
            assert!(t.bytes == bytes.as_slice(), "{dir}: {name} differs");
        }
        assert_eq!(OptConfig::from_path(out.path()).expect("config.json"), config(fixture));

        let model = OptModel::from_folder(CpuBackend::new(), out.path(), DType::F32).expect("load");
        let d = logits_diff(&model, fixture, "logits");
        assert!(d <= 1e-4, "{dir}: max |Δ| = {d:e}");
    }
}

#[test]
fn sharded_output_from_a_folder_and_reconversion_over_it() {
    let out = tempfile::tempdir().expect("tempdir");
    // A folder as input: its *.pt files.
    let ck = MetaseqCheckpoint::open(&[metaseq("fsdp")], &config("pre_ln")).expect("open");
    assert_eq!(ck.describe(), "2 model parts × 3 FSDP shards (6 files)");
    let opts = ConvertOptions { dtype: None, max_shard_bytes: 150_000 };
    let report = convert(&ck, out.path(), &opts, &mut |_| {}).expect("convert");
    let shards: Vec<&PathBuf> = report.files.iter().filter(|p| p.to_string_lossy().ends_with(".safetensors")).collect();
    assert!(shards.len() >= 3, "{:?}", report.files);
    assert!(out.path().join("model.safetensors.index.json").is_file());
    let n = shards.len();
    assert!(out.path().join(format!("model-{n:05}-of-{n:05}.safetensors")).is_file());
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("model.safetensors.index.json")).expect("index"))
            .expect("json");
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(report.bytes), "{index}");
    assert_eq!(index["weight_map"].as_object().map(|m| m.len()), Some(report.tensors));
    let model = OptModel::from_folder(CpuBackend::new(), out.path(), DType::F32).expect("load");
    assert!(logits_diff(&model, "pre_ln", "logits") <= 1e-4);

    // Converting again as one file replaces the shards and the index.
    let report = convert(&ck, out.path(), &ConvertOptions::default(), &mut |_| {}).expect("again");
    let mut left: Vec<String> = std::fs::read_dir(out.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["config.json", "model.safetensors"], "{report:?}");
    let model = OptModel::from_folder(CpuBackend::new(), out.path(), DType::F32).expect("load");
    assert!(logits_diff(&model, "pre_ln", "logits") <= 1e-4);
}

#[test]
fn bf16_output_matches_hf_on_bf16_weights() {
    // pre_ln's `logits_bf16w`: HF's f32 forward with every weight rounded to bf16.
    let out = tempfile::tempdir().expect("tempdir");
    let ck = MetaseqCheckpoint::open(&files("mp2_fused"), &config("pre_ln")).expect("open");
    let opts = ConvertOptions { dtype: Some(DType::BF16), ..ConvertOptions::default() };
    let report = convert(&ck, out.path(), &opts, &mut |_| {}).expect("convert");
    assert_eq!(report.dtype, DType::BF16);
    let written = Checkpoint::open(out.path()).expect("open");
    assert!(written.tensors().all(|t| t.expect("tensor").dtype == FileDType::BF16));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).expect("config")).expect("json");
    assert_eq!(cfg["dtype"], "bfloat16");
    let model = OptModel::from_folder(CpuBackend::new(), out.path(), DType::F32).expect("load");
    let d = logits_diff(&model, "pre_ln", "logits_bf16w");
    assert!(d <= 1e-4, "converted to bf16: max |Δ| = {d:e}");

    let model = ck.load_model(CpuBackend::new(), DType::BF16).expect("direct");
    let d = logits_diff(&model, "pre_ln", "logits_bf16w");
    assert!(d <= 1e-4, "loaded as bf16: max |Δ| = {d:e}");
}

#[test]
fn malicious_pickles_are_refused_and_run_nothing() {
    let _ = std::fs::remove_file(PWNED_MARKER);
    let cfg = config("pre_ln");
    for (name, what) in [
        ("evil_tensor.pt", "decoder.embed_tokens.weight"),
        ("evil_top.pt", "the pickled object"),
        ("evil_metadata-shard0.pt", "numels"),
    ] {
        let path = metaseq("malicious").join(name);
        let e = expect_err(MetaseqCheckpoint::open(std::slice::from_ref(&path), &cfg));
        match &e {
            MetaseqError::Checkpoint(CheckpointError::Unsafe { path: p, detail }) => {
                assert_eq!(p, &path, "{e}");
                assert!(detail.contains(what), "{name}: {e}");
                assert!(detail.contains("not executed"), "{name}: {e}");
                assert!(detail.contains("system"), "{name} should name the global: {e}");
            }
            other => panic!("{name}: expected a refusal as unsafe, got {other}"),
        }
        // Detection reads the same pickles, and must not run them either.
        let _ = is_metaseq(&path);
        let _ = load_model(CpuBackend::new(), &[path], cfg.clone(), DType::F32);
    }
    assert!(!Path::new(PWNED_MARKER).exists(), "a malicious pickle ran its payload");
}

#[test]
fn non_tensor_objects_beside_the_weights_are_inert_placeholders() {
    // restored.pt keeps metaseq's `cfg` (argparse.Namespace and a class of its own) and
    // optimizer history beside the weights: they are read as data or placeholders, never built.
    let path = files("singleton").remove(0);
    let u = torchzip::read_pickle(&path).expect("pickle");
    let top = u.top();
    let cfg = u.get(top, "cfg").expect("cfg");
    match u.get(cfg, "model") {
        Some(Value::Opaque(d)) => assert!(d.contains("argparse.Namespace"), "{d}"),
        other => panic!("cfg.model: {other:?}"),
    }
    match u.get(cfg, "common") {
        Some(Value::Opaque(d)) => assert!(d.contains("DictConfigLike"), "{d}"),
        other => panic!("cfg.common: {other:?}"),
    }
    assert!(matches!(u.get(top, "optimizer_history"), Some(Value::List(_))));
    assert!(MetaseqCheckpoint::open(&[path], &config("pre_ln")).is_ok());
}

fn copy_except(dir: &str, skip: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for f in files(dir) {
        let name = f.file_name().expect("name").to_string_lossy().into_owned();
        if !skip.contains(&name.as_str()) {
            std::fs::copy(&f, tmp.path().join(&name)).expect("copy");
        }
    }
    tmp
}

#[test]
fn a_missing_model_part_is_named() {
    let tmp = copy_except("mp4", &["reshard-model_part-2.pt"]);
    let e = expect_err(MetaseqCheckpoint::open(&[tmp.path().to_path_buf()], &config("post_ln_proj")));
    let msg = e.to_string();
    assert!(matches!(e, MetaseqError::Layout(_)), "{msg}");
    assert!(msg.contains("model part 2 missing"), "{msg}");
    assert!(msg.contains("reshard-model_part-3.pt"), "{msg}");

    // Only the first of two parts: nothing tells from the names, the shapes do.
    let first = files("mp2_fused").remove(0);
    let e = expect_err(MetaseqCheckpoint::open(&[first], &config("pre_ln")));
    let msg = e.to_string();
    assert!(msg.contains("decoder.embed_tokens.weight"), "{msg}");
    assert!(msg.contains("[256, 64]") && msg.contains("[512, 64]"), "{msg}");
    assert!(msg.contains("only 1 of 2 model parts"), "{msg}");
}

#[test]
fn a_missing_fsdp_shard_is_named() {
    // A gap in the shard numbers.
    let tmp = copy_except("fsdp", &["checkpoint_last-model_part-0-shard1.pt"]);
    let e = expect_err(MetaseqCheckpoint::open(&[tmp.path().to_path_buf()], &config("pre_ln")));
    let msg = e.to_string();
    assert!(msg.contains("model part 0: FSDP shard 1 is missing"), "{msg}");
    assert!(msg.contains("checkpoint_last-model_part-0-shard2.pt"), "{msg}");

    // The last shard: only the element count can tell.
    let tmp = copy_except("fsdp", &["checkpoint_last-model_part-1-shard2.pt"]);
    let e = expect_err(MetaseqCheckpoint::open(&[tmp.path().to_path_buf()], &config("pre_ln")));
    let msg = e.to_string();
    assert!(matches!(e, MetaseqError::Metadata { .. }), "{msg}");
    assert!(msg.contains("model part 1"), "{msg}");
    assert!(msg.contains("flat_param_0"), "{msg}");
    assert!(msg.contains("is a shard missing"), "{msg}");
}

#[test]
fn inconsistent_parts_name_the_key_and_files() {
    let cfg = OptConfig::preset("tiny").expect("preset");
    let e = expect_err(MetaseqCheckpoint::open(&files("errors/shape_mismatch"), &cfg));
    let msg = e.to_string();
    assert!(msg.contains("decoder.layers.0.fc1.weight"), "{msg}");
    assert!(msg.contains("inconsistent shapes across model parts"), "{msg}");
    assert!(
        msg.contains("[4, 3] in part 0 (reshard-model_part-0.pt)")
            && msg.contains("[4, 2] in part 1 (reshard-model_part-1.pt)"),
        "{msg}"
    );

    let e = expect_err(MetaseqCheckpoint::open(&files("errors/missing_key"), &cfg));
    let msg = e.to_string();
    assert!(msg.contains("'decoder.layers.0.fc1.bias'"), "{msg}");
    assert!(msg.contains("missing from model part 1 (reshard-model_part-1.pt)"), "{msg}");

    // Two files claiming to be the same part.
    let tmp = copy_except("mp2_fused", &[]);
    std::fs::copy(tmp.path().join("reshard-model_part-0.pt"), tmp.path().join("copy-model_part-0.pt")).expect("copy");
    let e = expect_err(MetaseqCheckpoint::open(&[tmp.path().to_path_buf()], &config("pre_ln")));
    let msg = e.to_string();
    assert!(msg.contains("model part 0 is given as 2 files"), "{msg}");
    assert!(msg.contains("copy-model_part-0.pt"), "{msg}");
}

#[test]
fn flat_parameters_without_metadata_are_explained() {
    let e = expect_err(MetaseqCheckpoint::open(
        &files("errors/flat_no_metadata"),
        &OptConfig::preset("tiny").expect("preset"),
    ));
    let msg = e.to_string();
    assert!(matches!(e, MetaseqError::Unsupported { .. }), "{msg}");
    assert!(msg.contains("flat_param_0") && msg.contains("shard_metadata"), "{msg}");
}

#[test]
fn a_config_that_does_not_fit_is_reported() {
    // 350M-style checkpoint with the pre-LN config: project_in/out have no place.
    let e = expect_err(MetaseqCheckpoint::open(&files("fused"), &config("pre_ln")));
    let msg = e.to_string();
    assert!(msg.contains("decoder.embed_tokens.weight"), "{msg}");

    // One layer more than the checkpoint has: the missing tensor and its metaseq names.
    let mut cfg = config("pre_ln");
    cfg.num_hidden_layers = 3;
    let e = expect_err(MetaseqCheckpoint::open(&files("mp2_fused"), &cfg));
    let msg = e.to_string();
    assert!(msg.contains("decoder.layers.2.self_attn.k_proj.weight"), "{msg}");
    assert!(msg.contains("decoder.layers.2.self_attn.qkv_proj.weight"), "{msg}");

    // One layer fewer: layer 1's tensors are left over.
    cfg.num_hidden_layers = 1;
    let e = expect_err(MetaseqCheckpoint::open(&files("singleton"), &cfg));
    let msg = e.to_string();
    assert!(msg.contains("have no place in the config's model"), "{msg}");
    assert!(msg.contains("decoder.layers.1."), "{msg}");
}

#[test]
fn is_metaseq_tells_metaseq_from_hf() {
    for p in [files("singleton").remove(0), files("fsdp").remove(0), metaseq("mp4"), metaseq("fused")] {
        assert!(is_metaseq(&p), "{}", p.display());
    }
    for p in [
        fixtures().join("pre_ln"),
        fixtures().join("pre_ln/model.safetensors"),
        fixtures().join("pre_ln_bin"),
        fixtures().join("pre_ln_bin/pytorch_model.bin"),
        metaseq("malicious/evil_top.pt"),
        fixtures().join("does-not-exist.pt"),
    ] {
        assert!(!is_metaseq(&p), "{}", p.display());
    }
}
