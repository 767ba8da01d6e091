#!/usr/bin/env python3
"""Write metaseq-format checkpoints of the fixture models, for opt-metaseq's tests.

Run from the repository root (any cwd works, paths are resolved from this file):

    .venv-ref/bin/python tools/reference/generate_metaseq.py

Reads fixtures/pre_ln and fixtures/post_ln_proj (written by generate.py) with HF transformers and
writes, with torch.save, the layouts the OPT release shipped in (see fixtures/metaseq/README.md):

  singleton/restored.pt                 consolidated singleton, separate q/k/v   (pre_ln)
  fused/consolidated.pt                 singleton with fused qkv_proj (K, V, Q)  (post_ln_proj)
  mp2_fused/reshard-model_part-{0,1}.pt 2-way tensor parallel, fused qkv per part (pre_ln)
  mp4/reshard-model_part-{0..3}.pt      4-way tensor parallel, separate q/k/v    (post_ln_proj)
  fsdp/checkpoint_last-model_part-{0,1}-shard{0,1,2}.pt
                                        2-way tensor parallel x 3 FSDP flat-parameter shards with
                                        shard_metadata, as fairscale wrote them   (pre_ln)
  errors/...                            tiny files for error paths
  malicious/...                         pickles whose __reduce__ would run a shell command

The expected logits are the HF fixtures' own (fixtures/<model>/reference.safetensors `logits`):
every file holds the same float32 weights. Before writing, the script rebuilds each HF state dict
from the metaseq files with an independent Python implementation of metaseq's reshard_mp,
fairscale's consolidate_shard_weights and HF's convert_opt_original_pytorch_checkpoint_to_pytorch,
loads it into OPTForCausalLM and checks the logits are bitwise the fixture's.

The split/flatten rules follow metaseq and fairscale:
  * tensor parallel (metaseq/scripts/reshard_mp.py): embed_tokens, fc1 and q/k/v (weights and
    biases) are split along dim 0; fc2 and out_proj weights along dim 1; positions, layer norms,
    fc2/out_proj biases, project_in/out_dim and `version` are replicated. A fused qkv_proj of one
    part is [K_p; V_p; Q_p], so the consolidated one is [K; V; Q].
  * FSDP (fairscale FullyShardedDataParallel + FlattenParamsWrapper): each wrapped module (the
    root, and every decoder layer) flattens its own parameters, in module order, into one
    `flat_param_0`, which `torch.chunk` splits over the world; short chunks are zero-padded to
    the first chunk's size. `shard_metadata` = {"param_metadata": [{"fsdp_path", "params":
    {"flat_param_0": {"names", "shapes", "numels", "padding"}}, "no_broadcast_optim_state",
    "shared_param_info"}, ...], "buffer_names": [...]}, `padding` being this rank's.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import OPTForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"
OUT = FIXTURES / "metaseq"

# The command the malicious pickles would run if a loader executed them. Tests check that the
# marker file never appears.
PWNED_MARKER = "/tmp/opt-rs-metaseq-pwned"
FSDP_WORLD = 3
SIZE_BUDGET = 3_000_000


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------
# Non-tensor objects metaseq keeps beside the weights
# ------------------------------------------------------------------------------------------
class DictConfigLike:
    """Stands in for omegaconf.DictConfig: a class the loader has never heard of. It pickles as a
    global (`__main__.DictConfigLike`) plus a BUILD state, like the real thing."""

    def __init__(self, **kw):
        self.__dict__["_content"] = dict(kw)


class Evil:
    """A pickle that runs a shell command on load, as `torch.load(weights_only=False)` would."""

    def __reduce__(self):
        return (os.system, (f"touch {PWNED_MARKER}",))


def metaseq_cfg(hf_cfg, mp: int):
    model = argparse.Namespace(
        _name="transformer_lm_megatron",
        arch="transformer_lm_megatron",
        decoder_layers=hf_cfg.num_hidden_layers,
        decoder_embed_dim=hf_cfg.hidden_size,
        decoder_ffn_embed_dim=hf_cfg.ffn_dim,
        decoder_attention_heads=hf_cfg.num_attention_heads,
        decoder_normalize_before=hf_cfg.do_layer_norm_before,
        share_decoder_input_output_embed=True,
        model_parallel_size=mp,
    )
    return {
        "_name": None,
        "common": DictConfigLike(fp16=True, seed=1),
        "model": model,
        "distributed_training": DictConfigLike(model_parallel_size=mp, use_sharded_state=True),
        "task": DictConfigLike(_name="streaming_language_modeling"),
    }


def envelope(model_sd, hf_cfg, mp: int, **extra):
    """The dict metaseq's checkpoint_utils saves: weights under "model" plus training state."""
    d = {
        "model": model_sd,
        "cfg": metaseq_cfg(hf_cfg, mp),
        "args": None,
        "optimizer_history": [
            {
                "criterion_name": "VocabParallelCrossEntropyCriterion",
                "optimizer_name": "MemoryEfficientFP16Optimizer",
                "lr_scheduler_state": {"best": None},
                "num_updates": 0,
            }
        ],
        "extra_state": {"epoch": 1, "train_iterator": {"epoch": 1, "iterations_in_epoch": 0}},
    }
    d.update(extra)
    return d


# ------------------------------------------------------------------------------------------
# HF -> metaseq
# ------------------------------------------------------------------------------------------
def load_fixture(name: str) -> OPTForCausalLM:
    m = OPTForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


def hf_to_metaseq(model: OPTForCausalLM, fused: bool) -> "OrderedDict[str, torch.Tensor]":
    """A consolidated metaseq state dict (decoder.* keys) with the model's weights."""
    hf = {k[len("model.") :]: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("model.")}
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in hf.items():
        k = re.sub(r"^decoder\.final_layer_norm\.", "decoder.layer_norm.", k)
        k = re.sub(r"^decoder\.project_(in|out)\.", r"decoder.project_\1_dim.", k)
        sd[k] = v
    if fused:
        for i in range(model.config.num_hidden_layers):
            p = f"decoder.layers.{i}.self_attn."
            for leaf in ("weight", "bias"):
                k, v, q = (sd.pop(f"{p}{n}_proj.{leaf}") for n in "kvq")
                sd[f"{p}qkv_proj.{leaf}"] = torch.cat([k, v, q], dim=0)
    # Tied: metaseq's output projection is the embedding matrix itself (one storage).
    sd["decoder.output_projection.weight"] = sd["decoder.embed_tokens.weight"]
    sd["decoder.version"] = torch.tensor([3.0])
    return sd


def mp_split(full: "OrderedDict[str, torch.Tensor]", parts: int) -> list:
    """Inverse of reshard_mp: the state dicts of `parts` tensor-parallel ranks."""
    out = [OrderedDict() for _ in range(parts)]
    for k, v in full.items():
        if k == "decoder.output_projection.weight":
            continue  # re-tied to each part's embedding shard below
        if "qkv_proj" in k:
            d = v.shape[0] // 3
            k_, v_, q_ = v.split(d)
            for p, (a, b, c) in enumerate(zip(k_.chunk(parts), v_.chunk(parts), q_.chunk(parts))):
                out[p][k] = torch.cat([a, b, c]).clone()
        elif re.search(r"embed_tokens|fc1|(k|q|v)_proj", k):
            for p, c in enumerate(v.chunk(parts, dim=0)):
                out[p][k] = c.clone()
        elif re.search(r"(fc2|out_proj)\.weight", k):
            for p, c in enumerate(v.chunk(parts, dim=1)):
                out[p][k] = c.clone()
        else:
            for p in range(parts):
                out[p][k] = v.clone()
    # metaseq's tensor-parallel decoder projects with its embedding shard directly, so the parts
    # carry no output_projection (fsdp_shard adds one back as a shared parameter).
    return out


def fsdp_shard(part_sd: "OrderedDict[str, torch.Tensor]", world: int):
    """FSDP flat-parameter shards of one tensor-parallel part: (model dicts, shard_metadata) per rank.

    As metaseq wraps OPT: every decoder layer is its own FSDP instance (fsdp_path
    "decoder.layers.N", parameter names relative to it), the root instance (fsdp_path "") holds
    the rest; `decoder.output_projection.weight` is the embedding shared with it, so it is not
    flattened but listed in `shared_param_info`; `decoder.version` is a buffer.
    """
    groups: "OrderedDict[str, list]" = OrderedDict()
    groups[""] = []
    for k in part_sd:
        m = re.match(r"^(decoder\.layers\.\d+)\.(.*)$", k)
        if m:
            groups.setdefault(m.group(1), []).append((m.group(2), k))
        elif k not in ("decoder.output_projection.weight", "decoder.version"):
            groups[""].append((k, k))
    # The root instance comes first in named_modules() order.
    order = [""] + [g for g in groups if g]
    models = [OrderedDict() for _ in range(world)]
    metas = [{"param_metadata": [], "buffer_names": ["decoder.version"]} for _ in range(world)]
    for path in order:
        names = [n for n, _ in groups[path]]
        tensors = [part_sd[k] for _, k in groups[path]]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        # fairscale chunk_and_pad: torch.chunk, then pad every chunk to the first one's size.
        chunks = list(flat.chunk(world))
        while len(chunks) < world:
            chunks.append(flat.new_zeros(0))
        size = chunks[0].numel()
        key = f"{path}.flat_param_0" if path else "flat_param_0"
        for r in range(world):
            pad = size - chunks[r].numel()
            models[r][key] = F.pad(chunks[r], [0, pad]).clone()
            metas[r]["param_metadata"].append(
                {
                    "fsdp_path": path,
                    "params": {
                        "flat_param_0": {
                            "names": names,
                            "shapes": [t.shape for t in tensors],
                            "numels": [t.numel() for t in tensors],
                            "padding": pad,
                        }
                    },
                    "no_broadcast_optim_state": False,
                    "shared_param_info": (
                        [("decoder.embed_tokens.weight", "decoder.output_projection.weight")]
                        if not path and "decoder.output_projection.weight" in part_sd
                        else []
                    ),
                }
            )
    for r in range(world):
        models[r]["decoder.version"] = part_sd["decoder.version"].clone()
    return models, metas


# ------------------------------------------------------------------------------------------
# metaseq -> HF, independently (to check the files before the Rust code ever sees them)
# ------------------------------------------------------------------------------------------
def py_consolidate_fsdp(models, metas):
    """fairscale FullyShardedDataParallel.consolidate_shard_weights."""
    out = OrderedDict()
    for idx, meta in enumerate(metas[0]["param_metadata"]):
        path = meta["fsdp_path"]
        for flat_name, info in meta["params"].items():
            key = f"{path}.{flat_name}" if path else flat_name
            shards = []
            for m, md in zip(models, metas):
                pad = md["param_metadata"][idx]["params"][flat_name]["padding"]
                t = m[key]
                shards.append(t[: t.numel() - pad] if pad else t)
            full = torch.cat(shards)
            assert sum(info["numels"]) == full.numel()
            for n, t, s in zip(info["names"], full.split(info["numels"]), info["shapes"]):
                out[f"{path}.{n}" if path else n] = t.view(s)
        for src, dst in meta["shared_param_info"]:
            out[dst] = out[src]
    for b in metas[0]["buffer_names"]:
        out[b] = models[0][b]
    return out


def py_merge_mp(parts):
    """metaseq reshard_mp with --num-output-parts 1."""
    out = OrderedDict()
    for k, v in parts[0].items():
        if "qkv" in k:
            d0 = v.shape[0]
            out[k] = torch.cat([p[k].view(3, d0 // 3, *v.shape[1:]) for p in parts], dim=1).flatten(0, 1)
        elif re.search(r"embed_tokens|ffn_layernorm|fc1|(k|q|v)_proj|output_projection", k):
            # (output_projection: a vocab shard tied to each part's embedding shard)
            out[k] = torch.cat([p[k] for p in parts], dim=0)
        elif re.search(r"(fc2|out_proj)\.weight", k):
            out[k] = torch.cat([p[k] for p in parts], dim=1)
        else:
            for p in parts[1:]:
                assert torch.equal(p[k], v), k
            out[k] = v
    return out


def py_hf_converter(sd):
    """transformers' convert_opt_original_pytorch_checkpoint_to_pytorch.load_checkpoint."""
    sd = OrderedDict(sd)
    for k in ("decoder.version", "decoder.output_projection.weight"):
        sd.pop(k, None)
    ren = {
        "decoder.project_in_dim.weight": "decoder.project_in.weight",
        "decoder.project_out_dim.weight": "decoder.project_out.weight",
        "decoder.layer_norm.weight": "decoder.final_layer_norm.weight",
        "decoder.layer_norm.bias": "decoder.final_layer_norm.bias",
    }
    for a, b in ren.items():
        if a in sd:
            sd[b] = sd.pop(a)
    for k in list(sd):
        if ".qkv_proj." in k:
            v = sd.pop(k)
            kk, vv, qq = torch.split(v, v.shape[0] // 3, dim=0)
            sd[k.replace(".qkv_proj.", ".q_proj.")] = qq
            sd[k.replace(".qkv_proj.", ".k_proj.")] = kk
            sd[k.replace(".qkv_proj.", ".v_proj.")] = vv
    return sd


def py_load_files(files):
    by_part = {}
    for f in files:
        m = re.search(r"model_part-(\d+)", f.name)
        s = re.search(r"shard(\d+)\.pt$", f.name)
        by_part.setdefault(int(m.group(1)) if m else 0, []).append((int(s.group(1)) if s else 0, f))
    parts = []
    for p in sorted(by_part):
        ckpts = [torch.load(f, map_location="cpu", weights_only=False) for _, f in sorted(by_part[p])]
        if "shard_metadata" in ckpts[0]:
            parts.append(py_consolidate_fsdp([c["model"] for c in ckpts], [c["shard_metadata"] for c in ckpts]))
        else:
            assert len(ckpts) == 1
            parts.append(ckpts[0]["model"])
    return py_hf_converter(py_merge_mp(parts))


def check_against_fixture(files, fixture: str):
    model = load_fixture(fixture)
    sd = py_load_files(files)
    with torch.no_grad():
        model.model.load_state_dict(sd, strict=True)  # raises on any missing or unexpected key
    ref = load_file(FIXTURES / fixture / "reference.safetensors")
    with torch.no_grad():
        got = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits.float()
    assert torch.equal(got, ref["logits"]), (files, (got - ref["logits"]).abs().max().item())
    log(f"  {files[0].parent.name}: {len(files)} file(s) rebuild {fixture}'s logits exactly")


# ------------------------------------------------------------------------------------------
def write(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def main() -> int:
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if OUT.exists():
        shutil.rmtree(OUT)
    pre, post = load_fixture("pre_ln"), load_fixture("post_ln_proj")

    # singleton, separate q/k/v (what restored.pt / HF's converter input looks like)
    f = write(OUT / "singleton/restored.pt", envelope(hf_to_metaseq(pre, fused=False), pre.config, 1))
    check_against_fixture([f], "pre_ln")

    # singleton with fused qkv_proj: the 350M-style model (project_in/out_dim, post-LN)
    f = write(OUT / "fused/consolidated.pt", envelope(hf_to_metaseq(post, fused=True), post.config, 1))
    check_against_fixture([f], "post_ln_proj")

    # tensor-parallel parts as reshard_mp writes them
    parts = mp_split(hf_to_metaseq(pre, fused=True), 2)
    files = [write(OUT / f"mp2_fused/reshard-model_part-{p}.pt", envelope(sd, pre.config, 2)) for p, sd in enumerate(parts)]
    check_against_fixture(files, "pre_ln")

    parts = mp_split(hf_to_metaseq(post, fused=False), 4)
    files = [write(OUT / f"mp4/reshard-model_part-{p}.pt", envelope(sd, post.config, 4)) for p, sd in enumerate(parts)]
    check_against_fixture(files, "post_ln_proj")

    # FSDP flat shards of a 2-way tensor-parallel model: the 992-file OPT-175B layout in small
    files = []
    for p, part_sd in enumerate(mp_split(hf_to_metaseq(pre, fused=False), 2)):
        # Training shares the output projection with the embedding shard: FSDP records it in
        # shared_param_info instead of flattening it twice.
        part_sd["decoder.output_projection.weight"] = part_sd["decoder.embed_tokens.weight"]
        models, metas = fsdp_shard(part_sd, FSDP_WORLD)
        for r in range(FSDP_WORLD):
            obj = envelope(
                models[r],
                pre.config,
                2,
                shard_metadata=metas[r],
                last_optimizer_state={"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
            )
            files.append(write(OUT / f"fsdp/checkpoint_last-model_part-{p}-shard{r}.pt", obj))
    assert any(m["params"]["flat_param_0"]["padding"] > 0 for m in metas[-1]["param_metadata"]), "want padding"
    check_against_fixture(files, "pre_ln")

    # ---- error paths (tiny tensors; the errors come before any check against a config)
    t = lambda *s: torch.arange(float(torch.Size(s).numel())).reshape(s)  # noqa: E731
    write(OUT / "errors/shape_mismatch/reshard-model_part-0.pt", {"model": {"decoder.layers.0.fc1.weight": t(4, 3)}})
    write(OUT / "errors/shape_mismatch/reshard-model_part-1.pt", {"model": {"decoder.layers.0.fc1.weight": t(4, 2)}})
    write(
        OUT / "errors/missing_key/reshard-model_part-0.pt",
        {"model": {"decoder.layers.0.fc1.weight": t(4, 3), "decoder.layers.0.fc1.bias": t(4)}},
    )
    write(OUT / "errors/missing_key/reshard-model_part-1.pt", {"model": {"decoder.layers.0.fc1.weight": t(4, 3)}})
    # reshard_mp's older flat output: flat parameters, shard_metadata popped
    write(OUT / "errors/flat_no_metadata/reshard-model_part-0.pt", {"model": {"flat_param_0": t(12)}})

    # ---- malicious pickles: each would run `touch PWNED_MARKER` under torch.load(weights_only=False)
    write(OUT / "malicious/evil_tensor.pt", {"model": {"decoder.embed_tokens.weight": Evil(), "decoder.version": t(1)}})
    write(OUT / "malicious/evil_top.pt", Evil())
    models, metas = fsdp_shard(OrderedDict([("decoder.embed_tokens.weight", t(4, 2)), ("decoder.version", t(1))]), 1)
    metas[0]["param_metadata"][0]["params"]["flat_param_0"]["numels"] = Evil()
    write(OUT / "malicious/evil_metadata-shard0.pt", {"model": models[0], "shard_metadata": metas[0]})
    for f in sorted((OUT / "malicious").glob("*.pt")):
        try:
            torch.load(f, weights_only=True)
        except Exception:  # noqa: BLE001 - torch's own safe loader must refuse them too
            pass
        else:
            raise AssertionError(f"torch.load(weights_only=True) accepted {f}")
    assert not Path(PWNED_MARKER).exists(), "the malicious payload ran"

    total = sum(p.stat().st_size for p in OUT.rglob("*.pt"))
    log(f"total size of fixtures/metaseq: {total} bytes")
    assert total < SIZE_BUDGET, total
    return 0


if __name__ == "__main__":
    sys.exit(main())
