//! A step-time model on paper, for layouts no CI machine can run.
//!
//! Inputs: a device's dense bf16 peak and the fraction of it a single device's GEMMs reach
//! (measure this on one GPU with the training benchmark), and link bandwidths (intra-node
//! NVLink per GPU, inter-node network per GPU). The model per step and GPU:
//! - compute: `(6 + 2·recompute)·P·tokens / N` FLOPs (activation checkpointing recomputes the
//!   forward, as metaseq did) plus attention `12·L·s·h·tokens/N·(1 + recompute/3)`, at
//!   `peak · gemm_efficiency`;
//! - tensor parallel: per layer 2 all-reduces forward and 2 backward (+2 when recomputing) of
//!   `b·s·h` bf16 activations over NVLink (ring: `2·(tp−1)/tp` of the bytes), not overlapped;
//! - FSDP: all-gather of the parameters twice (forward, backward) and a reduce-scatter of the
//!   gradients, `(fsdp−1)/fsdp · 2 bytes · P/tp` each over the network, overlapped with compute
//!   except for `1 − overlap` of it (ZeRO-3, `parallel.reshard_after_forward = true`); with the
//!   slice kept gathered between forward and backward (ZeRO-2, as the OPT runs did) one
//!   all-gather and one reduce-scatter.
//! - memory per GPU for the model state (activations excluded), as opt-rs holds it: f32 master
//!   weights, AdamW moments and gradient window (16 bytes per parameter over `tp · fsdp`), plus
//!   the bf16 parameters and f32 gradient the model computes with (6 bytes per parameter over
//!   `tp`) for the embedding and one layer, plus under ZeRO-2 the gathered bf16 slice (2 bytes
//!   per parameter over `tp`; each layer's gradient is reduce-scattered after its backward in
//!   both modes).
//!
//! MFU counts the model FLOPs only (`6·P·tokens` + attention, no recompute), as the OPT paper's
//! 147 TFLOP/s/GPU does.

#[derive(Clone, Copy, Debug)]
pub struct Device {
    pub name: &'static str,
    /// Dense bf16 peak, FLOP/s.
    pub peak: f64,
    /// Fraction of peak a single device's large GEMMs reach (measured).
    pub gemm_efficiency: f64,
    /// NVLink bandwidth per GPU, bytes/s (one direction).
    pub nvlink: f64,
    /// Network bandwidth per GPU, bytes/s.
    pub network: f64,
}

pub const A100: Device = Device { name: "A100-80G", peak: 312e12, gemm_efficiency: 0.62, nvlink: 300e9, network: 25e9 };
pub const H100: Device = Device { name: "H100-SXM", peak: 989e12, gemm_efficiency: 0.60, nvlink: 450e9, network: 50e9 };

#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub params: f64,
    pub layers: f64,
    pub hidden: f64,
    pub seq: f64,
    /// Tokens per optimizer step over all GPUs.
    pub tokens: f64,
    pub recompute: bool,
    pub vocab: f64,
    /// Fraction of FSDP traffic hidden behind compute.
    pub overlap: f64,
}

/// OPT-175B as trained: 96 layers, 12288 wide, 2048 tokens, 2M-token batches, checkpointing.
pub const OPT_175B: Workload = Workload {
    params: 175e9,
    layers: 96.0,
    hidden: 12288.0,
    seq: 2048.0,
    tokens: 2.0 * 1024.0 * 1024.0,
    recompute: true,
    vocab: 50272.0,
    overlap: 0.8,
};

#[derive(Clone, Copy, Debug)]
pub struct Estimate {
    pub step_s: f64,
    pub compute_s: f64,
    pub tp_s: f64,
    pub fsdp_s: f64,
    /// Achieved model TFLOP/s per GPU.
    pub tflops: f64,
    pub mfu: f64,
    /// Model state per GPU (master weights, moments, gradients, gathered slice), GB.
    pub state_gb: f64,
}

/// FSDP's parameter handling: `Zero3` gathers each layer for its forward and again for its
/// backward; `Zero2` keeps the slice gathered between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsdp {
    Zero3,
    Zero2,
}

pub fn estimate(w: &Workload, d: &Device, gpus: usize, tp: usize) -> Estimate {
    estimate_with(w, d, gpus, tp, Fsdp::Zero3)
}

pub fn estimate_with(w: &Workload, d: &Device, gpus: usize, tp: usize, mode: Fsdp) -> Estimate {
    let n = gpus as f64;
    let tpf = tp as f64;
    let fsdp = n / tpf;
    let tok_gpu = w.tokens / n;
    let attn = 12.0 * w.layers * w.seq * w.hidden * tok_gpu;
    let model_flops = 6.0 * w.params * tok_gpu + attn;
    let rc = if w.recompute { 1.0 } else { 0.0 };
    let exec_flops = model_flops + rc * (2.0 * w.params * tok_gpu + attn / 3.0);
    let compute_s = exec_flops / (d.peak * d.gemm_efficiency);
    // A tensor-parallel group processes tok_gpu·tp tokens together, each rank all-reducing
    // activations of that many tokens.
    let act_bytes = 2.0 * w.hidden * tok_gpu * tpf;
    let tp_s = if tp > 1 { w.layers * (4.0 + 2.0 * rc) * 2.0 * (tpf - 1.0) / tpf * act_bytes / d.nvlink } else { 0.0 };
    let shard_bytes = 2.0 * w.params / tpf;
    let passes = if mode == Fsdp::Zero3 { 3.0 } else { 2.0 };
    let fsdp_raw = if fsdp > 1.0 { passes * (fsdp - 1.0) / fsdp * shard_bytes / d.network } else { 0.0 };
    // At most `overlap` of the traffic hides, and never more than the compute it hides behind.
    let fsdp_s = (fsdp_raw - w.overlap * compute_s).max((1.0 - w.overlap) * fsdp_raw);
    let step_s = compute_s + tp_s + fsdp_s;
    let tflops = model_flops / step_s / 1e12;
    let state_gb = if fsdp <= 1.0 {
        (16.0 * w.params / n + 6.0 * w.params / tpf) / 1e9
    } else {
        let working = 6.0 * (w.vocab * w.hidden + w.params / w.layers) / tpf;
        let gathered = if mode == Fsdp::Zero2 { 2.0 * w.params / tpf } else { 0.0 };
        (16.0 * w.params / n + working + gathered) / 1e9
    };
    Estimate { step_s, compute_s, tp_s, fsdp_s, tflops, mfu: tflops * 1e12 / d.peak, state_gb }
}

/// The table `opt-rs dist model` prints.
pub fn table() -> String {
    let mut s = String::from(
        "device     gpus   tp  fsdp  mode    step(s)  compute   tp-comm  fsdp-comm  TFLOP/s/GPU   MFU  state GB/GPU\n",
    );
    for (d, gpus) in [(A100, 1024usize), (H100, 1024)] {
        for tp in [1usize, 2, 4, 8] {
            for (mode, name) in [(Fsdp::Zero3, "zero3"), (Fsdp::Zero2, "zero2")] {
                let e = estimate_with(&OPT_175B, &d, gpus, tp, mode);
                s.push_str(&format!(
                    "{:<10} {:>5} {:>4} {:>5}  {:<5} {:>9.1} {:>8.1} {:>9.1} {:>10.1} {:>12.0} {:>5.0}% {:>13.1}\n",
                    d.name,
                    gpus,
                    tp,
                    gpus / tp,
                    name,
                    e.step_s,
                    e.compute_s,
                    e.tp_s,
                    e.fsdp_s,
                    e.tflops,
                    e.mfu * 100.0,
                    e.state_gb
                ));
            }
        }
    }
    s.push_str("OPT-175B reported 147 TFLOP/s/GPU on 992 A100-80G (tp = 8, FSDP over the rest, parameters kept\n");
    s.push_str("gathered between forward and backward, gradients reduce-scattered layer by layer). State: master\n");
    s.push_str("weights, moments and gradient shards, the bf16 embedding and layer opt-rs computes with and\n");
    s.push_str("their f32 gradient, and under zero2 the gathered bf16 slice; activations excluded.\n");
    s
}
