//! The distributed checks, shared by the in-process tests (threads over the TCP engine) and
//! `examples/dist_check.rs` (processes under `mpirun`). Each function runs on one rank and
//! returns what that rank observed; callers compare against the fixture / single process.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use opt_dist::checkpoint;
use opt_dist::tcp::TcpComm;
use opt_dist::tensor_parallel::from_shard;
use opt_dist::{parallelize, Communicator, Mesh, ParallelPlan, ShardedTrainer, StepReport, TrainHp};
use opt_model::{KvCache, LogitsMode, OptModel};
use opt_tensor::{Backend, Buffer, CpuBackend, DType};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

pub struct Reference {
    pub json: serde_json::Value,
}

impl Reference {
    pub fn open() -> Reference {
        let text = std::fs::read_to_string(fixture("pre_ln").join("reference.json")).expect("reference.json");
        Reference { json: serde_json::from_str(&text).expect("json") }
    }
    pub fn f32s(&self, key: &str) -> Vec<f32> {
        self.json[key].as_array().expect(key).iter().map(|v| v.as_f64().expect("number") as f32).collect()
    }
    pub fn ids(&self, key: &str) -> Vec<u32> {
        self.json[key][0].as_array().expect(key).iter().map(|v| v.as_u64().expect("id") as u32).collect()
    }
    pub fn hp(&self) -> TrainHp {
        let a = &self.json["adamw"];
        let f = |k: &str| a[k].as_f64().expect(k) as f32;
        TrainHp {
            lr: f("lr"),
            beta1: a["betas"][0].as_f64().expect("beta1") as f32,
            beta2: a["betas"][1].as_f64().expect("beta2") as f32,
            eps: f("eps"),
            weight_decay: f("weight_decay"),
            clip: Some(self.json["adamw_clip_max_norm"].as_f64().expect("max norm") as f32),
        }
    }
}

pub fn load() -> OptModel<CpuBackend> {
    OptModel::from_folder(CpuBackend::new(), &fixture("pre_ln"), DType::F32).expect("pre_ln")
}

/// Run `f(rank's world communicator)` on `n` threads joined through the TCP rendezvous.
pub fn run_threads<T: Send + 'static>(
    n: usize,
    f: impl Fn(Arc<dyn Communicator>) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let f = Arc::new(f);
    let mut listener = Some(listener);
    let handles: Vec<_> = (0..n)
        .map(|r| {
            let (f, addr, l) = (f.clone(), addr.clone(), if r == 0 { listener.take() } else { None });
            std::thread::spawn(move || {
                let comm = TcpComm::rendezvous(r, n, &addr, l, Duration::from_secs(60)).expect("rendezvous");
                f(Arc::new(comm))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
}

/// Five AdamW steps (clipping on) of the parity fixture under `plan`. Every data rank trains on
/// its own copy of the fixture's row, so the global batch's mean equals the one-row loss.
pub fn train(world: Arc<dyn Communicator>, plan: ParallelPlan) -> Vec<StepReport> {
    train_with(world, plan, false)
}

/// [`train`]; with `zero3`, the trainer streams the layers (ZeRO-3) instead of keeping the slice.
pub fn train_with(world: Arc<dyn Communicator>, plan: ParallelPlan, zero3: bool) -> Vec<StepReport> {
    let r = Reference::open();
    let model = load();
    plan.validate(world.size(), &model.cfg).expect("plan");
    let mesh = Mesh::new(world, plan).expect("mesh");
    let model = parallelize(model, mesh.tp.clone()).expect("parallelize");
    let mut t = ShardedTrainer::new(model, mesh, r.hp()).expect("trainer");
    if zero3 {
        t = t.streaming_layers().expect("ZeRO-3");
        assert!(t.model.layout.slot.is_some());
    }
    let ids = r.ids("train_ids");
    (0..5).map(|_| t.train_step(&ids, 1).expect("step")).collect()
}

/// Greedy decoding of `steps` tokens from the fixture's prompt with a KV cache.
pub fn greedy(model: &OptModel<CpuBackend>, steps: usize) -> Vec<u32> {
    let prompt = Reference::open().ids("greedy_prompt");
    let mut cache = KvCache::new(&model.backend, &model.cfg, 1, prompt.len() + steps).expect("cache");
    let mut out = Vec::new();
    let mut next = prompt.clone();
    for _ in 0..steps {
        let logits = model.forward(&next, 1, None, Some(&mut cache), LogitsMode::Last).expect("forward");
        let row = model.backend.to_f32(logits.v()).expect("logits");
        let best = row.iter().enumerate().fold(0, |b, (i, &x)| if x > row[b] { i } else { b }) as u32;
        out.push(best);
        next = vec![best];
    }
    out
}

/// All-position logits of the fixture's prompt.
pub fn logits(model: &OptModel<CpuBackend>) -> Vec<f32> {
    let prompt = Reference::open().ids("greedy_prompt");
    let l = model.forward(&prompt, 1, None, None, LogitsMode::All).expect("forward");
    model.backend.to_f32(l.v()).expect("logits")
}

/// tp-sharded greedy ids and logits.
pub fn tp_generate(world: Arc<dyn Communicator>, steps: usize) -> (Vec<u32>, Vec<f32>) {
    let m = parallelize(load(), world).expect("parallelize");
    (greedy(&m, steps), logits(&m))
}

/// Write the tp shards to `dir`, reload them at the same tp, and return the reloaded logits.
pub fn checkpoint_roundtrip(world: Arc<dyn Communicator>, dir: &Path) -> Vec<f32> {
    let m = parallelize(load(), world.clone()).expect("parallelize");
    let local = m.params_f32().expect("params");
    checkpoint::save_shard(dir, &m.cfg, world.size(), world.rank(), &local).expect("save");
    world.barrier().expect("barrier");
    let (cfg, meta) = checkpoint::read_meta(dir).expect("meta");
    let shard = checkpoint::load_shard(dir, &cfg, meta.tp, world.rank()).expect("load");
    let m2 = from_shard(CpuBackend::new(), cfg, &shard, DType::F32, world).expect("from_shard");
    logits(&m2)
}

/// Load a tp = 1 checkpoint folder written by `checkpoint::reshard` as a plain model.
pub fn load_tp1(dir: &Path) -> OptModel<CpuBackend> {
    let (cfg, meta) = checkpoint::read_meta(dir).expect("meta");
    assert_eq!(meta.tp, 1);
    let full = checkpoint::load_shard(dir, &cfg, 1, 0).expect("load");
    OptModel::from_params(CpuBackend::new(), cfg, &full, DType::F32).expect("model")
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
