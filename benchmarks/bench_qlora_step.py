"""A whole QLoRA training step on real model shapes with random weights: ours vs Unsloth vs HF+PEFT. GPU only.

    python -m benchmarks.bench_qlora_step [--shape llama8b-2k,llama8b-16k,llama3b-4k,qwen7b-4k,daemon-packed]
                                          [--configs ours_offload,ours,unsloth,hf_bf16] [--steps 8] [--warmup 3]
                                          [--out benchmarks/results/qlora_step.json]
    python -m benchmarks.bench_qlora_step --markdown benchmarks/results/qlora_step.json   # tables for the docs

Shapes (`--shape`, several comma-separated; each one runs every configuration in turn, in the same call):

| shape | model shape | tokens per step | LoRA rank |
| --- | --- | --- | --- |
| `llama8b-2k` (default) | Llama-3.1-8B | seq 2048 x batch 2 | 16 |
| `llama8b-16k` | Llama-3.1-8B | seq 16384 x batch 1 | 16 |
| `llama3b-4k` | Llama-3.2-3B (tied embeddings) | seq 4096 x batch 4 | 16 |
| `qwen7b-4k` | Qwen2.5-7B (biases on q/k/v) | seq 4096 x batch 1 | 32 |
| `daemon-packed` | Llama-3.1-8B | 8 rows of 512 (the trainer's batch_size 8 and max_seq_len 512), each packed from short chat examples of 24-192 tokens: position ids restart per example, prompt tokens (the first ~60% of each example) carry label -100 | 16 |

The models: Llama-3.1-8B (hidden 4096, 32 layers, 32 heads / 8 KV heads, intermediate 14336, vocab 128256, llama3
RoPE scaling), Llama-3.2-3B (hidden 3072, 28 layers, 24 / 8 heads, intermediate 8192, vocab 128256, LM head tied to
the embeddings, llama3 scaling factor 32), Qwen2.5-7B (hidden 3584, 28 layers, 28 / 4 heads, intermediate 18944,
vocab 152064, rope theta 1e6, q/k/v biases drawn N(0, 0.02)). Random weights (seeded, no download), built in bf16
directly on the GPU, then every decoder projection is quantised layer by layer into a bitsandbytes NF4 `Linear4bit`
(double quant, bf16 compute; biases kept in bf16). Embeddings, norms and the LM head stay bf16. LoRA alpha = r, no
dropout, on all seven projections (peft), AdamW lr 2e-4 on the LoRA weights, labels = inputs (causal LM loss) but
for the packed shape's prompt tokens, sdpa attention, gradient checkpointing. Configurations, each in its own
subprocess so that peak memory is its own:
- `hf`: the standard HF+PEFT QLoRA recipe as PEFT documents it: `peft.prepare_model_for_kbit_training(model)` with
  its defaults (it upcasts every non-4-bit parameter, i.e. embeddings, norms and LM head, to fp32 and turns on
  reentrant gradient checkpointing), then `get_peft_model`; loss from the model.
- `hf_bf16`: HF+PEFT all in bf16 (no fp32 upcast), `gradient_checkpointing_enable(use_reentrant=False)`: the same
  model and math as ours, so per-step losses must agree with it up to bf16 rounding (`loss vs hf_bf16`).
- `ours`: the same model, `sloth_kernels.patch.patch_model(model)` (its checkpointing instead of HF's);
  `ours_offload`: `patch_model(model, offload=True)` (checkpointed layer inputs on pinned host memory, the daemon's
  default). Both run with `PYTORCH_ALLOC_CONF=expandable_segments:True`, as the daemon's trainer does (and as
  Unsloth sets at import).
- `ours_graph`, `ours_offload_graph`: the same, each step through `sloth_kernels.graph_step.GraphedStep` (the
  whole step, optimizer included, captured once as a CUDA graph after `--warmup` - 1 eager steps and replayed;
  AdamW with `capturable=True`). The capture and its first replay fall in the warm-up steps.
- `liger`: `liger_kernel.transformers.apply_liger_kernel_to_<family>()` (RoPE, RMSNorm, SwiGLU, fused linear CE)
  before the model is built, then the hf_bf16 recipe. Skipped when liger_kernel is not importable.
- `unsloth`: `unsloth.FastLanguageModel` loading the same random weights (saved once per model shape as a bf16
  checkpoint by a helper subprocess) in 4-bit, `get_peft_model(..., use_gradient_checkpointing="unsloth")`. Skipped
  when not importable. The yardstick of the issue: `vs unsloth` columns.
Per configuration: tokens/s (tokens per step / median step time after the warm-up steps; a step is forward,
backward, optimizer step; for the packed shape every position counts, padding-free rows), peak allocated and peak
reserved GPU memory (`torch.cuda.max_memory_allocated` / `max_memory_reserved` over all steps, weights included), the
memory the model holds before the first step, and every step's loss (same seed and data everywhere, so step losses
must agree across configurations up to bf16 rounding). Ratios are against `unsloth`, `hf_bf16` and `hf` when they
ran. `--tiny` runs toy versions of the same shapes (same families, tied embeddings and biases; on CPU when there is
no GPU) to check the plumbing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sloth_kernels.allocator import with_expandable_segments

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = ("hf", "hf_bf16", "ours", "ours_offload", "ours_graph", "ours_offload_graph", "liger", "unsloth")
DEFAULT_CONFIGS = "ours_offload,ours,unsloth,hf_bf16"
PEERS = {"liger": "liger_kernel", "unsloth": "unsloth"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED, DATA_SEED, LR = 0, 1234, 2e-4


# ----------------------------------------------------------------------------------------------------------------
# Model shapes and step shapes
# ----------------------------------------------------------------------------------------------------------------
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
MODELS = {
    # name: (transformers config class, its shape, its tiny stand-in)
    "llama8b": ("LlamaConfig",
                dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_parameters=_LLAMA3_ROPE,
                     tie_word_embeddings=False),
                dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)),
    "llama3b": ("LlamaConfig",
                dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                     num_attention_heads=24, num_key_value_heads=8, rms_norm_eps=1e-5,
                     rope_parameters=dict(_LLAMA3_ROPE, factor=32.0), tie_word_embeddings=True),
                dict(vocab_size=1024, hidden_size=192, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=3, num_key_value_heads=1)),
    "qwen7b": ("Qwen2Config",
               dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False),
               dict(vocab_size=1024, hidden_size=256, intermediate_size=640, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)),
}


class Shape:
    """One benchmarked step: a model shape, rows x tokens, LoRA rank, and whether rows are packed short examples."""

    def __init__(self, model: str, seq: int, batch: int, rank: int = 16, packed: bool = False):
        self.model, self.seq, self.batch, self.rank, self.packed = model, seq, batch, rank, packed

    def describe(self) -> str:
        what = f"{self.model}, {'packed rows' if self.packed else 'seq'} {self.seq} x batch {self.batch}, r{self.rank}"
        return what


SHAPES = {
    "llama8b-2k": Shape("llama8b", 2048, 2),
    "llama8b-16k": Shape("llama8b", 16384, 1),
    "llama3b-4k": Shape("llama3b", 4096, 4),
    "qwen7b-4k": Shape("qwen7b", 4096, 1, rank=32),
    "daemon-packed": Shape("llama8b", 512, 8, packed=True),
}


def step_shape(args) -> Shape:
    """The worker's shape, with the command line's --seq / --batch / --rank overrides."""
    base = SHAPES[args.shape]
    seq, batch = (64, 2) if args.tiny else (base.seq, base.batch)
    return Shape(base.model, args.seq or seq, args.batch or batch, args.rank or base.rank, base.packed)


def model_config(args):
    import transformers

    shape = step_shape(args)
    cls_name, full, tiny = MODELS[shape.model]
    fields = dict(full)
    if args.tiny:
        fields.update(tiny)
    elif args.layers:
        fields["num_hidden_layers"] = args.layers
    if args.no_rope_scaling and fields["rope_parameters"].get("rope_type") == "llama3":
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": fields["rope_parameters"]["rope_theta"]}
    return getattr(transformers, cls_name)(**fields, max_position_embeddings=131072, bos_token_id=1, eos_token_id=2,
                                           pad_token_id=0, use_cache=False, attn_implementation="sdpa")


def device_of(args) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_bf16(config, device: str):
    """The random bf16 model, built where it will run (seeded: identical in every subprocess)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        with torch.no_grad():  # transformers initialises biases to zero: give the q/k/v biases something to do
            for layer in model.model.layers:
                for name in TARGETS[:4]:
                    bias = getattr(layer.self_attn, name).bias
                    if bias is not None:
                        bias.normal_(0.0, 0.02)
    return model


def quantize_decoder(model) -> None:
    """Replace every decoder projection by a bnb NF4 Linear4bit (double quant, bf16 compute), one layer at a time."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for owner, name in [(layer.self_attn, n) for n in TARGETS[:4]] + [(layer.mlp, n) for n in TARGETS[4:]]:
            dense = getattr(owner, name)
            q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4").to(dense.weight.device)
            if dense.bias is not None:
                q.bias = torch.nn.Parameter(dense.bias.data, requires_grad=False)
            setattr(owner, name, q)
            del dense
    model.is_loaded_in_4bit = True  # what peft reads to wrap Linear4bit in its bnb LoRA layer
    for p in model.parameters():
        p.requires_grad_(False)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none",
                                            target_modules=TARGETS, task_type="CAUSAL_LM"))


def packed_row(gen, seq: int, vocab: int):
    """(input_ids [seq], position_ids [seq], labels [seq]) of one row packed from short chat examples: lengths drawn
    from 24-192 tokens (the last one cut to fit), positions restarting at 0 per example, the first ~60% of each
    example (its prompt) labelled -100."""
    import torch

    ids = torch.randint(3, vocab, (seq,), generator=gen)
    positions = torch.empty(seq, dtype=torch.long)
    labels = ids.clone()
    start = 0
    while start < seq:
        n = min(int(torch.randint(24, 193, (1,), generator=gen)), seq - start)
        positions[start : start + n] = torch.arange(n)
        labels[start : start + (n * 3) // 5] = -100
        start += n
    return ids, positions, labels


def batches(config, args, device) -> list[dict]:
    """Two batches (steps alternate between them) of model keyword arguments."""
    import torch

    shape = step_shape(args)
    gen = torch.Generator().manual_seed(DATA_SEED)
    out = []
    for _ in range(2):
        if shape.packed:
            rows = [packed_row(gen, shape.seq, config.vocab_size) for _ in range(shape.batch)]
            ids, pos, labels = (torch.stack(t).to(device) for t in zip(*rows))
            out.append({"input_ids": ids, "position_ids": pos, "labels": labels})
        else:
            ids = torch.randint(3, config.vocab_size, (shape.batch, shape.seq), generator=gen).to(device)
            out.append({"input_ids": ids, "labels": ids})
    return out


# ----------------------------------------------------------------------------------------------------------------
# One configuration (runs in its own process)
# ----------------------------------------------------------------------------------------------------------------
def prepare(name: str, args):
    """(model ready to train, notes) for configuration `name`."""
    config = model_config(args)
    device = device_of(args)
    rank = step_shape(args).rank
    notes = {}
    if name == "unsloth":
        return prepare_unsloth(config, args, notes)
    if name == "liger":
        import liger_kernel.transformers as liger

        getattr(liger, f"apply_liger_kernel_to_{config.model_type}")(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
        notes["liger_kernel"] = getattr(importlib.import_module("liger_kernel"), "__version__", "?")
    model = build_bf16(config, device)
    quantize_decoder(model)
    if name == "hf":
        from peft import prepare_model_for_kbit_training

        model = lora(prepare_model_for_kbit_training(model), rank)
    elif name in ("hf_bf16", "liger"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = lora(model, rank)
    elif name.startswith("ours"):
        from sloth_kernels.patch import patch_model

        model = lora(model, rank)
        report = patch_model(model, force=True, offload=name.startswith("ours_offload"))
        notes["patch"] = str(report)
    else:
        raise ValueError(f"unknown configuration {name!r}")
    return model, notes


def prepare_unsloth(config, args, notes):
    import torch
    from unsloth import FastLanguageModel

    shape = step_shape(args)
    model, _ = FastLanguageModel.from_pretrained(model_name=str(checkpoint_dir(args)), max_seq_length=shape.seq,
                                                 dtype=torch.bfloat16, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=shape.rank, lora_alpha=shape.rank, lora_dropout=0.0,
                                             bias="none", target_modules=TARGETS,
                                             use_gradient_checkpointing="unsloth", random_state=SEED)
    notes["unsloth"] = importlib.import_module("unsloth").__version__
    return model, notes


def train(model, data, args, device) -> dict:
    import torch

    shape = step_shape(args)
    params = [p for p in model.parameters() if p.requires_grad]
    graphed = args.worker.endswith("_graph") and device == "cuda"
    opt = torch.optim.AdamW(params, lr=LR, capturable=graphed)
    model.train()
    if graphed:
        from sloth_kernels.graph_step import GraphedStep

        graph_step = GraphedStep(model, opt, warmup_steps=max(1, args.warmup - 1))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        sync()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        batch = data[step % len(data)]
        sync()
        t0 = time.perf_counter()
        if graphed:
            loss = graph_step(**batch)
        else:
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        print(f"step {step}: loss {losses[-1]:.5f} time {times[-1]:.3f}s", flush=True)
    if args.profile and device == "cuda" and not graphed:
        profile_step(model, opt, data[0], args)
    if args.cprofile and not graphed:
        cprofile_steps(model, opt, data[0], args, sync)
    step_s = statistics.median(times[args.warmup:])
    out = {"tokens_per_s": shape.batch * shape.seq / step_s, "step_s": step_s, "step_times": times,
           "losses": losses, "trainable_params": sum(p.numel() for p in params)}
    if graphed:
        out["graph_fallbacks"] = [str(reason) for reason in graph_step.fallbacks.values()]
        out["graphs"] = len(graph_step.graphs)
    if device == "cuda":
        out.update(peak_gb=torch.cuda.max_memory_allocated() / 2**30, held_gb=held / 2**30,
                   reserved_gb=torch.cuda.max_memory_reserved() / 2**30)
    return out


def profile_step(model, opt, batch, args) -> None:
    """One more step under torch.profiler; the 40 costliest GPU kernels go to `<profile>/<config>.txt`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70)
    args.profile.mkdir(parents=True, exist_ok=True)
    (args.profile / f"{args.shape}-{args.worker}.txt").write_text(table)


def cprofile_steps(model, opt, batch, args, sync) -> None:
    """Three more steps under cProfile (host-side Python cost; run with a short --seq to see it alone):
    the 60 costliest functions by own time and by cumulative time go to `<cprofile>/<config>.txt`."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(60)
    stats.sort_stats("cumulative").print_stats(60)
    args.cprofile.mkdir(parents=True, exist_ok=True)
    (args.cprofile / f"{args.shape}-{args.worker}.txt").write_text(text.getvalue())


def worker(name: str, args) -> dict:
    import torch

    device = device_of(args)
    t0 = time.perf_counter()
    model, notes = prepare(name, args)
    build_s = time.perf_counter() - t0
    result = train(model, batches(model_config(args), args, device), args, device)
    result.update(config=name, ok=True, build_s=build_s, notes=notes, device=device,
                  gpu=torch.cuda.get_device_name(0) if device == "cuda" else "cpu")
    return result


def checkpoint_dir(args) -> Path:
    """Where the random bf16 checkpoint of the shape's model lives (one per model shape, shared by its shapes)."""
    model = step_shape(args).model
    tag = "-tiny" if args.tiny else (f"-{args.layers}layers" if args.layers else "")
    tag += "-norope" if args.no_rope_scaling else ""
    return Path(args.checkpoint_root) / f"sloth-bench-{model}{tag}-random"


def make_checkpoint(args) -> None:
    """Save the random bf16 model (same seed as the in-memory builds) and a word-level tokenizer for Unsloth."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    config = model_config(args)
    path = checkpoint_dir(args)
    model = build_bf16(config, device_of(args))
    model.save_pretrained(path, max_shard_size="4GB")
    vocab = {f"<t{i}>": i for i in range(config.vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<t0>"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<t0>", bos_token="<t1>", eos_token="<t2>",
                            model_max_length=131072).save_pretrained(path)


# ----------------------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------------------
def run_subprocess(argv: list[str], log: Path, timeout: float, expandable: bool = False) -> tuple[int, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1", TOKENIZERS_PARALLELISM="false")
    if expandable:
        env = with_expandable_segments(env)
    cmd = [sys.executable, "-m", "benchmarks.bench_qlora_step", *argv]
    root = Path(__file__).resolve().parents[1]
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=root, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = -9
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
    return rc, tail


BASELINES = ("unsloth", "hf_bf16", "hf")


def add_ratios(results: list[dict]) -> None:
    """Speed, memory and loss against each baseline that ran: `unsloth` (the issue's yardstick), `hf_bf16` (the
    same math in plain HF+PEFT: losses must match it), `hf` (the standard recipe)."""
    for base_name in BASELINES:
        base = next((r for r in results if r["config"] == base_name and r.get("ok")), None)
        if base is None:
            continue
        for r in results:
            if not r.get("ok"):
                continue
            r[f"speedup_vs_{base_name}"] = r["tokens_per_s"] / base["tokens_per_s"]
            if "peak_gb" in r and "peak_gb" in base:
                r[f"peak_mem_vs_{base_name}"] = r["peak_gb"] / base["peak_gb"]
                r[f"reserved_vs_{base_name}"] = r["reserved_gb"] / base["reserved_gb"]
            n = min(len(r["losses"]), len(base["losses"]))
            r[f"max_loss_rel_diff_vs_{base_name}"] = max(
                abs(a - b) / abs(b) for a, b in zip(r["losses"][:n], base["losses"][:n]))


def print_table(shape_name: str, results: list[dict], args) -> None:
    from rich.console import Console
    from rich.table import Table

    gpu = next((r["gpu"] for r in results if r.get("ok")), "?")
    shape = step_shape(argparse.Namespace(**{**vars(args), "shape": shape_name}))
    table = Table(title=f"QLoRA step, {shape_name} ({shape.describe()}), on {gpu}")
    columns = ("config", "tokens/s", "vs unsloth", "vs hf_bf16", "peak alloc GiB", "vs unsloth ", "reserved GiB",
               "vs unsloth  ", "held GiB", "loss[0..3]", "max loss diff vs hf_bf16")
    for col in columns:
        table.add_column(col, justify="left" if col in ("config", "loss[0..3]") else "right")
    nan = float("nan")
    for r in results:
        if not r.get("ok"):
            table.add_row(r["config"], *["-"] * 8, r.get("error", "failed")[:60], "")
            continue
        table.add_row(
            r["config"], f"{r['tokens_per_s']:.0f}", f"{r.get('speedup_vs_unsloth', nan):.2f}x",
            f"{r.get('speedup_vs_hf_bf16', nan):.2f}x", f"{r.get('peak_gb', nan):.2f}",
            f"{r.get('peak_mem_vs_unsloth', nan):.0%}", f"{r.get('reserved_gb', nan):.2f}",
            f"{r.get('reserved_vs_unsloth', nan):.0%}", f"{r.get('held_gb', nan):.2f}",
            " ".join(f"{x:.4f}" for x in r["losses"][:4]), f"{r.get('max_loss_rel_diff_vs_hf_bf16', nan):.1e}",
        )
    Console(width=220).print(table)


def write(args, argv, runs: dict[str, list[dict]]) -> None:
    if not args.out:
        return
    for results in runs.values():
        add_ratios(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python -m benchmarks.bench_qlora_step", *(argv or sys.argv[1:])]),
            "layers": args.layers, "tiny": args.tiny, "rope_scaling": not args.no_rope_scaling, "lr": LR,
            "steps": args.steps, "warmup": args.warmup}
    shapes = []
    for name, results in runs.items():
        shape = step_shape(argparse.Namespace(**{**vars(args), "shape": name}))
        shapes.append({"shape": name, "model": shape.model, "seq": shape.seq, "batch": shape.batch,
                       "lora_rank": shape.rank, "packed": shape.packed, "results": results})
    args.out.write_text(json.dumps({"meta": meta, "shapes": shapes}, indent=1))


def markdown(path: Path) -> str:
    """The docs' tables from a results file: one row per shape and configuration."""
    data = json.loads(path.read_text())
    lines = ["| shape | configuration | tokens/s | vs Unsloth | peak allocated GiB | vs Unsloth | peak reserved GiB "
             "| vs Unsloth | max loss diff vs HF+PEFT bf16 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    def cell(r, key, fmt, suffix=""):
        return format(r[key], fmt) + suffix if key in r else "—"  # a baseline that did not run in this call

    for entry in data.get("shapes", []):
        for r in entry["results"]:
            if not r.get("ok"):
                lines.append(f"| {entry['shape']} | {r['config']} | failed: {r.get('error', '')[:80]!r} "
                             "| | | | | | |")
                continue
            lines.append(
                f"| {entry['shape']} | {r['config']} | {r['tokens_per_s']:,.0f} | "
                f"{cell(r, 'speedup_vs_unsloth', '.2f', 'x')} | {cell(r, 'peak_gb', '.2f')} | "
                f"{cell(r, 'peak_mem_vs_unsloth', '.0%')} | {cell(r, 'reserved_gb', '.2f')} | "
                f"{cell(r, 'reserved_vs_unsloth', '.0%')} | {cell(r, 'max_loss_rel_diff_vs_hf_bf16', '.1e')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama8b-2k", help=f"comma-separated, of: {', '.join(SHAPES)}")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq", type=int, help="override the shape's tokens per row")
    parser.add_argument("--batch", type=int, help="override the shape's rows per step")
    parser.add_argument("--rank", type=int, help="override the shape's LoRA rank")
    parser.add_argument("--layers", type=int, help="override the model's number of decoder layers")
    parser.add_argument("--no-rope-scaling", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="toy shapes, to test the plumbing (CPU is fine)")
    parser.add_argument("--timeout", type=float, default=420, help="seconds per configuration")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", type=Path, help="print the docs' markdown table of a results file and exit")
    parser.add_argument("--logdir", type=Path, help="per-configuration logs (default: a temp dir)")
    parser.add_argument("--checkpoint-root", default=tempfile.gettempdir(),
                        help="where the random bf16 checkpoints for Unsloth are saved (one per model shape)")
    parser.add_argument("--profile", type=Path, help="also profile one step per configuration into this folder")
    parser.add_argument("--cprofile", type=Path, help="also cProfile three steps per configuration into this folder")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.markdown:
        print(markdown(args.markdown))
        return 0
    shape_names = [s for s in args.shape.split(",") if s]
    unknown = [s for s in shape_names if s not in SHAPES] + [
        c for c in args.configs.split(",") if c and c not in CONFIGS]
    if unknown:
        parser.error(f"unknown shape or configuration: {', '.join(unknown)}")
    if args.worker == "make_checkpoint":
        make_checkpoint(args)
        return 0
    if args.worker == "unsloth":
        import unsloth  # noqa: F401 - Unsloth patches transformers at import: it must come first
    if args.worker:
        result = worker(args.worker, args)
        args.result.write_text(json.dumps(result))
        return 0

    common = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--checkpoint-root={args.checkpoint_root}"]
    common += [f"--{k}={getattr(args, k)}" for k in ("seq", "batch", "rank", "layers") if getattr(args, k)]
    common += ["--no-rope-scaling"] * args.no_rope_scaling + ["--tiny"] * args.tiny
    common += [f"--profile={args.profile}"] * bool(args.profile) + [f"--cprofile={args.cprofile}"] * bool(args.cprofile)
    logdir = args.logdir or Path(tempfile.mkdtemp(prefix="bench-qlora-"))
    logdir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {}
    for shape_name in shape_names:
        results = runs.setdefault(shape_name, [])
        shape_args = [f"--shape={shape_name}", *common]
        for name in [c for c in args.configs.split(",") if c]:
            module = PEERS.get(name)
            if module and importlib.util.find_spec(module) is None:
                results.append({"config": name, "ok": False, "error": f"{module} is not installed"})
                continue
            t0 = time.perf_counter()
            if name == "unsloth" and not (checkpoint_dir(argparse.Namespace(**{**vars(args), "shape": shape_name}))
                                          / "config.json").exists():
                rc, tail = run_subprocess(["--worker=make_checkpoint", *shape_args],
                                          logdir / f"{shape_name}-make_checkpoint.log", args.timeout)
                if rc != 0:
                    results.append({"config": name, "ok": False, "error": f"checkpoint: rc {rc}: {tail[-300:]}"})
                    continue
            result_file = logdir / f"{shape_name}-{name}.json"
            # Our recipe's allocator setting, as the daemon's trainer sets it (Unsloth sets the same at import).
            expandable = name.startswith("ours")
            rc, tail = run_subprocess([f"--worker={name}", f"--result={result_file}", *shape_args],
                                      logdir / f"{shape_name}-{name}.log", args.timeout, expandable)
            if rc == 0 and result_file.exists():
                results.append(json.loads(result_file.read_text()))
            else:
                results.append({"config": name, "ok": False, "error": f"rc {rc}: {tail[-1500:]}"})
                print(f"bench_qlora_step: {shape_name} {name} failed (rc {rc}):\n{tail}", flush=True)
            results[-1]["wall_s"] = time.perf_counter() - t0
            r = results[-1]
            if r.get("ok"):
                print(f"bench_qlora_step: {shape_name} {name}: {r['tokens_per_s']:.0f} tokens/s, peak "
                      f"{r.get('peak_gb', 0):.2f} GiB, reserved {r.get('reserved_gb', 0):.2f} GiB, "
                      f"losses {['%.4f' % x for x in r['losses'][:4]]}", flush=True)
            write(args, argv, runs)  # after every configuration: a run cut short keeps what it measured
        add_ratios(results)
        print_table(shape_name, results, args)
    write(args, argv, runs)
    return 0 if all(r.get("ok") or "not installed" in r.get("error", "")
                    for results in runs.values() for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
