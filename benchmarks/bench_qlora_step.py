"""A whole QLoRA training step on a Llama-3.1-8B-shaped model with random weights: HF+PEFT vs ours vs peers. GPU only.

    python -m benchmarks.bench_qlora_step [--configs hf,ours,ours_offload,liger,unsloth] [--steps 8] [--warmup 3]
                                          [--out benchmarks/results/qlora_step.json]

The model: Llama-3.1-8B's shape (hidden 4096, 32 layers, 32 heads / 8 KV heads, intermediate 14336, vocab 128256,
llama3 RoPE scaling unless --no-rope-scaling), random weights (seeded, no download), built in bf16 directly on the
GPU, then every decoder projection is quantised layer by layer into a bitsandbytes NF4 `Linear4bit` (double quant,
bf16 compute). Embeddings, norms and the LM head stay bf16. LoRA r=16, alpha 16, no dropout on all seven
projections (peft), AdamW lr 2e-4 on the LoRA weights, seq 2048, batch 2, labels = inputs (causal LM loss), sdpa
attention, gradient checkpointing. Configurations, each in its own subprocess so that peak memory is its own:
- `hf`: the standard HF+PEFT QLoRA recipe as PEFT documents it: `peft.prepare_model_for_kbit_training(model)` with
  its defaults (it upcasts every non-4-bit parameter, i.e. embeddings, norms and LM head, to fp32 and turns on
  reentrant gradient checkpointing), then `get_peft_model`; loss from the model. The baseline of the ratios.
- `hf_bf16`: a tuned HF+PEFT baseline, for reference: no fp32 upcast (everything bf16),
  `gradient_checkpointing_enable(use_reentrant=False)`. Ratios against it are reported too (`vs hf_bf16`).
- `ours`: the same model, `sloth_kernels.patch.patch_model(model)` (its checkpointing instead of HF's);
  `ours_offload`: `patch_model(model, offload=True)` (checkpointed layer inputs on pinned host memory). Both run
  with `PYTORCH_ALLOC_CONF=expandable_segments:True`, as the daemon's trainer does (and as Unsloth sets at import).
- `liger`: `liger_kernel.transformers.apply_liger_kernel_to_llama()` (RoPE, RMSNorm, SwiGLU, fused linear CE)
  before the model is built, then the HF recipe. Skipped when liger_kernel is not importable.
- `unsloth`: `unsloth.FastLanguageModel` loading the same random weights (saved once as a bf16 checkpoint by a
  helper subprocess) in 4-bit, `get_peft_model(..., use_gradient_checkpointing="unsloth")`. Skipped when not
  importable.
Per configuration: tokens/s (batch * seq / median step time after the warm-up steps; a step is forward, backward,
optimizer step), peak GPU memory (`torch.cuda.max_memory_allocated` over all steps, weights included), the memory
the model holds before the first step, and every step's loss (same seed and data everywhere, so step losses must
agree across configurations up to bf16 rounding). Ratios are against `hf` and `hf_bf16`. `--tiny` runs a toy shape (on CPU when
there is no GPU) to check the plumbing.
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

CONFIGS = ("hf", "hf_bf16", "ours", "ours_offload", "liger", "unsloth")
PEERS = {"liger": "liger_kernel", "unsloth": "unsloth"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED, DATA_SEED, LR, RANK = 0, 1234, 2e-4, 16


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------
def model_config(args):
    from transformers import LlamaConfig

    if args.tiny:
        shape = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    else:
        shape = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                     num_attention_heads=32, num_key_value_heads=8)
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if not args.no_rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return LlamaConfig(**shape, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_parameters=rope,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=False,
                       attn_implementation="sdpa")


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
            setattr(owner, name, q)
            del dense
    model.is_loaded_in_4bit = True  # what peft reads to wrap Linear4bit in its bnb LoRA layer
    for p in model.parameters():
        p.requires_grad_(False)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, bias="none",
                                            target_modules=TARGETS, task_type="CAUSAL_LM"))


def batches(config, args, device):
    import torch

    gen = torch.Generator().manual_seed(DATA_SEED)
    return [torch.randint(3, config.vocab_size, (args.batch, args.seq), generator=gen).to(device) for _ in range(2)]


# ----------------------------------------------------------------------------------------------------------------
# One configuration (runs in its own process)
# ----------------------------------------------------------------------------------------------------------------
def prepare(name: str, args):
    """(model ready to train, notes) for configuration `name`."""
    config = model_config(args)
    device = device_of(args)
    notes = {}
    if name == "unsloth":
        return prepare_unsloth(config, args, notes)
    if name == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
        notes["liger_kernel"] = importlib.import_module("liger_kernel").__version__ \
            if hasattr(importlib.import_module("liger_kernel"), "__version__") else "?"
    model = build_bf16(config, device)
    quantize_decoder(model)
    if name == "hf":
        from peft import prepare_model_for_kbit_training

        model = lora(prepare_model_for_kbit_training(model))
    elif name in ("hf_bf16", "liger"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = lora(model)
    elif name in ("ours", "ours_offload"):
        from sloth_kernels.patch import patch_model

        model = lora(model)
        report = patch_model(model, force=True, offload=name == "ours_offload")
        notes["patch"] = str(report)
    else:
        raise ValueError(f"unknown configuration {name!r}")
    return model, notes


def prepare_unsloth(config, args, notes):
    import torch
    from unsloth import FastLanguageModel

    path = Path(args.checkpoint)
    model, _ = FastLanguageModel.from_pretrained(model_name=str(path), max_seq_length=args.seq,
                                                 dtype=torch.bfloat16, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=RANK, lora_alpha=RANK, lora_dropout=0.0, bias="none",
                                             target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                             random_state=SEED)
    notes["unsloth"] = importlib.import_module("unsloth").__version__
    return model, notes


def train(model, data, args, device) -> dict:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    model.train()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        sync()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        ids = data[step % len(data)]
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        print(f"step {step}: loss {losses[-1]:.5f} time {times[-1]:.3f}s", flush=True)
    if args.profile and device == "cuda":
        profile_step(model, opt, data[0], args)
    if args.cprofile:
        cprofile_steps(model, opt, data[0], args, sync)
    step_s = statistics.median(times[args.warmup:])
    out = {"tokens_per_s": args.batch * args.seq / step_s, "step_s": step_s, "step_times": times,
           "losses": losses, "trainable_params": sum(p.numel() for p in params)}
    if device == "cuda":
        out.update(peak_gb=torch.cuda.max_memory_allocated() / 2**30, held_gb=held / 2**30,
                   reserved_gb=torch.cuda.max_memory_reserved() / 2**30)
    return out


def profile_step(model, opt, ids, args) -> None:
    """One more step under torch.profiler; the 40 costliest GPU kernels go to `<profile>/<config>.txt`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70)
    args.profile.mkdir(parents=True, exist_ok=True)
    (args.profile / f"{args.worker}.txt").write_text(table)


def cprofile_steps(model, opt, ids, args, sync) -> None:
    """Three more steps under cProfile (host-side Python cost; run with a short --seq to see it alone):
    the 60 costliest functions by own time and by cumulative time go to `<cprofile>/<config>.txt`."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(60)
    stats.sort_stats("cumulative").print_stats(60)
    args.cprofile.mkdir(parents=True, exist_ok=True)
    (args.cprofile / f"{args.worker}.txt").write_text(text.getvalue())


def worker(name: str, args) -> dict:
    import torch

    device = device_of(args)
    t0 = time.perf_counter()
    model, notes = prepare(name, args)
    build_s = time.perf_counter() - t0
    config = model.config if hasattr(model, "config") else model_config(args)
    result = train(model, batches(config, args, device), args, device)
    result.update(config=name, ok=True, build_s=build_s, notes=notes, device=device,
                  gpu=torch.cuda.get_device_name(0) if device == "cuda" else "cpu")
    return result


def make_checkpoint(args) -> None:
    """Save the random bf16 model (same seed as the in-memory builds) and a word-level tokenizer for Unsloth."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    config = model_config(args)
    path = Path(args.checkpoint)
    model = build_bf16(config, device_of(args))
    model.save_pretrained(path, max_shard_size="4GB")
    vocab = {f"<t{i}>": i for i in range(config.vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<t0>"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<t0>", bos_token="<t1>", eos_token="<t2>",
                            model_max_length=args.seq).save_pretrained(path)


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


def add_ratios(results: list[dict]) -> None:
    """Speed and memory ratios against each baseline that ran (`hf`: the standard recipe; `hf_bf16`: tuned)."""
    for base_name in ("hf", "hf_bf16"):
        base = next((r for r in results if r["config"] == base_name and r.get("ok")), None)
        if base is None:
            continue
        for r in results:
            if not r.get("ok"):
                continue
            r[f"speedup_vs_{base_name}"] = r["tokens_per_s"] / base["tokens_per_s"]
            if "peak_gb" in r:
                r[f"peak_mem_vs_{base_name}"] = r["peak_gb"] / base["peak_gb"]
            n = min(len(r["losses"]), len(base["losses"]))
            r[f"max_loss_rel_diff_vs_{base_name}"] = max(
                abs(a - b) / abs(b) for a, b in zip(r["losses"][:n], base["losses"][:n]))


def print_table(results: list[dict], args) -> None:
    from rich.console import Console
    from rich.table import Table

    gpu = next((r["gpu"] for r in results if r.get("ok")), "?")
    table = Table(title=f"QLoRA step, Llama-3.1-8B shape, seq {args.seq} x batch {args.batch}, on {gpu}")
    columns = ("config", "tokens/s", "speed vs hf", "vs hf_bf16", "peak GB", "mem vs hf", "vs hf_bf16 ",
               "held GB", "loss[0..3]", "max loss diff vs hf")
    for col in columns:
        table.add_column(col, justify="left" if col in ("config", "loss[0..3]") else "right")
    nan = float("nan")
    for r in results:
        if not r.get("ok"):
            table.add_row(r["config"], *["-"] * 7, r.get("error", "failed")[:60], "")
            continue
        table.add_row(
            r["config"], f"{r['tokens_per_s']:.0f}", f"{r.get('speedup_vs_hf', nan):.2f}x",
            f"{r.get('speedup_vs_hf_bf16', nan):.2f}x", f"{r.get('peak_gb', nan):.2f}",
            f"{r.get('peak_mem_vs_hf', nan):.0%}", f"{r.get('peak_mem_vs_hf_bf16', nan):.0%}",
            f"{r.get('held_gb', nan):.2f}", " ".join(f"{x:.4f}" for x in r["losses"][:4]),
            f"{r.get('max_loss_rel_diff_vs_hf', nan):.1e}",
        )
    Console(width=200).print(table)


def write(args, argv, results: list[dict]) -> None:
    if not args.out:
        return
    add_ratios(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python -m benchmarks.bench_qlora_step", *(argv or sys.argv[1:])]),
            "seq": args.seq, "batch": args.batch, "layers": args.layers, "tiny": args.tiny,
            "rope_scaling": not args.no_rope_scaling, "lora_rank": RANK, "lr": LR,
            "steps": args.steps, "warmup": args.warmup}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--no-rope-scaling", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="toy shapes, to test the plumbing (CPU is fine)")
    parser.add_argument("--timeout", type=float, default=420, help="seconds per configuration")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--logdir", type=Path, help="per-configuration logs (default: a temp dir)")
    parser.add_argument("--checkpoint", default=os.path.join(tempfile.gettempdir(), "sloth-bench-llama8b-random"))
    parser.add_argument("--profile", type=Path, help="also profile one step per configuration into this folder")
    parser.add_argument("--cprofile", type=Path, help="also cProfile three steps per configuration into this folder")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "make_checkpoint":
        make_checkpoint(args)
        return 0
    if args.worker == "unsloth":
        import unsloth  # noqa: F401 - Unsloth patches transformers at import: it must come first
    if args.worker:
        result = worker(args.worker, args)
        args.result.write_text(json.dumps(result))
        return 0

    common = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--seq={args.seq}", f"--batch={args.batch}",
              f"--layers={args.layers}", f"--checkpoint={args.checkpoint}"]
    common += ["--no-rope-scaling"] * args.no_rope_scaling + ["--tiny"] * args.tiny
    common += [f"--profile={args.profile}"] * bool(args.profile) + [f"--cprofile={args.cprofile}"] * bool(args.cprofile)
    logdir = args.logdir or Path(tempfile.mkdtemp(prefix="bench-qlora-"))
    logdir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in [c for c in args.configs.split(",") if c]:
        module = PEERS.get(name)
        if module and importlib.util.find_spec(module) is None:
            results.append({"config": name, "ok": False, "error": f"{module} is not installed"})
            continue
        t0 = time.perf_counter()
        if name == "unsloth" and not (Path(args.checkpoint) / "config.json").exists():
            rc, tail = run_subprocess(["--worker=make_checkpoint", *common], logdir / "make_checkpoint.log",
                                      args.timeout)
            if rc != 0:
                results.append({"config": name, "ok": False, "error": f"checkpoint: rc {rc}: {tail[-300:]}"})
                continue
        result_file = logdir / f"{name}.json"
        # Our recipe's allocator setting, as the daemon's trainer sets it (Unsloth sets the same at import).
        expandable = name.startswith("ours")
        rc, tail = run_subprocess([f"--worker={name}", f"--result={result_file}", *common], logdir / f"{name}.log",
                                  args.timeout, expandable)
        if rc == 0 and result_file.exists():
            results.append(json.loads(result_file.read_text()))
        else:
            results.append({"config": name, "ok": False, "error": f"rc {rc}: {tail[-1500:]}"})
            print(f"bench_qlora_step: {name} failed (rc {rc}):\n{tail}", flush=True)
        results[-1]["wall_s"] = time.perf_counter() - t0
        r = results[-1]
        if r.get("ok"):
            print(f"bench_qlora_step: {name}: {r['tokens_per_s']:.0f} tokens/s, peak {r.get('peak_gb', 0):.2f} GB, "
                  f"losses {['%.4f' % x for x in r['losses'][:4]]}", flush=True)
        write(args, argv, results)  # after every configuration: a run cut short keeps what it measured
    add_ratios(results)
    print_table(results, args)
    write(args, argv, results)
    return 0 if all(r.get("ok") or "not installed" in r.get("error", "") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
