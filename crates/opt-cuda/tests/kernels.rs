//! Every CUDA kernel against its CPU twin (opt-tensor's CpuBackend, the reference) on random
//! inputs. Outputs that are overwritten start poisoned with NaN, so an element the kernel
//! forgot to write fails the comparison; accumulating outputs start from random values.
//!
//! These need a GPU, so they are `#[ignore]`d: run them on a GPU machine with
//! `cargo test -p opt-cuda --release -- --ignored --test-threads=1` (bench/gpu/run.sh does).
//! Tolerances, as ‖gpu − cpu‖ / ‖cpu‖: f32 arithmetic 1e-5 (different summation orders),
//! products with bf16-rounded operands 1e-2; where both sides do the same operations in the
//! same order the results must be bit-identical.

use std::sync::OnceLock;

use opt_cuda::CudaBackend;
use opt_tensor::{rng, Activation, AdamW, AttnDims, Backend, Buffer, CpuBackend, CpuBuf, DType, Dropout, Gemm, View};

fn gpu() -> &'static CudaBackend {
    static G: OnceLock<CudaBackend> = OnceLock::new();
    G.get_or_init(|| match CudaBackend::new(0) {
        Ok(b) => {
            eprintln!("GPU: {:?}", b.info());
            b
        }
        Err(e) => panic!("these tests need a CUDA GPU: {e}"),
    })
}

/// A second GPU backend in mixed precision (bf16 attention products), as a bf16 model sets it.
fn gpu_mixed() -> &'static CudaBackend {
    static G: OnceLock<CudaBackend> = OnceLock::new();
    G.get_or_init(|| match CudaBackend::new(0) {
        Ok(b) => {
            b.set_mixed_precision(Some(DType::BF16));
            b
        }
        Err(e) => panic!("these tests need a CUDA GPU: {e}"),
    })
}

fn cpu() -> CpuBackend {
    CpuBackend::new()
}

fn randn(seed: u64, n: usize) -> Vec<f32> {
    (0..n as u64).map(|i| rng::normal(seed, i)).collect()
}

/// Upload to both backends.
fn both(data: &[f32], dtype: DType) -> (CpuBuf, opt_cuda::CudaBuf) {
    (cpu().from_f32(data, dtype).expect("cpu upload"), gpu().from_f32(data, dtype).expect("gpu upload"))
}

/// An f32 output pair: NaN-poisoned on the GPU (the CPU side's start value is irrelevant for
/// overwriting kernels).
fn outs(n: usize) -> (CpuBuf, opt_cuda::CudaBuf) {
    (CpuBuf::from_f32_vec(vec![0.0; n]), gpu().from_f32(&vec![f32::NAN; n], DType::F32).expect("poison"))
}

fn down(b: &opt_cuda::CudaBuf) -> Vec<f32> {
    gpu().to_f32(b.v()).expect("download")
}

/// ‖got − want‖ / ‖want‖ (want = 0: ‖got‖); infinite when anything is NaN.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if g.is_nan() != w.is_nan() {
            return f64::INFINITY;
        }
        if g.is_nan() {
            continue;
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

#[track_caller]
fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

#[track_caller]
fn check_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "{what}[{i}]: {g} vs {w}");
    }
}

const F32_TOL: f64 = 1e-5;
const BF16_TOL: f64 = 1e-2;

// ---- memory ---------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU"]
fn memory_round_trips_fill_and_copies() {
    let (c, g) = (cpu(), gpu());
    let x = randn(1, 1000);
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let (cb, gb) = both(&x, dt);
        check_bits(&format!("round trip {dt}"), &down(&gb), &c.to_f32(cb.v()).unwrap());
        check_bits("window", &g.to_f32(gb.at(17, 100)).unwrap(), &c.to_f32(cb.at(17, 100)).unwrap());
        // fill a window with a value that needs rounding
        let (mut cb2, mut gb2) = both(&x, dt);
        c.fill(cb2.at_mut(10, 500), 1.0 / 3.0).unwrap();
        g.fill(gb2.at_mut(10, 500), 1.0 / 3.0).unwrap();
        check_bits(&format!("fill {dt}"), &down(&gb2), &c.to_f32(cb2.v()).unwrap());
        // conversions between every pair of dtypes
        for dt2 in [DType::F32, DType::BF16, DType::F16] {
            let mut co = c.zeros(dt2, 700).unwrap();
            let mut go = g.from_f32(&vec![f32::NAN; 700], dt2).unwrap();
            c.copy(co.at_mut(0, 600), cb.at(5, 600)).unwrap();
            g.copy(go.at_mut(0, 600), gb.at(5, 600)).unwrap();
            c.fill(co.at_mut(600, 100), f32::NAN).unwrap();
            check_bits(&format!("copy {dt} -> {dt2}"), &down(&go), &c.to_f32(co.v()).unwrap());
        }
    }
    // strided 2-D copy (KV-cache write)
    let (cs, gs) = both(&x, DType::F32);
    let (mut co, mut go) = (CpuBuf::from_f32_vec(vec![0.5; 900]), g.from_f32(&vec![0.5; 900], DType::F32).unwrap());
    c.copy_2d(co.at_mut(3, 890), 40, cs.at(7, 900), 37, 20, 30).unwrap();
    g.copy_2d(go.at_mut(3, 890), 40, gs.at(7, 900), 37, 20, 30).unwrap();
    check_bits("copy_2d", &down(&go), co.as_f32().unwrap());
    // errors, not panics
    assert!(g.copy_2d(go.at_mut(0, 100), 10, gs.at(0, 100), 10, 20, 10).is_err());
    assert!(g.to_f32(opt_tensor::View::new(&gs, 990, 20)).is_err());
}

// ---- dense algebra ----------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU"]
fn matmul_all_layouts_and_dtypes() {
    let (c, g) = (cpu(), gpu());
    let cases = [(7, 5, 3), (64, 96, 80), (33, 130, 257), (1, 50, 768)];
    let mut seed = 10;
    for &(m, n, k) in &cases {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for batch in [1usize, 3] {
                for (da, db, tol) in [
                    (DType::F32, DType::F32, F32_TOL),
                    (DType::F32, DType::BF16, BF16_TOL),
                    (DType::BF16, DType::BF16, F32_TOL),
                    (DType::F16, DType::F32, BF16_TOL),
                ] {
                    seed += 1;
                    let mut gm = Gemm::new(m, n, k, ta, tb);
                    gm.batch = batch;
                    gm.alpha = 0.75;
                    let a = randn(seed, m * k * batch);
                    let b = randn(seed + 1000, k * n * batch);
                    let (ca, ga) = both(&a, da);
                    let (cb, gb) = both(&b, db);
                    let (mut co, mut go) = outs(m * n * batch);
                    c.matmul(co.vm(), ca.v(), cb.v(), &gm).unwrap();
                    g.matmul(go.vm(), ga.v(), gb.v(), &gm).unwrap();
                    let what = format!("matmul {m}x{n}x{k} ta={ta} tb={tb} batch={batch} {da}x{db}");
                    check(&what, &down(&go), co.as_f32().unwrap(), tol);
                    // accumulate (beta = 1) into random values
                    let init = randn(seed + 2000, m * n * batch);
                    let (mut co, mut go) = both(&init, DType::F32);
                    c.matmul(co.vm(), ca.v(), cb.v(), &gm.accumulate()).unwrap();
                    g.matmul(go.vm(), ga.v(), gb.v(), &gm.accumulate()).unwrap();
                    check(&format!("{what} accumulate"), &down(&go), co.as_f32().unwrap(), tol);
                }
            }
        }
    }
    // empty product: k = 0 zeroes (beta 0) the output
    let (mut co, mut go) = outs(12);
    let (ca, ga) = both(&[], DType::F32);
    c.matmul(co.vm(), ca.v(), ca.v(), &Gemm::new(3, 4, 0, false, false)).unwrap();
    g.matmul(go.vm(), ga.v(), ga.v(), &Gemm::new(3, 4, 0, false, false)).unwrap();
    check_bits("k = 0", &down(&go), co.as_f32().unwrap());
    // a bf16 output is refused, short operands are refused
    let mut bad = g.zeros(DType::BF16, 12).unwrap();
    let (_, gb) = both(&randn(3, 12), DType::F32);
    assert!(g.matmul(bad.vm(), gb.v(), gb.v(), &Gemm::new(3, 4, 3, false, false)).is_err());
    assert!(g.matmul(go.vm(), gb.v(), gb.v(), &Gemm::new(3, 4, 5, false, false)).is_err());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn elementwise_kernels() {
    let (c, g) = (cpu(), gpu());
    let (rows, dim) = (300, 129);
    let n = rows * dim;
    let x = randn(21, n);
    let y = randn(22, n);
    let (cx, gx) = both(&x, DType::F32);
    let (cy, gy) = both(&y, DType::F32);
    // add, add_assign, scale
    let (mut co, mut go) = outs(n);
    c.add(co.vm(), cx.v(), cy.v()).unwrap();
    g.add(go.vm(), gx.v(), gy.v()).unwrap();
    check_bits("add", &down(&go), co.as_f32().unwrap());
    c.add_assign(co.vm(), cx.v()).unwrap();
    g.add_assign(go.vm(), gx.v()).unwrap();
    check_bits("add_assign", &down(&go), co.as_f32().unwrap());
    c.scale(co.vm(), -0.37).unwrap();
    g.scale(go.vm(), -0.37).unwrap();
    check_bits("scale", &down(&go), co.as_f32().unwrap());
    // bias_add with a bf16 bias, bias_backward accumulating
    for dt in [DType::F32, DType::BF16] {
        let (cb, gb) = both(&randn(23, dim), dt);
        let (mut co, mut go) = both(&x, DType::F32);
        c.bias_add(co.vm(), cb.v(), dim).unwrap();
        g.bias_add(go.vm(), gb.v(), dim).unwrap();
        check_bits(&format!("bias_add {dt}"), &down(&go), co.as_f32().unwrap());
    }
    let init = randn(24, dim);
    let (mut cdb, mut gdb) = both(&init, DType::F32);
    c.bias_backward(cdb.vm(), cx.v(), dim).unwrap();
    g.bias_backward(gdb.vm(), gx.v(), dim).unwrap();
    check("bias_backward", &down(&gdb), cdb.as_f32().unwrap(), F32_TOL);
    let again = {
        let (_, mut gdb2) = both(&init, DType::F32);
        g.bias_backward(gdb2.vm(), gx.v(), dim).unwrap();
        down(&gdb2)
    };
    check_bits("bias_backward is deterministic", &again, &down(&gdb));
    // sum of squares
    for len in [1usize, 1000, 200_003] {
        let v = randn(25 + len as u64, len);
        let (cv, gv) = both(&v, DType::F32);
        let (a, b) = (c.sum_squares(cv.v()).unwrap(), g.sum_squares(gv.v()).unwrap());
        assert!((a - b).abs() <= 1e-12 * a.abs(), "sum_squares {len}: {b} vs {a}");
        assert_eq!(b.to_bits(), g.sum_squares(gv.v()).unwrap().to_bits(), "sum_squares is deterministic");
    }
    // activations: ReLU exact; GELU to the last bit or so (double erfc on both sides)
    let wide: Vec<f32> = x.iter().map(|v| v * 4.0).collect();
    let (cw, gw) = both(&wide, DType::F32);
    for act in [Activation::Relu, Activation::Gelu] {
        let (mut co, mut go) = outs(n);
        c.activation_forward(act, co.vm(), cw.v()).unwrap();
        g.activation_forward(act, go.vm(), gw.v()).unwrap();
        check(&format!("{act:?} forward"), &down(&go), co.as_f32().unwrap(), 1e-7);
        let (mut co, mut go) = outs(n);
        c.activation_backward(act, co.vm(), cw.v(), cy.v()).unwrap();
        g.activation_backward(act, go.vm(), gw.v(), gy.v()).unwrap();
        check(&format!("{act:?} backward"), &down(&go), co.as_f32().unwrap(), 1e-7);
    }
    // dropout: the same mask bit for bit (the RNG is a port of rng.rs)
    for p in [0.0f32, 0.1, 0.5, 1.0] {
        let d = Dropout { p, seed: 1234, offset: 99_999 };
        let (mut co, mut go) = both(&x, DType::F32);
        c.dropout(co.vm(), &d).unwrap();
        g.dropout(go.vm(), &d).unwrap();
        check_bits(&format!("dropout p={p}"), &down(&go), co.as_f32().unwrap());
    }
    assert!(g.dropout(go.vm(), &Dropout { p: 1.5, seed: 0, offset: 0 }).is_err());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn embedding_forward_and_backward() {
    let (c, g) = (cpu(), gpu());
    let (vocab, dim) = (97, 80);
    let table = randn(31, vocab * dim);
    let ids: Vec<u32> = (0..700).map(|i| ((i * 7919) % 89) as u32).collect();
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let (ct, gt) = both(&table, dt);
        let (mut co, mut go) = outs(ids.len() * dim);
        c.embedding_forward(co.vm(), ct.v(), &ids, dim, false).unwrap();
        g.embedding_forward(go.vm(), gt.v(), &ids, dim, false).unwrap();
        check_bits(&format!("embedding_forward {dt}"), &down(&go), co.as_f32().unwrap());
        c.embedding_forward(co.vm(), ct.at(dim, (vocab - 1) * dim), &ids, dim, true).unwrap();
        g.embedding_forward(go.vm(), gt.at(dim, (vocab - 1) * dim), &ids, dim, true).unwrap();
        check_bits(&format!("embedding_forward accumulate {dt}"), &down(&go), co.as_f32().unwrap());
    }
    let dout = randn(32, ids.len() * dim);
    let (cd, gd) = both(&dout, DType::F32);
    let init = randn(33, vocab * dim);
    let (mut ct, mut gt) = both(&init, DType::F32);
    c.embedding_backward(ct.vm(), &ids, cd.v(), dim).unwrap();
    g.embedding_backward(gt.vm(), &ids, gd.v(), dim).unwrap();
    // Same additions in the same order: identical bits.
    check_bits("embedding_backward", &down(&gt), ct.as_f32().unwrap());
    let (_, gf) = both(&table, DType::F32);
    let (_, mut go) = outs(dim);
    assert!(g.embedding_forward(go.vm(), gf.v(), &[vocab as u32], dim, false).is_err());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn layernorm_forward_and_backward() {
    let (c, g) = (cpu(), gpu());
    for &(rows, dim) in &[(5usize, 768usize), (64, 2048), (3, 50)] {
        let n = rows * dim;
        // a large common offset: the two-pass f64 statistics must keep the digits
        let x: Vec<f32> = randn(41, n).iter().map(|v| v * 2.0 + 30.0).collect();
        let (cx, gx) = both(&x, DType::F32);
        for (affine, wdt) in [(true, DType::F32), (true, DType::BF16), (false, DType::F32)] {
            let (cw, gw) = both(&randn(42, dim).iter().map(|v| 1.0 + 0.1 * v).collect::<Vec<_>>(), wdt);
            let (cb, gb) = both(&randn(43, dim), wdt);
            let (mut co, mut go) = outs(n);
            let (mut cm, mut gm) = outs(rows);
            let (mut cr, mut gr) = outs(rows);
            let (cwo, gwo) = if affine { (Some(cw.v()), Some(gw.v())) } else { (None, None) };
            let (cbo, gbo) = if affine { (Some(cb.v()), Some(gb.v())) } else { (None, None) };
            c.layernorm_forward(co.vm(), cm.vm(), cr.vm(), cx.v(), cwo, cbo, dim, 1e-5).unwrap();
            g.layernorm_forward(go.vm(), gm.vm(), gr.vm(), gx.v(), gwo, gbo, dim, 1e-5).unwrap();
            let what = format!("layernorm {rows}x{dim} affine={affine} {wdt}");
            check(&format!("{what} out"), &down(&go), co.as_f32().unwrap(), F32_TOL);
            check(&format!("{what} mean"), &down(&gm), cm.as_f32().unwrap(), 1e-7);
            check(&format!("{what} rstd"), &down(&gr), cr.as_f32().unwrap(), 1e-6);
            // backward: everything accumulates, so start from random values
            let dy = randn(44, n);
            let (cdy, gdy) = both(&dy, DType::F32);
            let (mut cdx, mut gdx) = both(&randn(45, n), DType::F32);
            let (mut cdw, mut gdw) = both(&randn(46, dim), DType::F32);
            let (mut cdb, mut gdb) = both(&randn(47, dim), DType::F32);
            let (cwo, gwo) = if affine { (Some(cw.v()), Some(gw.v())) } else { (None, None) };
            c.layernorm_backward(cdx.vm(), Some(cdw.vm()), Some(cdb.vm()), cdy.v(), cx.v(), cwo, cm.v(), cr.v(), dim)
                .unwrap();
            g.layernorm_backward(gdx.vm(), Some(gdw.vm()), Some(gdb.vm()), gdy.v(), gx.v(), gwo, gm.v(), gr.v(), dim)
                .unwrap();
            check(&format!("{what} dinp"), &down(&gdx), cdx.as_f32().unwrap(), F32_TOL);
            check(&format!("{what} dweight"), &down(&gdw), cdw.as_f32().unwrap(), F32_TOL);
            check(&format!("{what} dbias"), &down(&gdb), cdb.as_f32().unwrap(), F32_TOL);
        }
    }
}

// ---- attention ------------------------------------------------------------------------------

struct AttnCase {
    dims: AttnDims,
    mask: Option<Vec<u8>>,
    drop: Option<Dropout>,
}

fn attn_cases() -> Vec<AttnCase> {
    let dims = |batch, tq, tk, heads, head_dim, q_offset, cap: usize| AttnDims {
        batch,
        tq,
        tk,
        heads,
        head_dim,
        q_offset,
        kv_batch_stride: cap * heads * head_dim,
        scale: (head_dim as f32).powf(-0.5),
    };
    // Left padding: batch row 1 starts with 5 padding positions (fully masked query rows).
    let left_pad = |b: usize, t: usize, pad: usize| -> Vec<u8> {
        (0..b * t).map(|i| u8::from(!(i / t == 1 && i % t < pad))).collect()
    };
    vec![
        AttnCase { dims: dims(2, 37, 37, 3, 64, 0, 37), mask: None, drop: None },
        AttnCase { dims: dims(2, 50, 50, 2, 80, 0, 50), mask: Some(left_pad(2, 50, 5)), drop: None },
        AttnCase { dims: dims(1, 70, 70, 2, 128, 0, 70), mask: None, drop: None },
        AttnCase {
            dims: dims(2, 40, 40, 4, 32, 0, 40),
            mask: Some(left_pad(2, 40, 3)),
            drop: Some(Dropout { p: 0.2, seed: 77, offset: 1000 }),
        },
        // decode with a KV cache: one new query at position 19 of a cache of capacity 32
        AttnCase { dims: dims(3, 1, 20, 4, 64, 19, 32), mask: Some(left_pad(3, 20, 4)), drop: None },
        // a chunk of 6 new queries after 10 cached positions
        AttnCase { dims: dims(2, 6, 16, 2, 64, 10, 24), mask: None, drop: None },
        // decoding over a long cache (more keys than the decode kernel's threads), head dim 80
        AttnCase { dims: dims(2, 1, 600, 3, 80, 599, 640), mask: Some(left_pad(2, 600, 37)), drop: None },
        // decoding where row 1's keys are all padding: uniform weights over every key
        AttnCase {
            dims: dims(2, 1, 12, 2, 128, 11, 16),
            mask: Some((0..24).map(|i| u8::from(i < 12)).collect()),
            drop: None,
        },
    ]
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_forward_matches_cpu() {
    let (c, g) = (cpu(), gpu());
    for (ci, case) in attn_cases().iter().enumerate() {
        let d = &case.dims;
        let cdim = d.heads * d.head_dim;
        let q = randn(50 + ci as u64, d.batch * d.tq * cdim);
        let kv_len = (d.batch - 1) * d.kv_batch_stride + d.tk * cdim;
        let k = randn(60 + ci as u64, kv_len);
        let v = randn(70 + ci as u64, kv_len);
        let ((cq, gq), (ck, gk), (cv, gv)) = (both(&q, DType::F32), both(&k, DType::F32), both(&v, DType::F32));
        let plen = d.batch * d.heads * d.tq * d.tk;
        for with_probs in [false, true] {
            let (mut co, mut go) = outs(d.batch * d.tq * cdim);
            let (mut cp, mut gp) = outs(plen);
            let mask = case.mask.as_deref();
            c.attention_forward(
                co.vm(),
                with_probs.then(|| cp.vm()),
                cq.v(),
                ck.v(),
                cv.v(),
                mask,
                d,
                case.drop.as_ref(),
            )
            .unwrap();
            g.attention_forward(
                go.vm(),
                with_probs.then(|| gp.vm()),
                gq.v(),
                gk.v(),
                gv.v(),
                mask,
                d,
                case.drop.as_ref(),
            )
            .unwrap();
            let what = format!("attention case {ci} probs={with_probs}");
            check(&format!("{what} out"), &down(&go), co.as_f32().unwrap(), F32_TOL);
            if with_probs {
                check(&format!("{what} probs"), &down(&gp), cp.as_f32().unwrap(), F32_TOL);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_backward_matches_cpu() {
    let (c, g) = (cpu(), gpu());
    for (ci, case) in attn_cases().iter().enumerate().filter(|(_, c)| c.dims.q_offset == 0) {
        let d = &case.dims;
        let cdim = d.heads * d.head_dim;
        let (nq, nkv) = (d.batch * d.tq * cdim, d.batch * d.tk * cdim);
        let q = randn(80 + ci as u64, nq);
        let k = randn(81 + ci as u64, nkv);
        let v = randn(82 + ci as u64, nkv);
        let dout = randn(83 + ci as u64, nq);
        let ((cq, gq), (ck, gk), (cv, gv)) = (both(&q, DType::F32), both(&k, DType::F32), both(&v, DType::F32));
        let (cdo, gdo) = both(&dout, DType::F32);
        // the CPU's saved probabilities feed both backward passes
        let plen = d.batch * d.heads * d.tq * d.tk;
        let mut cp = CpuBuf::from_f32_vec(vec![0.0; plen]);
        let mut co = CpuBuf::from_f32_vec(vec![0.0; nq]);
        c.attention_forward(
            co.vm(),
            Some(cp.vm()),
            cq.v(),
            ck.v(),
            cv.v(),
            case.mask.as_deref(),
            d,
            case.drop.as_ref(),
        )
        .unwrap();
        let gp = g.from_f32(cp.as_f32().unwrap(), DType::F32).unwrap();
        let (mut cdq, mut gdq) = outs(nq);
        let (mut cdk, mut gdk) = outs(nkv);
        let (mut cdv, mut gdv) = outs(nkv);
        c.attention_backward(
            cdq.vm(),
            cdk.vm(),
            cdv.vm(),
            cdo.v(),
            cq.v(),
            ck.v(),
            cv.v(),
            cp.v(),
            d,
            case.drop.as_ref(),
        )
        .unwrap();
        g.attention_backward(
            gdq.vm(),
            gdk.vm(),
            gdv.vm(),
            gdo.v(),
            gq.v(),
            gk.v(),
            gv.v(),
            gp.v(),
            d,
            case.drop.as_ref(),
        )
        .unwrap();
        let what = format!("attention backward case {ci}");
        check(&format!("{what} dq"), &down(&gdq), cdq.as_f32().unwrap(), F32_TOL);
        check(&format!("{what} dk"), &down(&gdk), cdk.as_f32().unwrap(), F32_TOL);
        check(&format!("{what} dv"), &down(&gdv), cdv.as_f32().unwrap(), F32_TOL);
    }
}

/// Attention with bf16 products (the mixed-precision path of a bf16 model) against the f32 CPU
/// reference: forward output and saved probabilities, then dq/dk/dv, within bf16 tolerance.
/// Cases with fewer than 16 queries exercise the fallback to the f32 kernel.
#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_mixed_precision_matches_cpu() {
    let (c, g) = (cpu(), gpu_mixed());
    let mut cases = attn_cases();
    // a longer training-like case: 2 x 160 tokens, 4 heads of 64, left padding and dropout
    cases.push(AttnCase {
        dims: AttnDims {
            batch: 2,
            tq: 160,
            tk: 160,
            heads: 4,
            head_dim: 64,
            q_offset: 0,
            kv_batch_stride: 160 * 256,
            scale: 0.125,
        },
        mask: Some((0..320).map(|i| u8::from(!(i / 160 == 1 && i % 160 < 7))).collect()),
        drop: Some(Dropout { p: 0.1, seed: 5, offset: 0 }),
    });
    for (ci, case) in cases.iter().enumerate() {
        let d = &case.dims;
        let cdim = d.heads * d.head_dim;
        let nq = d.batch * d.tq * cdim;
        let kv_len = (d.batch - 1) * d.kv_batch_stride + d.tk * cdim;
        let q = randn(150 + ci as u64, nq);
        let k = randn(160 + ci as u64, kv_len);
        let v = randn(170 + ci as u64, kv_len);
        let (cq, ck, cv) = (
            c.from_f32(&q, DType::F32).unwrap(),
            c.from_f32(&k, DType::F32).unwrap(),
            c.from_f32(&v, DType::F32).unwrap(),
        );
        let (gq, gk, gv) = (
            g.from_f32(&q, DType::F32).unwrap(),
            g.from_f32(&k, DType::F32).unwrap(),
            g.from_f32(&v, DType::F32).unwrap(),
        );
        let plen = d.batch * d.heads * d.tq * d.tk;
        let mask = case.mask.as_deref();
        let mut co = CpuBuf::from_f32_vec(vec![0.0; nq]);
        let mut cp = CpuBuf::from_f32_vec(vec![0.0; plen]);
        c.attention_forward(co.vm(), Some(cp.vm()), cq.v(), ck.v(), cv.v(), mask, d, case.drop.as_ref()).unwrap();
        for with_probs in [false, true] {
            let mut go = g.from_f32(&vec![f32::NAN; nq], DType::F32).unwrap();
            let mut gp = g.from_f32(&vec![f32::NAN; plen], DType::F32).unwrap();
            g.attention_forward(
                go.vm(),
                with_probs.then(|| gp.vm()),
                gq.v(),
                gk.v(),
                gv.v(),
                mask,
                d,
                case.drop.as_ref(),
            )
            .unwrap();
            let what = format!("mixed attention case {ci} probs={with_probs}");
            check(&format!("{what} out"), &g.to_f32(go.v()).unwrap(), co.as_f32().unwrap(), BF16_TOL);
            if with_probs {
                check(&format!("{what} probs"), &g.to_f32(gp.v()).unwrap(), cp.as_f32().unwrap(), BF16_TOL);
            }
        }
        if d.q_offset != 0 {
            continue; // training shapes only for the backward pass
        }
        let dout = randn(180 + ci as u64, nq);
        let (cdo, gdo) = (c.from_f32(&dout, DType::F32).unwrap(), g.from_f32(&dout, DType::F32).unwrap());
        let gp = g.from_f32(cp.as_f32().unwrap(), DType::F32).unwrap();
        let nkv = d.batch * d.tk * cdim;
        let (mut cdq, mut cdk, mut cdv) = (
            CpuBuf::from_f32_vec(vec![0.0; nq]),
            CpuBuf::from_f32_vec(vec![0.0; nkv]),
            CpuBuf::from_f32_vec(vec![0.0; nkv]),
        );
        c.attention_backward(
            cdq.vm(),
            cdk.vm(),
            cdv.vm(),
            cdo.v(),
            cq.v(),
            ck.v(),
            cv.v(),
            cp.v(),
            d,
            case.drop.as_ref(),
        )
        .unwrap();
        let mut gdq = g.from_f32(&vec![f32::NAN; nq], DType::F32).unwrap();
        let mut gdk = g.from_f32(&vec![f32::NAN; nkv], DType::F32).unwrap();
        let mut gdv = g.from_f32(&vec![f32::NAN; nkv], DType::F32).unwrap();
        g.attention_backward(
            gdq.vm(),
            gdk.vm(),
            gdv.vm(),
            gdo.v(),
            gq.v(),
            gk.v(),
            gv.v(),
            gp.v(),
            d,
            case.drop.as_ref(),
        )
        .unwrap();
        let what = format!("mixed attention backward case {ci}");
        check(&format!("{what} dq"), &g.to_f32(gdq.v()).unwrap(), cdq.as_f32().unwrap(), BF16_TOL);
        check(&format!("{what} dk"), &g.to_f32(gdk.v()).unwrap(), cdk.as_f32().unwrap(), BF16_TOL);
        check(&format!("{what} dv"), &g.to_f32(gdv.v()).unwrap(), cdv.as_f32().unwrap(), BF16_TOL);
    }
}

/// The linear layer: the fused small-row kernel (bf16/f16 weights, 1..=8 rows, bias fused)
/// equals the CPU's f32 arithmetic on the same (widened) weights up to summation order; other
/// shapes (more rows, an unaligned weight, f32 weights) take cuBLAS and meet its tolerance.
#[test]
#[ignore = "needs a CUDA GPU"]
fn linear_matches_cpu() {
    let (c, g) = (cpu(), gpu());
    for &(in_dim, out_dim) in &[(768usize, 300usize), (64, 2051), (3072, 768)] {
        for dt in [DType::BF16, DType::F16, DType::F32] {
            for &(rows, woff) in &[(1usize, 0usize), (3, 0), (8, 0), (9, 0), (2, 3)] {
                for with_bias in [true, false] {
                    let wlen = woff + out_dim * in_dim;
                    let (cw, gw) = both(&randn(300 + rows as u64, wlen), dt);
                    let (cb, gb) = both(&randn(301, out_dim), dt);
                    let (cx, gx) = both(&randn(302 + in_dim as u64, rows * in_dim), DType::F32);
                    let (mut co, mut go) = outs(rows * out_dim);
                    let (cwv, gwv) = (View::new(&cw, woff, out_dim * in_dim), View::new(&gw, woff, out_dim * in_dim));
                    c.linear(co.vm(), cx.v(), cwv, with_bias.then(|| cb.v()), rows, in_dim, out_dim).unwrap();
                    g.linear(go.vm(), gx.v(), gwv, with_bias.then(|| gb.v()), rows, in_dim, out_dim).unwrap();
                    let fused = rows <= 8 && dt != DType::F32 && woff == 0;
                    let tol = if fused || dt == DType::F32 { F32_TOL } else { BF16_TOL };
                    let what = format!("linear {rows}x{out_dim}x{in_dim} {dt} offset {woff} bias={with_bias}");
                    check(&what, &down(&go), co.as_f32().unwrap(), tol);
                }
            }
        }
    }
}

/// The fused decoding epilogues (q/k/v in one launch, fc1 with its activation, a product added
/// to the residual stream) equal the CPU's unfused sequences, for fused and cuBLAS shapes.
#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_linear_epilogues_match_cpu() {
    let (c, g) = (cpu(), gpu());
    let (in_dim, out_dim) = (256usize, 192usize);
    for dt in [DType::BF16, DType::F32] {
        for rows in [1usize, 4, 12] {
            let fused = rows <= 8 && dt != DType::F32;
            let tol = if fused || dt == DType::F32 { F32_TOL } else { BF16_TOL };
            let tag = format!("{rows} rows {dt}");
            let (cx, gx) = both(&randn(500 + rows as u64, rows * in_dim), DType::F32);
            let ws: Vec<_> = (0..3).map(|i| both(&randn(510 + i, out_dim * in_dim), dt)).collect();
            let bs: Vec<_> = (0..3).map(|i| both(&randn(520 + i, out_dim), dt)).collect();
            // linear3
            let mut co: Vec<CpuBuf> = (0..3).map(|_| CpuBuf::from_f32_vec(vec![0.0; rows * out_dim])).collect();
            let mut go: Vec<opt_cuda::CudaBuf> = (0..3).map(|_| outs(rows * out_dim).1).collect();
            {
                let [c0, c1, c2] = &mut co[..] else { unreachable!() };
                let [g0, g1, g2] = &mut go[..] else { unreachable!() };
                c.linear3(
                    [c0.vm(), c1.vm(), c2.vm()],
                    cx.v(),
                    [ws[0].0.v(), ws[1].0.v(), ws[2].0.v()],
                    [Some(bs[0].0.v()), None, Some(bs[2].0.v())],
                    rows,
                    in_dim,
                    out_dim,
                )
                .unwrap();
                g.linear3(
                    [g0.vm(), g1.vm(), g2.vm()],
                    gx.v(),
                    [ws[0].1.v(), ws[1].1.v(), ws[2].1.v()],
                    [Some(bs[0].1.v()), None, Some(bs[2].1.v())],
                    rows,
                    in_dim,
                    out_dim,
                )
                .unwrap();
            }
            for i in 0..3 {
                check(&format!("linear3[{i}] {tag}"), &down(&go[i]), co[i].as_f32().unwrap(), tol);
            }
            // linear_act, both activations
            for act in [Activation::Relu, Activation::Gelu] {
                let (mut cpre, mut gpre) = outs(rows * out_dim);
                let (mut cact, mut gact) = outs(rows * out_dim);
                c.linear_act(cpre.vm(), cact.vm(), cx.v(), ws[0].0.v(), Some(bs[0].0.v()), act, rows, in_dim, out_dim)
                    .unwrap();
                g.linear_act(gpre.vm(), gact.vm(), gx.v(), ws[0].1.v(), Some(bs[0].1.v()), act, rows, in_dim, out_dim)
                    .unwrap();
                check(&format!("linear_act {act:?} pre {tag}"), &down(&gpre), cpre.as_f32().unwrap(), tol);
                check(&format!("linear_act {act:?} out {tag}"), &down(&gact), cact.as_f32().unwrap(), tol);
            }
            // linear_residual
            let (cr, gr) = both(&randn(530, rows * out_dim), DType::F32);
            let (mut cout, mut gout) = outs(rows * out_dim);
            let (mut ctmp, mut gtmp) = outs(rows * out_dim);
            c.linear_residual(
                cout.vm(),
                ctmp.vm(),
                cx.v(),
                ws[1].0.v(),
                Some(bs[1].0.v()),
                cr.v(),
                rows,
                in_dim,
                out_dim,
            )
            .unwrap();
            g.linear_residual(
                gout.vm(),
                gtmp.vm(),
                gx.v(),
                ws[1].1.v(),
                Some(bs[1].1.v()),
                gr.v(),
                rows,
                in_dim,
                out_dim,
            )
            .unwrap();
            check(&format!("linear_residual {tag}"), &down(&gout), cout.as_f32().unwrap(), tol);
        }
    }
}

/// In mixed precision an f32 × f32 product runs with bf16 operands (autocast's weight
/// gradients): within bf16 tolerance of the f32 product, and not bit-equal to it.
#[test]
#[ignore = "needs a CUDA GPU"]
fn mixed_precision_matmul_uses_bf16_operands() {
    let (c, g) = (cpu(), gpu_mixed());
    let (m, n, k) = (96usize, 80usize, 256usize);
    let a = randn(310, m * k);
    let b = randn(311, k * n);
    let gm = Gemm::new(m, n, k, false, false);
    let (ca, cb) = (c.from_f32(&a, DType::F32).unwrap(), c.from_f32(&b, DType::F32).unwrap());
    let (ga, gb) = (g.from_f32(&a, DType::F32).unwrap(), g.from_f32(&b, DType::F32).unwrap());
    let mut co = CpuBuf::from_f32_vec(vec![0.0; m * n]);
    let mut go = g.from_f32(&vec![f32::NAN; m * n], DType::F32).unwrap();
    c.matmul(co.vm(), ca.v(), cb.v(), &gm).unwrap();
    g.matmul(go.vm(), ga.v(), gb.v(), &gm).unwrap();
    let got = g.to_f32(go.v()).unwrap();
    let e = rel_err(&got, co.as_f32().unwrap());
    assert!(e <= BF16_TOL && e > 1e-6, "mixed f32 matmul: relative error {e:.3e}");
}

/// Greedy decoding's argmax on the device equals the CPU's left-to-right scan, ties included.
#[test]
#[ignore = "needs a CUDA GPU"]
fn argmax_rows_matches_cpu() {
    let (c, g) = (cpu(), gpu());
    for &(rows, vocab) in &[(1usize, 50272usize), (32, 50272), (5, 7), (3, 1000)] {
        let mut x = randn(400 + rows as u64, rows * vocab);
        let special = vocab >= 1000 && rows > 1;
        if special {
            // row 0: the maximum twice (the first must win); last row: all equal
            x[17] = 100.0;
            x[vocab - 3] = 100.0;
            for v in &mut x[(rows - 1) * vocab..] {
                *v = -3.5;
            }
        }
        let (cx, gx) = both(&x, DType::F32);
        let want = c.argmax_rows(cx.v(), vocab).unwrap();
        let got = g.argmax_rows(gx.v(), vocab).unwrap();
        assert_eq!(got, want, "argmax {rows}x{vocab}");
        if special {
            assert_eq!((got[0], got[rows - 1]), (17, 0));
        }
    }
}

// ---- output layer and optimizer -----------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU"]
fn cross_entropy_and_log_softmax() {
    let (c, g) = (cpu(), gpu());
    for &(rows, vocab) in &[(7usize, 11usize), (33, 50_272)] {
        let x: Vec<f32> = randn(90, rows * vocab).iter().map(|v| v * 6.0 + 20.0).collect();
        let targets: Vec<i32> =
            (0..rows).map(|r| if r % 5 == 3 { -100 } else { ((r * 7919) % vocab) as i32 }).collect();
        for grad in [None, Some(0.125f32)] {
            let (mut cl, mut gl) = both(&x, DType::F32);
            let (mut closs, mut gloss) = outs(rows);
            c.cross_entropy(cl.vm(), closs.vm(), &targets, vocab, grad).unwrap();
            g.cross_entropy(gl.vm(), gloss.vm(), &targets, vocab, grad).unwrap();
            let what = format!("cross_entropy {rows}x{vocab} grad={grad:?}");
            check(&format!("{what} loss"), &down(&gloss), closs.as_f32().unwrap(), 1e-6);
            check(&format!("{what} logits/grad"), &down(&gl), cl.as_f32().unwrap(), F32_TOL);
        }
        let (cx, gx) = both(&x, DType::F32);
        let (mut co, mut go) = outs(rows * vocab);
        c.log_softmax(co.vm(), cx.v(), vocab).unwrap();
        g.log_softmax(go.vm(), gx.v(), vocab).unwrap();
        check(&format!("log_softmax {rows}x{vocab}"), &down(&go), co.as_f32().unwrap(), 1e-6);
        let (_, mut gl) = both(&x, DType::F32);
        let (_, mut gloss) = outs(rows);
        let mut bad = targets.clone();
        bad[0] = vocab as i32;
        assert!(g.cross_entropy(gl.vm(), gloss.vm(), &bad, vocab, None).is_err());
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn adamw_matches_cpu_over_steps() {
    let (c, g) = (cpu(), gpu());
    let n = 100_003;
    let p0 = randn(100, n);
    let (mut cp, mut gp) = both(&p0, DType::F32);
    let (mut cm, mut gm) = both(&vec![0.0; n], DType::F32);
    let (mut cv, mut gv) = both(&vec![0.0; n], DType::F32);
    for step in 1..=5u64 {
        let hp = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 0.5 };
        let (cg, gg) = both(&randn(100 + step, n), DType::F32);
        c.adamw(cp.vm(), cg.v(), cm.vm(), cv.vm(), &hp).unwrap();
        g.adamw(gp.vm(), gg.v(), gm.vm(), gv.vm(), &hp).unwrap();
    }
    check("adamw params", &down(&gp), cp.as_f32().unwrap(), 1e-6);
    check("adamw m", &down(&gm), cm.as_f32().unwrap(), 1e-6);
    check("adamw v", &down(&gv), cv.as_f32().unwrap(), 1e-6);
    let hp = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 0, grad_scale: 1.0 };
    let (_, gg) = both(&randn(7, n), DType::F32);
    assert!(g.adamw(gp.vm(), gg.v(), gm.vm(), gv.vm(), &hp).is_err());
}
