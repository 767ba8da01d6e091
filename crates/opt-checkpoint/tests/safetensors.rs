//! safetensors: save → open round trips (single and sharded), dtype conversion, and rejection
//! of corrupt / truncated files without panics.

mod common;

use std::path::Path;

use common::{f32_bytes, raw_safetensors, Rng};
use half::{bf16, f16};
use opt_checkpoint::{
    save_safetensors, save_safetensors_sharded, Checkpoint, CheckpointError, CheckpointFormat, DType, FileDType,
    TensorWrite,
};

fn sample_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng(seed);
    (0..n).map(|_| r.f32()).collect()
}

fn to_dtype(xs: &[f32], d: DType) -> Vec<u8> {
    match d {
        DType::F32 => f32_bytes(xs),
        DType::BF16 => xs.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
        DType::F16 => xs.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
    }
}

fn from_dtype(b: &[u8], d: DType) -> Vec<f32> {
    match d {
        DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DType::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

fn err_string(e: &CheckpointError) -> String {
    e.to_string()
}

#[test]
fn round_trip_all_dtypes_and_conversions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let vals = sample_f32(6 * 5, 1);
    let bufs: Vec<Vec<u8>> = DTYPES.iter().map(|&d| to_dtype(&vals, d)).collect();
    let mut tensors: Vec<TensorWrite<'_>> = DTYPES
        .iter()
        .zip(&bufs)
        .map(|(&d, b)| TensorWrite { name: format!("model.decoder.t_{d}"), dtype: d, shape: vec![6, 5], bytes: b })
        .collect();
    // scalars and empty tensors too
    let one = 3.5f32.to_le_bytes();
    tensors.push(TensorWrite { name: "scalar".into(), dtype: DType::F32, shape: vec![], bytes: &one });
    tensors.push(TensorWrite { name: "empty".into(), dtype: DType::BF16, shape: vec![0, 4], bytes: &[] });
    save_safetensors(&path, &tensors).unwrap();

    // header: 8-byte aligned data section, HF metadata
    let raw = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0);
    let header: serde_json::Value = serde_json::from_slice(&raw[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["format"], "pt");
    assert_eq!(header["model.decoder.t_bf16"]["dtype"], "BF16");
    assert_eq!(header["model.decoder.t_f32"]["data_offsets"], serde_json::json!([0, 120]));
    // tensors in the given order
    assert_eq!(header["model.decoder.t_bf16"]["data_offsets"], serde_json::json!([120, 180]));

    // no temporary file left behind
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");

    for opened in [Checkpoint::open(dir.path()).unwrap(), Checkpoint::open(&path).unwrap()] {
        assert_eq!(opened.format(), CheckpointFormat::Safetensors);
        assert_eq!(
            opened.names(),
            vec!["empty", "model.decoder.t_bf16", "model.decoder.t_f16", "model.decoder.t_f32", "scalar"]
        );
        assert!(opened.contains("scalar") && !opened.contains("nope"));
        assert_eq!(opened.tensor("scalar").unwrap().to_f32_vec().unwrap(), vec![3.5]);
        let e = opened.tensor("empty").unwrap();
        assert_eq!((e.dtype, e.shape, e.numel()), (FileDType::BF16, &[0usize, 4][..], 0));
        assert!(e.to_f32_vec().unwrap().is_empty());

        for (&src, buf) in DTYPES.iter().zip(&bufs) {
            let t = opened.tensor(&format!("model.decoder.t_{src}")).unwrap();
            assert_eq!(t.dtype, FileDType::from(src));
            assert_eq!(t.shape, &[6, 5]);
            assert_eq!(t.bytes, &buf[..], "stored bytes are what was written");
            assert_eq!(t.file, path.as_path());
            let exact = from_dtype(buf, src);
            assert_eq!(t.to_f32_vec().unwrap(), exact);
            for dst in DTYPES {
                let mut out = vec![0u8; 30 * dst.size_in_bytes()];
                t.read_into(&mut out, dst).unwrap();
                // converting the exact source values with `half` (RNE) gives the same bytes
                assert_eq!(out, to_dtype(&exact, dst), "{src} -> {dst}");
                assert_eq!(t.to_vec(dst).unwrap(), out);
            }
        }
        assert!(opened.describe().contains("safetensors"));
    }
}

#[test]
fn reads_f64_and_refuses_integer_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    let f64s: Vec<u8> = [1.0f64, -2.5, 1e-3, 70000.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut data = f64s.clone();
    data.extend_from_slice(&7i64.to_le_bytes());
    data.extend_from_slice(&[1u8, 0]);
    let header = r#"{"d":{"dtype":"F64","shape":[4],"data_offsets":[0,32]},"ids":{"dtype":"I64","shape":[1],"data_offsets":[32,40]},"mask":{"dtype":"BOOL","shape":[2],"data_offsets":[40,42]},"q":{"dtype":"F8_E4M3","shape":[0],"data_offsets":[42,42]}}"#;
    std::fs::write(&path, raw_safetensors(header, &data)).unwrap();
    let ck = Checkpoint::open(&path).unwrap();
    let d = ck.tensor("d").unwrap();
    assert_eq!(d.to_f32_vec().unwrap(), vec![1.0, -2.5, 1e-3, 70000.0]);
    let h = d.to_vec(DType::F16).unwrap();
    assert_eq!(
        h,
        [1.0f64, -2.5, 1e-3, 70000.0].iter().flat_map(|&x| f16::from_f64(x).to_le_bytes()).collect::<Vec<_>>()
    );
    assert_eq!(f16::from_le_bytes([h[6], h[7]]), f16::INFINITY, "f16 overflow saturates to inf like torch");

    let ids = ck.tensor("ids").unwrap();
    assert_eq!(ids.dtype, FileDType::I64);
    assert_eq!(ids.bytes, &7i64.to_le_bytes());
    let e = ids.to_f32_vec().unwrap_err();
    assert!(matches!(&e, CheckpointError::Tensor { name, .. } if name == "ids"), "{e}");
    assert!(err_string(&e).contains("x.safetensors"), "{e}");
    assert!(ck.tensor("mask").unwrap().to_f32_vec().is_err());
    assert_eq!(ck.tensor("q").unwrap().dtype, FileDType::F8E4M3);
}

#[test]
fn length_mismatch_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let b = f32_bytes(&[1.0, 2.0, 3.0]);
    save_safetensors(&path, &[TensorWrite { name: "w".into(), dtype: DType::F32, shape: vec![3], bytes: &b }]).unwrap();
    let ck = Checkpoint::open(&path).unwrap();
    let t = ck.tensor("w").unwrap();
    let e = t.read_f32_into(&mut [0.0; 2]).unwrap_err();
    assert!(matches!(&e, CheckpointError::Tensor { name, path: p, .. } if name == "w" && p == &path), "{e}");
    let e = t.read_into(&mut [0u8; 7], DType::BF16).unwrap_err();
    assert!(err_string(&e).contains("'w'"), "{e}");
    let e = ck.tensor("absent").unwrap_err();
    assert!(matches!(&e, CheckpointError::Missing { name, .. } if name == "absent"), "{e}");
}

#[test]
fn save_validates_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let b = [0u8; 6];
    let bad_len = [TensorWrite { name: "w".into(), dtype: DType::F32, shape: vec![2], bytes: &b }];
    let e = save_safetensors(&path, &bad_len).unwrap_err();
    assert!(matches!(&e, CheckpointError::Tensor { name, .. } if name == "w"), "{e}");
    let dup = [
        TensorWrite { name: "w".into(), dtype: DType::F16, shape: vec![3], bytes: &b },
        TensorWrite { name: "w".into(), dtype: DType::F16, shape: vec![3], bytes: &b },
    ];
    assert!(save_safetensors(&path, &dup).is_err());
    assert!(!path.exists(), "nothing is written when validation fails");
    // names needing JSON escapes survive
    let odd = [TensorWrite { name: "a \"quoted\"\\name\n".into(), dtype: DType::F16, shape: vec![3], bytes: &b }];
    save_safetensors(&path, &odd).unwrap();
    assert_eq!(Checkpoint::open(&path).unwrap().names(), vec!["a \"quoted\"\\name\n"]);
}

#[test]
fn sharded_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let vals: Vec<Vec<f32>> = (0..7).map(|i| sample_f32(10 + i * 3, 100 + i as u64)).collect();
    let bufs: Vec<Vec<u8>> = vals.iter().enumerate().map(|(i, v)| to_dtype(v, DTYPES[i % 3])).collect();
    let tensors: Vec<TensorWrite<'_>> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| TensorWrite {
            name: format!("model.decoder.layers.{i}.fc1.weight"),
            dtype: DTYPES[i % 3],
            shape: vec![vals[i].len()],
            bytes: b,
        })
        .collect();
    // a stale single-file checkpoint must not shadow the new shards
    std::fs::write(dir.path().join("model.safetensors"), b"stale").unwrap();
    let written = save_safetensors_sharded(dir.path(), &tensors, 100).unwrap();
    let n = written.len() - 1;
    assert!(n >= 3, "{written:?}");
    for (k, p) in written[..n].iter().enumerate() {
        assert_eq!(p.file_name().unwrap().to_string_lossy(), format!("model-{:05}-of-{n:05}.safetensors", k + 1));
    }
    assert!(written[n].ends_with("model.safetensors.index.json"));
    assert!(!dir.path().join("model.safetensors").exists());

    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(&written[n]).unwrap()).unwrap();
    let total: usize = bufs.iter().map(Vec::len).sum();
    assert_eq!(index["metadata"]["total_size"], serde_json::json!(total));
    assert_eq!(index["weight_map"].as_object().unwrap().len(), 7);

    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.format(), CheckpointFormat::ShardedSafetensors);
    assert_eq!(ck.files().len(), n);
    assert_eq!(ck.len(), 7);
    for (t, b) in tensors.iter().zip(&bufs) {
        let r = ck.tensor(&t.name).unwrap();
        assert_eq!(r.bytes, &b[..]);
        let shard = index["weight_map"][&t.name].as_str().unwrap();
        assert_eq!(r.file, dir.path().join(shard));
    }
    assert!(ck.describe().contains("shards"));
    // opening the index file directly works too
    assert_eq!(Checkpoint::open(&written[n]).unwrap().names(), ck.names());

    // re-saving with fewer shards removes the now-stale ones
    let written2 = save_safetensors_sharded(dir.path(), &tensors, u64::MAX).unwrap();
    assert_eq!(written2.len(), 2);
    let files: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(files.len(), 2, "{files:?}");
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.files().len(), 1);
    assert_eq!(ck.tensor(&tensors[3].name).unwrap().bytes, &bufs[3][..]);
}

#[test]
fn index_pointing_to_missing_shard() {
    let dir = tempfile::tempdir().unwrap();
    let b = f32_bytes(&[1.0]);
    save_safetensors(
        &dir.path().join("a.safetensors"),
        &[TensorWrite { name: "x".into(), dtype: DType::F32, shape: vec![1], bytes: &b }],
    )
    .unwrap();
    let index =
        r#"{"metadata":{"total_size":8},"weight_map":{"x":"a.safetensors","y":"model-00002-of-00002.safetensors"}}"#;
    std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::Io { path, .. } if path.ends_with("model-00002-of-00002.safetensors")),
        "{e}"
    );
    assert!(err_string(&e).contains("model-00002-of-00002.safetensors"), "{e}");

    // a tensor listed for a shard that does not hold it
    let index = r#"{"weight_map":{"x":"a.safetensors","z":"a.safetensors"}}"#;
    std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::Missing { path, name } if name == "z" && path.ends_with("a.safetensors")),
        "{e}"
    );

    // shard names may not leave the folder
    let index = r#"{"weight_map":{"x":"../a.safetensors"}}"#;
    std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(&e, CheckpointError::Corrupt { .. }), "{e}");

    // a broken index
    std::fs::write(dir.path().join("model.safetensors.index.json"), b"{\"weight_map\": [").unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::Corrupt { path, .. } if path.ends_with("model.safetensors.index.json")),
        "{e}"
    );
}

#[test]
fn no_weights_in_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(e, CheckpointError::NoWeights { .. }), "{e}");
    let e = Checkpoint::open(&dir.path().join("nope.safetensors")).unwrap_err();
    assert!(matches!(e, CheckpointError::Io { .. }), "{e}");
}

fn expect_corrupt(path: &Path, what: &str) -> String {
    match Checkpoint::open(path) {
        Err(e @ CheckpointError::Corrupt { .. }) => {
            let s = e.to_string();
            assert!(s.contains(&path.display().to_string()), "{what}: error does not name the file: {s}");
            s
        }
        Err(e) => panic!("{what}: expected Corrupt, got {e}"),
        Ok(_) => panic!("{what}: opened a corrupt file"),
    }
}

#[test]
fn truncated_files_are_corrupt_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    let a = f32_bytes(&sample_f32(64, 7));
    let b = to_dtype(&sample_f32(33, 8), DType::BF16);
    save_safetensors(
        &good,
        &[
            TensorWrite { name: "a".into(), dtype: DType::F32, shape: vec![8, 8], bytes: &a },
            TensorWrite { name: "b".into(), dtype: DType::BF16, shape: vec![33], bytes: &b },
        ],
    )
    .unwrap();
    let full = std::fs::read(&good).unwrap();
    let header_len = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
    let data_start = 8 + header_len;
    let cut = dir.path().join("cut.safetensors");
    // every cut point: inside the length, inside the header, inside each tensor's data
    for at in 0..full.len() {
        std::fs::write(&cut, &full[..at]).unwrap();
        let msg = expect_corrupt(&cut, &format!("cut at {at}"));
        if at > data_start + a.len() {
            assert!(msg.contains("tensor 'b'"), "cut at {at}: {msg}");
        } else if at > data_start {
            assert!(msg.contains("tensor 'a'") || msg.contains("tensor 'b'"), "cut at {at}: {msg}");
        }
    }
}

#[test]
fn corrupt_headers() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.safetensors");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad json", raw_safetensors(r#"{"a":{"dtype":"F32","#, &[0; 8]), "JSON"),
        (
            "not utf8",
            {
                let h = b"{\"\xff\":1}";
                let mut v = (h.len() as u64).to_le_bytes().to_vec();
                v.extend_from_slice(h);
                v
            },
            "JSON",
        ),
        (
            "huge header length",
            {
                let mut v = u64::MAX.to_le_bytes().to_vec();
                v.extend_from_slice(b"{}");
                v
            },
            "header length",
        ),
        (
            "offsets past end",
            raw_safetensors(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, &[0; 8]),
            "tensor 'a'",
        ),
        (
            "offset begin past end",
            raw_safetensors(r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[100,100]}}"#, &[0; 8]),
            "tensor 'a'",
        ),
        (
            "size mismatch",
            raw_safetensors(r#"{"a":{"dtype":"F16","shape":[3],"data_offsets":[0,8]}}"#, &[0; 8]),
            "tensor 'a'",
        ),
        ("missing shape", raw_safetensors(r#"{"a":{"dtype":"F16","data_offsets":[0,8]}}"#, &[0; 8]), "shape"),
        (
            "unknown dtype",
            raw_safetensors(r#"{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,8]}}"#, &[0; 8]),
            "F128",
        ),
        ("bad metadata", raw_safetensors(r#"{"__metadata__":[1]}"#, &[]), "__metadata__"),
    ];
    for (what, bytes, want) in cases {
        std::fs::write(&p, bytes).unwrap();
        let msg = expect_corrupt(&p, what);
        assert!(msg.contains(want), "{what}: {msg}");
    }
    // a safetensors file under the HF name inside a folder: the error still names the file
    let folder = dir.path().join("m");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("model.safetensors"), b"\x10\0\0\0\0\0\0\0{not json}      ").unwrap();
    let e = Checkpoint::open(&folder).unwrap_err();
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn random_mutations_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    let a = f32_bytes(&sample_f32(12, 9));
    save_safetensors(&good, &[TensorWrite { name: "a".into(), dtype: DType::F32, shape: vec![3, 4], bytes: &a }])
        .unwrap();
    let full = std::fs::read(&good).unwrap();
    let p = dir.path().join("m.safetensors");
    let mut r = Rng(0xdead_beef);
    for _ in 0..common::fuzz_iters(400) {
        let mut f = full.clone();
        for _ in 0..1 + r.below(4) {
            let i = r.below(f.len());
            f[i] = r.next() as u8;
        }
        std::fs::write(&p, &f).unwrap();
        if let Ok(ck) = Checkpoint::open(&p) {
            for t in ck.tensors() {
                let t = t.unwrap();
                if t.dtype.is_readable_float() {
                    let _ = t.to_f32_vec();
                }
            }
        }
    }
}

#[test]
fn raw_dtypes_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let codes: Vec<u8> = [-127i8, 0, 5, 127, -1, 3].iter().map(|&x| x as u8).collect();
    let scales = f32_bytes(&[0.5, 0.25]);
    opt_checkpoint::save_safetensors_raw(
        &path,
        &[
            opt_checkpoint::RawTensorWrite { name: "w".into(), dtype: FileDType::I8, shape: vec![2, 3], bytes: &codes },
            opt_checkpoint::RawTensorWrite {
                name: "w_scale".into(),
                dtype: FileDType::F32,
                shape: vec![2],
                bytes: &scales,
            },
        ],
    )
    .unwrap();
    let ck = Checkpoint::open(&path).unwrap();
    let t = ck.tensor("w").unwrap();
    assert_eq!((t.dtype, t.shape, t.bytes), (FileDType::I8, &[2usize, 3][..], &codes[..]));
    assert_eq!(ck.tensor("w_scale").unwrap().to_f32_vec().unwrap(), vec![0.5, 0.25]);
    let bad =
        [opt_checkpoint::RawTensorWrite { name: "q".into(), dtype: FileDType::I8, shape: vec![4], bytes: &codes }];
    let e = opt_checkpoint::save_safetensors_raw(&path, &bad).unwrap_err();
    assert!(err_string(&e).contains("'q'") && err_string(&e).contains("6 bytes"), "{e}");
}
