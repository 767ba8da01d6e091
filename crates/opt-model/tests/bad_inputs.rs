//! Bad inputs give errors that name the file, field or tensor — never a panic.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use opt_model::{LogitsMode, OptModel};
use opt_tensor::{CpuBackend, DType};

fn copy_fixture(name: &str, to: &Path) {
    for entry in fs::read_dir(fixture(name)).expect("fixture dir") {
        let entry = entry.expect("entry");
        let file = entry.file_name();
        if file.to_string_lossy().starts_with("reference") {
            continue;
        }
        fs::copy(entry.path(), to.join(&file)).expect("copy");
    }
}

fn load_err(dir: &Path) -> String {
    match OptModel::from_folder(CpuBackend::new(), dir, DType::F32) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_weights_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_fixture("pre_ln", dir.path());
    let st = dir.path().join("model.safetensors");
    let len = fs::metadata(&st).expect("meta").len();
    for cut in [4u64, 100, len / 2, len - 1] {
        let bytes = fs::read(fixture("pre_ln").join("model.safetensors")).expect("read");
        fs::write(&st, &bytes[..cut as usize]).expect("write");
        let e = load_err(dir.path());
        assert!(e.contains("model.safetensors"), "cut at {cut}: {e}");
    }
}

#[test]
fn truncated_pytorch_bin_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_fixture("pre_ln_bin", dir.path());
    let bin = dir.path().join("pytorch_model.bin");
    let bytes = fs::read(&bin).expect("read");
    fs::write(&bin, &bytes[..bytes.len() / 2]).expect("write");
    let e = load_err(dir.path());
    assert!(e.contains("pytorch_model.bin"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_fixture("pre_ln", dir.path());
    let ck = opt_checkpoint::Checkpoint::open(&fixture("pre_ln")).expect("open");
    let keep: Vec<_> = ck.names().into_iter().filter(|n| !n.contains("layers.1.fc2.weight")).collect();
    let tensors: Vec<_> = keep
        .iter()
        .map(|n| {
            let t = ck.tensor(n).expect("tensor");
            opt_checkpoint::TensorWrite {
                name: n.to_string(),
                dtype: DType::F32,
                shape: t.shape.to_vec(),
                bytes: t.bytes,
            }
        })
        .collect();
    opt_checkpoint::save_safetensors(&dir.path().join("model.safetensors"), &tensors).expect("save");
    let e = load_err(dir.path());
    assert!(e.contains("layers.1.fc2.weight"), "{e}");
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_fixture("pre_ln", dir.path());
    let cfg_path = dir.path().join("config.json");
    let text = fs::read_to_string(&cfg_path).expect("config");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["ffn_dim"] = 128.into();
    fs::write(&cfg_path, v.to_string()).expect("write");
    let e = load_err(dir.path());
    assert!(e.contains("fc1.weight") && e.contains("128") && e.contains("256"), "{e}");
}

#[test]
fn malformed_config_names_the_file_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_fixture("pre_ln", dir.path());
    let cfg_path = dir.path().join("config.json");
    fs::write(&cfg_path, "{\"model_type\": \"opt\", \"hidden_size\": 64").expect("write");
    let e = load_err(dir.path());
    assert!(e.contains("config.json"), "{e}");

    let text = fs::read_to_string(fixture("pre_ln").join("config.json")).expect("config");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["num_attention_heads"] = 6.into();
    fs::write(&cfg_path, v.to_string()).expect("write");
    let e = load_err(dir.path());
    assert!(e.contains("num_attention_heads") && e.contains("config.json"), "{e}");
}

#[test]
fn folder_without_weights_or_config_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = load_err(dir.path());
    assert!(e.contains("config.json"), "{e}");
    fs::copy(fixture("pre_ln").join("config.json"), dir.path().join("config.json")).expect("copy");
    let e = load_err(dir.path());
    assert!(e.contains("safetensors") || e.contains("no weights"), "{e}");
}

#[test]
fn bad_forward_inputs_are_errors() {
    let model = load("pre_ln", DType::F32);
    let e = model.forward(&[2, 600, 3], 1, None, None, LogitsMode::All).expect_err("id out of range").to_string();
    assert!(e.contains("600"), "{e}");
    let long: Vec<u32> = vec![5; 65];
    let e = model.forward(&long, 1, None, None, LogitsMode::All).expect_err("too long").to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
    let e = model.forward(&[2, 5, 6], 2, None, None, LogitsMode::All).expect_err("ragged").to_string();
    assert!(e.contains("batch"), "{e}");
    let e = model.forward(&[2, 5, 6], 1, Some(&[1, 1]), None, LogitsMode::All).expect_err("mask").to_string();
    assert!(e.contains("mask"), "{e}");
}
