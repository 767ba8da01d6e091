//! Parameter layout: every parameter (and, with the same layout, every gradient and optimizer
//! moment) lives in one buffer carved into named views, llm.c style. "Zero all grads", "clip",
//! "AdamW over everything" and "shard across ranks" are then loops over one buffer.
//!
//! Names are HF's (without the `model.` prefix of `OPTForCausalLM`), so a key in a safetensors
//! file points straight at a parameter.

use crate::config::OptConfig;

/// One parameter: its HF name, shape and element offset in the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    /// Matrices (weights of linear layers and embeddings) are decayed by default; biases and
    /// norms may be excluded by the optimizer.
    pub is_matrix: bool,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Offsets of the parameters of one decoder layer (`None` where the config has no such tensor).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerIdx {
    pub q_w: usize,
    pub q_b: Option<usize>,
    pub k_w: usize,
    pub k_b: Option<usize>,
    pub v_w: usize,
    pub v_b: Option<usize>,
    pub o_w: usize,
    pub o_b: Option<usize>,
    pub ln1_w: Option<usize>,
    pub ln1_b: Option<usize>,
    pub fc1_w: usize,
    pub fc1_b: Option<usize>,
    pub fc2_w: usize,
    pub fc2_b: Option<usize>,
    pub ln2_w: Option<usize>,
    pub ln2_b: Option<usize>,
}

/// The layout of all parameters for a config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    pub specs: Vec<ParamSpec>,
    /// `decoder.embed_tokens.weight` `[V, Dp]`.
    pub wte: usize,
    /// `decoder.embed_positions.weight` `[P + 2, C]`.
    pub wpe: usize,
    /// `decoder.project_in.weight` `[C, Dp]` (350M).
    pub project_in: Option<usize>,
    /// `decoder.project_out.weight` `[Dp, C]` (350M).
    pub project_out: Option<usize>,
    pub final_ln_w: Option<usize>,
    pub final_ln_b: Option<usize>,
    /// `lm_head.weight` `[V, Dp]`, or `None` when tied to `wte`.
    pub lm_head: Option<usize>,
    pub layers: Vec<LayerIdx>,
    /// Tensor-parallel degree this layout is a shard for (1 = the whole model). A shard keeps
    /// HF names but holds `1/tp` of the heads, FFN columns and (padded) vocabulary rows; see
    /// [`ParamLayout::sharded`].
    pub tp: usize,
    /// Width of this shard's q/k/v projections (`hidden_size / tp`).
    pub attn_dim: usize,
    /// This shard's FFN width (`ffn_dim / tp`).
    pub ffn_dim: usize,
    /// This shard's vocabulary rows (`ceil(vocab_size / tp)`; the last shard may hold padding
    /// rows past `vocab_size`, which are kept at zero and masked out of the softmax).
    pub vocab: usize,
    /// Matrices held outside the flat buffer (the int8 weights of a quantized model, see
    /// [`ParamLayout::without`]). Their `offset` is a key at or past [`ParamLayout::total`],
    /// which no view of the buffer can reach. Empty for an ordinary model.
    pub external: Vec<ParamSpec>,
    /// `[start, end)` of each decoder layer's parameters (contiguous, in layer order). Empty for
    /// a layout with external parameters.
    layer_ranges: Vec<(usize, usize)>,
    /// A streamed layout ([`ParamLayout::streamed`]): `[start, end)` of the one layer slot that
    /// every layer's indices point into. `None` for an ordinary layout.
    pub slot: Option<(usize, usize)>,
    total: usize,
}

impl ParamLayout {
    pub fn new(cfg: &OptConfig) -> Self {
        Self::sharded(cfg, 1)
    }

    /// The layout of one tensor-parallel shard (Megatron / metaseq `reshard_mp`): q/k/v and fc1
    /// (and their biases), `embed_tokens` and `lm_head` keep `1/tp` of their rows; out_proj
    /// and fc2 weights keep `1/tp` of their columns; everything else is replicated. `tp = 1`
    /// is the whole model. The caller checks divisibility (heads and ffn by `tp`).
    pub fn sharded(cfg: &OptConfig, tp: usize) -> Self {
        let tp = tp.max(1);
        let (c, dp) = (cfg.hidden_size, cfg.word_embed_proj_dim);
        let (v, ca, f) = (cfg.vocab_size.div_ceil(tp), c / tp, cfg.ffn_dim / tp);
        let mut specs: Vec<ParamSpec> = Vec::new();
        let mut off = 0usize;
        let mut add = |name: String, shape: Vec<usize>| -> usize {
            let o = off;
            let is_matrix = shape.len() == 2;
            off += shape.iter().product::<usize>();
            specs.push(ParamSpec { name, shape, offset: o, is_matrix });
            o
        };
        let bias = cfg.enable_bias;
        let affine = cfg.layer_norm_elementwise_affine;
        let wte = add("decoder.embed_tokens.weight".into(), vec![v, dp]);
        let wpe = add("decoder.embed_positions.weight".into(), vec![cfg.position_rows(), c]);
        let (project_in, project_out) = if cfg.has_projection() {
            (
                Some(add("decoder.project_in.weight".into(), vec![c, dp])),
                Some(add("decoder.project_out.weight".into(), vec![dp, c])),
            )
        } else {
            (None, None)
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("decoder.layers.{i}.");
            let mut lin = |name: &str, out: usize, inp: usize| -> (usize, Option<usize>) {
                let w = add(format!("{p}{name}.weight"), vec![out, inp]);
                let b = bias.then(|| add(format!("{p}{name}.bias"), vec![out]));
                (w, b)
            };
            let (k_w, k_b) = lin("self_attn.k_proj", ca, c);
            let (v_w, v_b) = lin("self_attn.v_proj", ca, c);
            let (q_w, q_b) = lin("self_attn.q_proj", ca, c);
            let (o_w, o_b) = lin("self_attn.out_proj", c, ca);
            let ln1_w = affine.then(|| add(format!("{p}self_attn_layer_norm.weight"), vec![c]));
            let ln1_b = affine.then(|| add(format!("{p}self_attn_layer_norm.bias"), vec![c]));
            let mut lin = |name: &str, out: usize, inp: usize| -> (usize, Option<usize>) {
                let w = add(format!("{p}{name}.weight"), vec![out, inp]);
                let b = bias.then(|| add(format!("{p}{name}.bias"), vec![out]));
                (w, b)
            };
            let (fc1_w, fc1_b) = lin("fc1", f, c);
            let (fc2_w, fc2_b) = lin("fc2", c, f);
            let ln2_w = affine.then(|| add(format!("{p}final_layer_norm.weight"), vec![c]));
            let ln2_b = affine.then(|| add(format!("{p}final_layer_norm.bias"), vec![c]));
            layers.push(LayerIdx {
                q_w,
                q_b,
                k_w,
                k_b,
                v_w,
                v_b,
                o_w,
                o_b,
                ln1_w,
                ln1_b,
                fc1_w,
                fc1_b,
                fc2_w,
                fc2_b,
                ln2_w,
                ln2_b,
            });
        }
        let (final_ln_w, final_ln_b) = if cfg.has_final_layer_norm() && affine {
            (
                Some(add("decoder.final_layer_norm.weight".into(), vec![c])),
                Some(add("decoder.final_layer_norm.bias".into(), vec![c])),
            )
        } else {
            (None, None)
        };
        let lm_head = (!cfg.tie_word_embeddings).then(|| add("lm_head.weight".into(), vec![v, dp]));
        // Each layer's tensors were added one after another.
        let mut layer_ranges = vec![(usize::MAX, 0usize); cfg.num_hidden_layers];
        for s in &specs {
            let li = s.name.strip_prefix("decoder.layers.").and_then(|r| r.split('.').next()?.parse::<usize>().ok());
            if let Some(r) = li.and_then(|li| layer_ranges.get_mut(li)) {
                *r = (r.0.min(s.offset), r.1.max(s.offset + s.numel()));
            }
        }
        ParamLayout {
            specs,
            wte,
            wpe,
            project_in,
            project_out,
            final_ln_w,
            final_ln_b,
            lm_head,
            layers,
            tp,
            attn_dim: ca,
            ffn_dim: f,
            vocab: v,
            external: Vec::new(),
            layer_ranges,
            slot: None,
            total: off,
        }
    }

    /// Total number of parameter elements.
    pub fn total(&self) -> usize {
        self.total
    }

    pub fn find(&self, name: &str) -> Option<&ParamSpec> {
        self.specs.iter().find(|s| s.name == name)
    }

    /// This layout with the parameters `moved` selects taken out of the flat buffer: the others
    /// are repacked in order, and each moved parameter gets the key `total() + old offset`
    /// (past the new buffer, distinct per parameter) in every index field and in
    /// [`ParamLayout::external`]. For a layout without external parameters.
    pub fn without(&self, moved: impl Fn(&ParamSpec) -> bool) -> ParamLayout {
        let kept: usize = self.specs.iter().filter(|s| !moved(s)).map(ParamSpec::numel).sum();
        let mut map = std::collections::HashMap::with_capacity(self.specs.len());
        let (mut specs, mut external) = (Vec::new(), Vec::new());
        let mut off = 0;
        for s in &self.specs {
            let new = if moved(s) {
                external.push(ParamSpec { offset: kept + s.offset, ..s.clone() });
                kept + s.offset
            } else {
                specs.push(ParamSpec { offset: off, ..s.clone() });
                off += s.numel();
                off - s.numel()
            };
            map.insert(s.offset, new);
        }
        // Every index field holds the offset of some spec.
        let m = |o: usize| map[&o];
        let mo = |o: Option<usize>| o.map(m);
        let layers = self
            .layers
            .iter()
            .map(|l| LayerIdx {
                q_w: m(l.q_w),
                q_b: mo(l.q_b),
                k_w: m(l.k_w),
                k_b: mo(l.k_b),
                v_w: m(l.v_w),
                v_b: mo(l.v_b),
                o_w: m(l.o_w),
                o_b: mo(l.o_b),
                ln1_w: mo(l.ln1_w),
                ln1_b: mo(l.ln1_b),
                fc1_w: m(l.fc1_w),
                fc1_b: mo(l.fc1_b),
                fc2_w: m(l.fc2_w),
                fc2_b: mo(l.fc2_b),
                ln2_w: mo(l.ln2_w),
                ln2_b: mo(l.ln2_b),
            })
            .collect();
        ParamLayout {
            specs,
            wte: m(self.wte),
            wpe: m(self.wpe),
            project_in: mo(self.project_in),
            project_out: mo(self.project_out),
            final_ln_w: mo(self.final_ln_w),
            final_ln_b: mo(self.final_ln_b),
            lm_head: mo(self.lm_head),
            layers,
            tp: self.tp,
            attn_dim: self.attn_dim,
            ffn_dim: self.ffn_dim,
            vocab: self.vocab,
            external,
            layer_ranges: Vec::new(),
            slot: None,
            total: kept,
        }
    }

    /// `[start, end)` of decoder layer `li`'s parameters in the flat buffer (the slot, for a
    /// streamed layout). `None` past the last layer or for a layout with external parameters.
    pub fn layer_range(&self, li: usize) -> Option<(usize, usize)> {
        if li >= self.layers.len() {
            return None;
        }
        self.slot.or_else(|| self.layer_ranges.get(li).copied())
    }

    /// The layout of a model that holds its decoder layers one at a time (FSDP / ZeRO-3, see
    /// `opt-model`'s `LayerStream`): the other parameters (embeddings, projections, final norm,
    /// LM head) in their order, with room for one layer where the layers were. Every layer's
    /// indices point into that slot, so a layer's parameters must be written there before the
    /// model uses them. Returns a clone for a layout without layers or with external parameters.
    pub fn streamed(&self) -> ParamLayout {
        let (Some(&(a, first_end)), Some(&(_, b))) = (self.layer_ranges.first(), self.layer_ranges.last()) else {
            return self.clone();
        };
        if self.slot.is_some() {
            return self.clone();
        }
        let slot_len = first_end - a;
        // Every layer has the same shapes, so layer li's parameter at offset o sits at
        // o - start(li) in the slot.
        let map = |o: usize| -> usize {
            if o < a {
                o
            } else if o >= b {
                o - (b - a) + slot_len
            } else {
                let li = (o - a) / slot_len;
                o - self.layer_ranges[li].0 + a
            }
        };
        let specs = self
            .specs
            .iter()
            .filter(|s| s.offset < first_end || s.offset >= b)
            .map(|s| {
                let name = match s.name.strip_prefix("decoder.layers.0.") {
                    Some(rest) => format!("decoder.layers.slot.{rest}"),
                    None => s.name.clone(),
                };
                ParamSpec { name, offset: map(s.offset), ..s.clone() }
            })
            .collect();
        let mo = |o: Option<usize>| o.map(map);
        let slot_idx = {
            let l = &self.layers[0];
            LayerIdx {
                q_w: map(l.q_w),
                q_b: mo(l.q_b),
                k_w: map(l.k_w),
                k_b: mo(l.k_b),
                v_w: map(l.v_w),
                v_b: mo(l.v_b),
                o_w: map(l.o_w),
                o_b: mo(l.o_b),
                ln1_w: mo(l.ln1_w),
                ln1_b: mo(l.ln1_b),
                fc1_w: map(l.fc1_w),
                fc1_b: mo(l.fc1_b),
                fc2_w: map(l.fc2_w),
                fc2_b: mo(l.fc2_b),
                ln2_w: mo(l.ln2_w),
                ln2_b: mo(l.ln2_b),
            }
        };
        ParamLayout {
            specs,
            wte: map(self.wte),
            wpe: map(self.wpe),
            project_in: mo(self.project_in),
            project_out: mo(self.project_out),
            final_ln_w: mo(self.final_ln_w),
            final_ln_b: mo(self.final_ln_b),
            lm_head: mo(self.lm_head),
            layers: vec![slot_idx; self.layers.len()],
            tp: self.tp,
            attn_dim: self.attn_dim,
            ffn_dim: self.ffn_dim,
            vocab: self.vocab,
            external: Vec::new(),
            layer_ranges: Vec::new(),
            slot: Some((a, a + slot_len)),
            total: self.total - (b - a) + slot_len,
        }
    }

    /// The streamed buffer ([`ParamLayout::streamed`]) of host parameters `host` in this layout:
    /// the resident parameters copied, the layer slot zero.
    pub fn streamed_host(&self, host: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; self.streamed().total()];
        for (a, b, at) in self.resident_ranges() {
            out[at..at + b - a].copy_from_slice(&host[a..b]);
        }
        out
    }

    /// The parameters a streamed model keeps resident, as `(start, end, streamed_start)`: the
    /// ranges of this (ordinary) layout outside the layers and where each begins in
    /// [`ParamLayout::streamed`]'s buffer.
    pub fn resident_ranges(&self) -> Vec<(usize, usize, usize)> {
        let (Some(&(a, first_end)), Some(&(_, b))) = (self.layer_ranges.first(), self.layer_ranges.last()) else {
            return vec![(0, self.total, 0)];
        };
        let slot_len = first_end - a;
        [(0, a, 0), (b, self.total, a + slot_len)].into_iter().filter(|r| r.0 < r.1).collect()
    }

    /// Offset of the output (LM head) matrix: `lm_head` or the tied token embedding.
    pub fn lm_head_or_wte(&self) -> usize {
        self.lm_head.unwrap_or(self.wte)
    }
}
