//! The same HF-written model in its three layouts (generated with PyTorch / transformers into
//! `fixtures/`): `pre_ln/model.safetensors`, `pre_ln_bin/pytorch_model.bin`, and
//! `pre_ln_sharded/` (sharded safetensors with an index). All three must give the same tensor
//! names and, after conversion to f32, the same values bit for bit.
//!
//! The fixtures are generated separately; when they are absent these tests print a message and
//! pass.

use std::path::{Path, PathBuf};

use opt_checkpoint::{
    save_safetensors, save_safetensors_sharded, Checkpoint, CheckpointFormat, DType, FileDType, TensorWrite,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// Opens a fixture (file or folder), or `None` (with a message) if it has not been generated.
fn open(rel: &str, must_exist: &str) -> Option<Checkpoint> {
    let path = fixtures().join(rel);
    if !fixtures().join(must_exist).exists() {
        eprintln!("skipping: fixture {} not present", fixtures().join(must_exist).display());
        return None;
    }
    Some(Checkpoint::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display())))
}

fn f32_bits(ck: &Checkpoint, name: &str) -> (Vec<usize>, Vec<u32>) {
    let t = ck.tensor(name).unwrap();
    let v = t.to_f32_vec().unwrap_or_else(|e| panic!("{}: {e}", ck.describe()));
    (t.shape.to_vec(), v.iter().map(|x| x.to_bits()).collect())
}

#[test]
fn three_layouts_agree() {
    let (Some(st), Some(bin), Some(sharded)) = (
        open("pre_ln/model.safetensors", "pre_ln/model.safetensors"),
        open("pre_ln_bin/pytorch_model.bin", "pre_ln_bin/pytorch_model.bin"),
        open("pre_ln_sharded", "pre_ln_sharded"),
    ) else {
        return;
    };
    assert_eq!(st.format(), CheckpointFormat::Safetensors);
    assert_eq!(bin.format(), CheckpointFormat::PytorchBin);
    assert!(matches!(sharded.format(), CheckpointFormat::ShardedSafetensors | CheckpointFormat::ShardedPytorchBin));
    assert!(!st.is_empty());
    assert_eq!(st.names(), sharded.names(), "safetensors vs sharded names");
    // HF's safetensors writer drops tied weights; the .bin (a plain torch.save of the state
    // dict) keeps `lm_head.weight`, sharing one storage with the embedding.
    let mut bin_names = bin.names();
    if !st.contains("lm_head.weight") && bin.contains("lm_head.weight") {
        let lm = bin.tensor("lm_head.weight").unwrap();
        let emb = bin.tensor("model.decoder.embed_tokens.weight").unwrap();
        assert!(std::ptr::eq(lm.bytes, emb.bytes), "tied tensors share their bytes, no copy");
        bin_names.retain(|n| *n != "lm_head.weight");
    }
    assert_eq!(st.names(), bin_names, "safetensors vs pytorch_model.bin names");
    for name in st.names() {
        let a = f32_bits(&st, name);
        assert_eq!(a, f32_bits(&bin, name), "tensor {name}: safetensors vs .bin");
        assert_eq!(a, f32_bits(&sharded, name), "tensor {name}: safetensors vs sharded");
        // the file dtype survives too
        assert_eq!(st.tensor(name).unwrap().dtype, bin.tensor(name).unwrap().dtype, "{name}");
    }
}

#[test]
fn bf16_folder_matches_torch_rounding() {
    // pre_ln_bf16 holds pre_ln's f32 weights after torch's `.bfloat16()` (round to nearest
    // even): our f32 -> bf16 conversion must produce the same bytes.
    let (Some(f32s), Some(bf16s)) =
        (open("pre_ln", "pre_ln/model.safetensors"), open("pre_ln_bf16", "pre_ln_bf16/model.safetensors"))
    else {
        return;
    };
    assert_eq!(f32s.names(), bf16s.names());
    for name in f32s.names() {
        let b = bf16s.tensor(name).unwrap();
        assert_eq!(b.dtype, FileDType::BF16, "{name}");
        let ours = f32s.tensor(name).unwrap().to_vec(DType::BF16).unwrap();
        assert_eq!(ours, b.bytes, "tensor {name}");
        // and bf16 -> bf16 is a copy
        assert_eq!(b.to_vec(DType::BF16).unwrap(), b.bytes);
    }
}

#[test]
fn reference_file_with_integer_tensors() {
    let Some(r) = open("pre_ln/reference.safetensors", "pre_ln/reference.safetensors") else {
        return;
    };
    let mut ints = 0;
    for t in r.tensors() {
        let t = t.unwrap();
        if t.dtype.is_readable_float() {
            assert_eq!(t.to_f32_vec().unwrap().len(), t.numel());
        } else {
            ints += 1;
            let e = t.to_f32_vec().unwrap_err();
            assert!(e.to_string().contains(t.name), "{e}");
        }
    }
    assert!(ints > 0, "reference.safetensors has int64 id tensors");
}

#[test]
fn every_fixture_folder_opens() {
    let Ok(rd) = std::fs::read_dir(fixtures()) else {
        eprintln!("skipping: {} not present", fixtures().display());
        return;
    };
    let mut n = 0;
    let has_weights = |p: &Path| {
        ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]
            .iter()
            .any(|w| p.join(w).is_file())
    };
    // (folders holding other fixtures, e.g. generation or eval data, are skipped)
    for dir in rd.flatten().map(|e| e.path()).filter(|p| p.is_dir() && has_weights(p)) {
        let ck = Checkpoint::open(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert!(!ck.is_empty(), "{}", dir.display());
        // every tensor converts (no unsupported dtypes among the weights)
        for t in ck.tensors() {
            let t = t.unwrap();
            assert!(t.dtype.is_readable_float(), "{}: {} is {}", dir.display(), t.name, t.dtype);
            assert_eq!(t.to_f32_vec().unwrap().len(), t.numel());
        }
        n += 1;
    }
    eprintln!("opened {n} fixture folders");
}

/// Re-saves a checkpoint's tensors, in file order, with our writer.
fn tensors_in_file_order(ck: &Checkpoint) -> Vec<(String, DType, Vec<usize>, Vec<u8>)> {
    let mut v: Vec<_> = ck
        .tensors()
        .map(|t| {
            let t = t.unwrap();
            let dtype = match t.dtype {
                FileDType::F32 => DType::F32,
                FileDType::BF16 => DType::BF16,
                FileDType::F16 => DType::F16,
                other => panic!("{}: {other}", t.name),
            };
            let start = t.bytes.as_ptr() as usize;
            (start, t.file.to_path_buf(), t.name.to_string(), dtype, t.shape.to_vec(), t.bytes.to_vec())
        })
        .collect();
    v.sort_by(|a, b| (&a.1, a.0).cmp(&(&b.1, b.0)));
    v.into_iter().map(|(_, _, n, d, s, b)| (n, d, s, b)).collect()
}

fn writes(v: &[(String, DType, Vec<usize>, Vec<u8>)]) -> Vec<TensorWrite<'_>> {
    v.iter()
        .map(|(name, dtype, shape, bytes)| TensorWrite {
            name: name.clone(),
            dtype: *dtype,
            shape: shape.clone(),
            bytes,
        })
        .collect()
}

#[test]
fn our_writer_reproduces_hf_files_byte_for_byte() {
    let Some(st) = open("pre_ln/model.safetensors", "pre_ln/model.safetensors") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let v = tensors_in_file_order(&st);
    let out = dir.path().join("model.safetensors");
    save_safetensors(&out, &writes(&v)).unwrap();
    let hf = std::fs::read(fixtures().join("pre_ln/model.safetensors")).unwrap();
    assert!(std::fs::read(&out).unwrap() == hf, "single file differs from HF's");

    // sharded: transformers' max_shard_size="150KB" is 150_000 bytes
    let Some(sh) = open("pre_ln_sharded", "pre_ln_sharded") else {
        return;
    };
    let v = tensors_in_file_order(&sh);
    let sdir = dir.path().join("sharded");
    let written = save_safetensors_sharded(&sdir, &writes(&v), 150_000).unwrap();
    for p in &written {
        let name = p.file_name().unwrap();
        let theirs = std::fs::read(fixtures().join("pre_ln_sharded").join(name)).unwrap();
        assert!(std::fs::read(p).unwrap() == theirs, "{} differs from HF's", name.to_string_lossy());
    }
    assert_eq!(written.len(), 5);
}
