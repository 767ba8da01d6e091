//! pytorch_model.bin: hand-built torch zips, Python-pickled torch-style files, strided views,
//! shared storages, compressed entries, and malicious pickles.

mod common;

use std::path::{Path, PathBuf};

use common::{entry, f32_bytes, write_torch_zip, write_zip, Pickle, Rng};
use half::{bf16, f16};
use opt_checkpoint::{Checkpoint, CheckpointError, CheckpointFormat, DType, FileDType};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// `{"a.weight": f16 [2,3], "a.bias": f32 [3] (offset 2 into a shared storage),
///   "a.t": transpose of a 2x3 view of that storage, "step": 7 (not a tensor)}`
fn state_dict_pickle() -> Vec<u8> {
    let mut p = Pickle::new();
    p.global("collections", "OrderedDict").empty_tuple().reduce();
    p.mark();
    p.str("a.weight").tensor("HalfStorage", "0", 6, 0, &[2, 3], &[3, 1]);
    p.str("a.bias").tensor("FloatStorage", "1", 8, 2, &[3], &[1]);
    p.str("a.t").tensor("FloatStorage", "1", 8, 1, &[3, 2], &[1, 3]);
    p.str("step").int(7);
    p.setitems();
    p.stop()
}

fn f16_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect()
}

fn check_state_dict(ck: &Checkpoint, path: &Path) {
    assert_eq!(ck.format(), CheckpointFormat::PytorchBin);
    assert_eq!(ck.names(), vec!["a.bias", "a.t", "a.weight"]);
    let w = ck.tensor("a.weight").unwrap();
    assert_eq!((w.dtype, w.shape), (FileDType::F16, &[2usize, 3][..]));
    assert_eq!(w.file, path);
    assert_eq!(w.to_f32_vec().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let b = ck.tensor("a.bias").unwrap();
    assert_eq!(b.to_f32_vec().unwrap(), vec![12.0, 13.0, 14.0]);
    let t = ck.tensor("a.t").unwrap();
    assert_eq!(t.shape, &[3, 2]);
    // storage [10..18); view offset 1, 2x3 row-major = [[11,12,13],[14,15,16]], transposed
    assert_eq!(t.to_f32_vec().unwrap(), vec![11.0, 14.0, 12.0, 15.0, 13.0, 16.0]);
    assert_eq!(
        t.to_vec(DType::BF16).unwrap(),
        [11.0f32, 14.0, 12.0, 15.0, 13.0, 16.0]
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect::<Vec<_>>()
    );
}

fn storages() -> (Vec<u8>, Vec<u8>) {
    (f16_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), f32_bytes(&(10..18).map(|x| x as f32).collect::<Vec<_>>()))
}

#[test]
fn hand_built_torch_zip() {
    let dir = tempfile::tempdir().unwrap();
    let (s0, s1) = storages();
    let pkl = state_dict_pickle();
    // stored (memory-mapped) and deflated (decompressed) storages, various archive folder names
    for (name, prefix, deflate) in
        [("pytorch_model.bin", "archive", false), ("b.bin", "pytorch_model", true), ("c.pt", "c", false)]
    {
        let path = dir.path().join(name);
        write_torch_zip(&path, prefix, &pkl, &[("0", &s0), ("1", &s1)], deflate);
        let ck = Checkpoint::open(&path).unwrap();
        check_state_dict(&ck, &path);
        if !deflate {
            // contiguous tensors of stored entries borrow the file's bytes
            let raw = std::fs::read(&path).unwrap();
            let w = ck.tensor("a.weight").unwrap();
            assert!(raw.windows(w.bytes.len()).any(|win| win == w.bytes));
        }
    }
    // folder dispatch
    let ck = Checkpoint::open(dir.path()).unwrap();
    check_state_dict(&ck, &dir.path().join("pytorch_model.bin"));
    assert!(ck.describe().contains(&dir.path().display().to_string()));
}

#[test]
fn sharded_bin() {
    let dir = tempfile::tempdir().unwrap();
    let (s0, s1) = storages();
    let pkl = state_dict_pickle();
    write_torch_zip(
        &dir.path().join("pytorch_model-00001-of-00002.bin"),
        "archive",
        &pkl,
        &[("0", &s0), ("1", &s1)],
        false,
    );
    let mut p = Pickle::new();
    p.empty_dict().str("lm_head.weight").tensor("BFloat16Storage", "0", 2, 0, &[2], &[1]).setitem();
    let pkl2 = p.stop();
    let s2: Vec<u8> = [0.5f32, -1.0].iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect();
    write_torch_zip(&dir.path().join("pytorch_model-00002-of-00002.bin"), "archive", &pkl2, &[("0", &s2)], false);
    let index = r#"{"metadata":{"total_size":0},"weight_map":{
        "a.weight":"pytorch_model-00001-of-00002.bin","a.t":"pytorch_model-00001-of-00002.bin",
        "lm_head.weight":"pytorch_model-00002-of-00002.bin"}}"#;
    std::fs::write(dir.path().join("pytorch_model.bin.index.json"), index).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.format(), CheckpointFormat::ShardedPytorchBin);
    // the index is authoritative: a.bias is in the shard but not listed
    assert_eq!(ck.names(), vec!["a.t", "a.weight", "lm_head.weight"]);
    assert_eq!(ck.tensor("lm_head.weight").unwrap().to_f32_vec().unwrap(), vec![0.5, -1.0]);
    assert_eq!(ck.tensor("a.weight").unwrap().to_f32_vec().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(ck.files().len(), 2);
}

#[test]
fn python_pickled_hf_like_file() {
    // Written by tests/data/gen_torch_like_pickles.py with Python's own pickle and zipfile,
    // emulating torch.save (OrderedDict with _metadata set via BUILD, shared storage, a
    // transposed view, an nn.Parameter of bf16).
    let path = data_dir().join("hf_like.bin");
    let ck = Checkpoint::open(&path).unwrap();
    assert_eq!(ck.names(), vec!["b", "p", "w", "wt"]);
    assert_eq!(ck.tensor("w").unwrap().to_f32_vec().unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(ck.tensor("b").unwrap().to_f32_vec().unwrap(), vec![6.0, 7.0]);
    assert_eq!(ck.tensor("wt").unwrap().to_f32_vec().unwrap(), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    let p = ck.tensor("p").unwrap();
    assert_eq!(p.dtype, FileDType::BF16);
    assert_eq!(p.to_f32_vec().unwrap(), vec![1.0, 2.0, 3.0, -4.0]);
}

#[test]
fn metaseq_style_model_key() {
    // {"model": state_dict, "cfg": {...}, "optimizer_history": [...]}
    let path = data_dir().join("metaseq_like.pt");
    let ck = Checkpoint::open(&path).unwrap();
    assert_eq!(ck.names(), vec!["b", "p", "w", "wt"]);
    assert_eq!(ck.tensor("wt").unwrap().to_f32_vec().unwrap(), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
}

#[test]
fn whole_pickle_and_page_release() {
    // read_pickle: everything beside the state dict (metaseq keeps shard_metadata there), as
    // data; tensors only described.
    let path = data_dir().join("metaseq_like.pt");
    let u = opt_checkpoint::torchzip::read_pickle(&path).unwrap();
    let top = u.top();
    let model = u.get(top, "model").unwrap();
    assert!(matches!(u.get(model, "w"), Some(opt_checkpoint::pickle::Value::Tensor(_))));
    assert!(u.get(top, "cfg").is_some());
    let e = opt_checkpoint::torchzip::read_pickle(&data_dir().join("no-such.pt")).unwrap_err();
    assert!(e.to_string().contains("no-such.pt"), "{e}");

    // release_pages drops the mapped pages; reading again faults in the same bytes.
    let ck = Checkpoint::open(&path).unwrap();
    let before = ck.tensor("wt").unwrap().to_f32_vec().unwrap();
    ck.release_pages();
    assert_eq!(ck.tensor("wt").unwrap().to_f32_vec().unwrap(), before);
    assert_eq!(ck.tensor("w").unwrap().numel(), 6);
}

#[test]
fn model_key_with_unsafe_extras_is_fine() {
    // Placeholders elsewhere in the file (e.g. an argparse.Namespace under "args") are never
    // needed and never called.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.pt");
    let marker = dir.path().join("pwned");
    let mut p = Pickle::new();
    p.empty_dict().mark();
    p.str("args").global("argparse", "Namespace").empty_tuple().reduce().empty_dict().op(b'b');
    p.str("evil").global("os", "system").mark().str(&format!("touch {}", marker.display())).tuple().reduce();
    p.str("model").empty_dict().str("w").tensor("FloatStorage", "0", 2, 0, &[2], &[1]).setitem();
    p.setitems();
    let pkl = p.stop();
    let s = f32_bytes(&[1.5, 2.5]);
    write_torch_zip(&path, "archive", &pkl, &[("0", &s)], false);
    let ck = Checkpoint::open(&path).unwrap();
    assert_eq!(ck.names(), vec!["w"]);
    assert_eq!(ck.tensor("w").unwrap().to_f32_vec().unwrap(), vec![1.5, 2.5]);
    assert!(!marker.exists());
}

fn expect_unsafe(path: &Path) -> String {
    match Checkpoint::open(path) {
        Err(e @ CheckpointError::Unsafe { .. }) => {
            let s = e.to_string();
            assert!(s.contains(&path.display().to_string()), "{s}");
            s
        }
        Err(e) => panic!("expected Unsafe, got {e}"),
        Ok(ck) => panic!("loaded {:?}", ck.names()),
    }
}

#[test]
fn malicious_pickles_never_execute() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let cmd = format!("touch {}", marker.display());
    let path = dir.path().join("pytorch_model.bin");

    // 1. The classic: the whole object is os.system(cmd) (protocol 0 opcodes).
    let pkl = format!("cos\nsystem\n(S'{cmd}'\ntR.").into_bytes();
    write_torch_zip(&path, "archive", &pkl, &[], false);
    let msg = expect_unsafe(&path);
    assert!(msg.contains("os.system"), "{msg}");
    // The same with the literal payload from the spec.
    write_torch_zip(&path, "archive", b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.", &[], false);
    expect_unsafe(&path);

    // 2. A tensor entry of the state dict is posix.system(cmd) (protocol 2, STACK_GLOBAL).
    let mut p = Pickle::new();
    p.empty_dict().str("w").str("posix").str("system").op(0x93).mark().str(&cmd).tuple().reduce().setitem();
    let pkl = p.stop();
    write_torch_zip(&path, "archive", &pkl, &[], false);
    let msg = expect_unsafe(&path);
    assert!(msg.contains("'w'") && msg.contains("posix.system"), "{msg}");

    // 3. A tensor rebuilt on a storage produced by a forbidden call.
    let mut p = Pickle::new();
    p.empty_dict().str("w").global("torch._utils", "_rebuild_tensor_v2").mark();
    p.global("subprocess", "check_output").mark().str(&cmd).tuple().reduce();
    p.int(0).ints_tuple(&[1]).ints_tuple(&[1]).op(0x89).empty_dict().tuple().reduce().setitem();
    let pkl = p.stop();
    write_torch_zip(&path, "archive", &pkl, &[], false);
    let msg = expect_unsafe(&path);
    assert!(msg.contains("subprocess.check_output"), "{msg}");

    // 4. Object instantiation opcodes (INST, OBJ, NEWOBJ, BUILD with __setstate__) on a
    //    forbidden class.
    for pkl in
        [format!("(S'{cmd}'\nios\nsystem\n.").into_bytes(), format!("(cos\nsystem\nS'{cmd}'\no.").into_bytes(), {
            let mut p = Pickle::new();
            p.global("os", "system").mark().str(&cmd).tuple().op(0x81).empty_dict().op(b'b');
            p.stop()
        }]
    {
        write_torch_zip(&path, "archive", &pkl, &[], false);
        expect_unsafe(&path);
    }
    assert!(!marker.exists(), "a payload ran");
}

#[test]
fn structural_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pytorch_model.bin");
    let (s0, s1) = storages();
    let pkl = state_dict_pickle();

    // missing storage entry: names the tensor and the file
    write_torch_zip(&path, "archive", &pkl, &[("0", &s0)], false);
    let e = Checkpoint::open(&path).unwrap_err();
    assert!(matches!(&e, CheckpointError::Tensor { name, .. } if name.starts_with("a.")), "{e}");
    assert!(e.to_string().contains("archive/data/1"), "{e}");

    // storage too small for the view
    write_torch_zip(&path, "archive", &pkl, &[("0", &s0), ("1", &s1[..20])], false);
    let e = Checkpoint::open(&path).unwrap_err();
    assert!(matches!(&e, CheckpointError::Tensor { .. }), "{e}");

    // big-endian
    write_zip(&path, &[entry("archive/data.pkl", &pkl), entry("archive/byteorder", b"big")]);
    let e = Checkpoint::open(&path).unwrap_err();
    assert!(e.to_string().contains("big"), "{e}");

    // no data.pkl
    write_zip(&path, &[entry("archive/other.pkl", &pkl)]);
    assert!(matches!(Checkpoint::open(&path).unwrap_err(), CheckpointError::Corrupt { .. }));

    // top level is not a dict
    let mut p = Pickle::new();
    p.mark().int(1).int(2).op(b'l');
    write_torch_zip(&path, "archive", &p.stop(), &[], false);
    let e = Checkpoint::open(&path).unwrap_err();
    assert!(matches!(&e, CheckpointError::Corrupt { detail, .. } if detail.contains("list")), "{e}");

    // legacy (non-zip) torch file
    std::fs::write(&path, b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.").unwrap();
    let e = Checkpoint::open(&path).unwrap_err();
    assert!(matches!(&e, CheckpointError::Corrupt { .. }), "{e}");

    // truncated pickle
    write_torch_zip(&path, "archive", &pkl[..pkl.len() / 2], &[("0", &s0), ("1", &s1)], false);
    let e = Checkpoint::open(&path).unwrap_err();
    assert!(matches!(&e, CheckpointError::Corrupt { detail, .. } if detail.contains("data.pkl")), "{e}");

    // view reaching past its storage
    let mut p = Pickle::new();
    p.empty_dict().str("w").tensor("FloatStorage", "0", 2, 1, &[2], &[1]).setitem();
    write_torch_zip(&path, "archive", &p.stop(), &[("0", &s1[..8])], false);
    let e = Checkpoint::open(&path).unwrap_err();
    assert!(matches!(&e, CheckpointError::Tensor { name, .. } if name == "w"), "{e}");
}

#[test]
fn truncated_and_mutated_zips_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.bin");
    let (s0, s1) = storages();
    write_torch_zip(&good, "archive", &state_dict_pickle(), &[("0", &s0), ("1", &s1)], false);
    let full = std::fs::read(&good).unwrap();
    let p = dir.path().join("bad.bin");
    for at in (0..full.len()).step_by(7) {
        std::fs::write(&p, &full[..at]).unwrap();
        let e = Checkpoint::open(&p).expect_err("truncated zip opened");
        assert!(e.to_string().contains("bad.bin"), "{e}");
    }
    let mut r = Rng(42);
    for _ in 0..common::fuzz_iters(500) {
        let mut f = full.clone();
        for _ in 0..1 + r.below(3) {
            let i = r.below(f.len());
            f[i] = r.next() as u8;
        }
        std::fs::write(&p, &f).unwrap();
        if let Ok(ck) = Checkpoint::open(&p) {
            for t in ck.tensors() {
                let _ = t.and_then(|t| t.to_f32_vec());
            }
        }
    }
}
