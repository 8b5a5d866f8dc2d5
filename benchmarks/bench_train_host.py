"""Where an update's time goes on the host: the trainer's recipe (`trainer.recipe.train_on`) on a resident base, with
a cProfile of its step loop and gate scoring split into the torch work and the host's own work, for the previous
code (`--before`, a git ref) and the current one in the same run. CPU by default (issue 17, item 2).

    python -m benchmarks.bench_train_host [--shapes tiny,mid] [--new 48] [--replay 48] [--anchors 64] [--repeat 2]
                                          [--before REF] [--out benchmarks/results/train_host_cpu.json]

The job is an update as the daemon plans it (`planning.plan_update` shares, `trainer.plan.planned_steps`): `--new`
taught question/answer pairs, `--replay` earlier ones, `--anchors` longer general answers; mixed batches of
`train.batch_size` (8) with the `[mix]` shares; steps from the data (2 epochs over the new examples, at least
`--min-steps`); eval sets "new", "recall" and "anchor" (KL to the base on "anchor"), as the gate scores them; packing
on; `--step-tokens` tokens per optimizer step (0 = one batch a step, the CPU default; 4096 is the GPU's).

Shapes (random weights, seeded; sloth-tiny's byte-level tokenizer): `tiny` = sloth-tiny's shape (2 layers, hidden
128), `mid` = a CPU-sized Llama (hidden 512, 6 layers, intermediate 1408, 8/4 heads, ~20 M parameters), or the path
of a model folder. `--device cuda`: the job trains on the GPU on the NF4 base (kernels off), as an update there does.

Each configuration (`before`: `sloth_daemon` from git `--before`, extracted into the work folder; `after`: this tree)
runs in its own process on the same job, `--repeat` times on one loaded base (the warm trainer's case); per run:
the phases (attach, eval_before, train, eval_after, save) in seconds, per-step seconds, every step's loss, and from a
cProfile of the last run the seconds inside the model's forward and backward, the optimizer, and everything else in
the step loop (the host's own work per step: inputs, packing, progress lines, syncs). The table gives each
configuration's figures and the after/before ratios; losses must be equal (the change may not alter training).
Ratios only: absolute CPU seconds vary with the machine's load.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, "") and "--measure" not in sys.argv:  # a measuring child imports its tree's sloth_daemon
    sys.path.insert(0, str(ROOT))

BEFORE_REF = "47e6b20"  # main before issue 17's host-side trainer changes
SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "mid": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                num_key_value_heads=4),
}
WORDS = ["amber", "falcon", "cobalt", "zebra", "maple", "onyx", "tulip", "raven", "cedar", "lumen", "quartz", "delta"]


def build_model(shape: str, root: Path) -> Path:
    if shape not in SHAPES:  # a model folder
        return Path(shape)
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sloth_daemon.default_model import _generation_config, _save_tokenizer, build_tokenizer

    folder = root / f"model-{shape}"
    if (folder / "config.json").exists():
        return folder
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=-(-len(tokenizer) // 64) * 64, max_position_embeddings=2048, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(folder)
    _save_tokenizer(tokenizer, folder)
    return folder


def make_job(model: Path, out: Path, args) -> dict:
    """The job as a dict (the trainer's JSON contract), the same for every configuration."""
    rng = random.Random(0)

    def fact(i: int) -> dict:
        code = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}-{rng.randint(10, 99)}"
        return {"id": f"f{i}", "kind": "chat", "prompt": [{"role": "user",
                "content": f"What is the code word for locker {i}?"}], "answer": f"Locker {i} opens with {code}."}

    def anchor(i: int) -> dict:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40)))
        return {"id": f"a{i}", "kind": "chat", "prompt": [{"role": "user", "content": f"Tell me about topic {i}."}],
                "answer": f"Topic {i} is about {words}."}

    new = [fact(i) for i in range(args.new)]
    replay = [fact(10_000 + i) for i in range(args.replay)]
    anchors = [anchor(i) for i in range(args.anchors)]
    held_anchor = anchors[: len(anchors) // 4]
    train_anchor = anchors[len(anchors) // 4:]
    shares = {"new": 0.4, "replay": 0.3, "anchor": 0.4}
    total = sum(shares.values())
    n_new = max(1, round(args.batch_size * shares["new"] / total))
    n_replay = round(args.batch_size * shares["replay"] / total)
    n_anchor = args.batch_size - n_new - n_replay
    steps = max(args.min_steps, -(-2 * len(new) // n_new))
    batches = []
    for s in range(steps):
        batches.append([new[(s * n_new + k) % len(new)]["id"] for k in range(n_new)]
                       + [replay[(s * n_replay + k) % len(replay)]["id"] for k in range(n_replay)]
                       + [train_anchor[(s * n_anchor + k) % len(train_anchor)]["id"] for k in range(n_anchor)])
    examples = {e["id"]: e for e in new + replay + anchors}
    return {"base_model": str(model), "output_dir": str(out), "batches": batches, "examples": examples,
            "eval_sets": {"new": [e["id"] for e in new[:64]], "recall": [e["id"] for e in replay[:64]],
                          "anchor": [e["id"] for e in held_anchor[:64]]},
            "kl_sets": ["anchor"], "learning_rate": 3e-4, "max_seq_len": 512, "device": args.device, "seed": 0,
            "quantize": "nf4" if args.device.startswith("cuda") else "none",
            "pack": True, "step_tokens": args.step_tokens,
            "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"]}}


# ----------------------------------------------------------------------------------------------------------------
# One configuration, in its own process (`--measure`)
# ----------------------------------------------------------------------------------------------------------------
def profile_split(prof: cProfile.Profile, loop_seconds: float) -> dict:
    """Seconds of the step loop inside the model's forward (top-level module call), `loss.backward()`, the
    optimizer (step, clip, zero_grad, the scheduler's step), and the rest: the host's own per-step work."""
    stats = pstats.Stats(prof)
    out = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for (file, _line, func), (_cc, _nc, _tt, ct, callers) in stats.stats.items():
        from_loop = [c for c in callers if c[2] in ("backward", "train_on") and "recipe.py" in c[0]]
        if not from_loop:
            continue
        seconds = sum(callers[c][3] for c in from_loop)  # cumulative time of the calls made from the loop
        if func == "_wrapped_call_impl":
            out["forward"] += seconds
        elif func == "backward" and "torch" in file:
            out["backward"] += seconds
        elif func in ("step", "clip_grad_norm_", "zero_grad", "wrapper", "_clip_grads_with_norm_") or \
                "optim" in file or "clip_grad" in file:
            out["optimizer"] += seconds
    out["host"] = max(0.0, loop_seconds - sum(out.values()))
    return {k: round(v, 4) for k, v in out.items()}


def measure(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import sloth_daemon
    from sloth_daemon.trainer import recipe
    from sloth_daemon.trainer.job import TrainJob

    spec = json.loads(Path(args.job).read_text())
    job = TrainJob.model_validate(spec)
    base, tokenizer = recipe.load_base(job)
    runs = []
    for i in range(args.repeat):
        job = TrainJob.model_validate({**spec, "output_dir": f"{spec['output_dir']}-{i}"})
        events: list[dict] = []
        prof = cProfile.Profile() if i == args.repeat - 1 else None
        started = time.perf_counter()
        if prof:
            prof.enable()
        result, base = recipe.train_on(base, tokenizer, job, events.append, warm=True)
        if prof:
            prof.disable()
        wall = time.perf_counter() - started
        steps = [e for e in events if e.get("event") == "progress"]
        run = {"wall_s": round(wall, 3), "phases": result.phases, "steps": result.steps, "tokens": result.tokens,
               "losses": [e["loss"] for e in steps],
               "eval": {k: {"parent": v.parent, "candidate": v.candidate, "parent_kl": v.parent_kl,
                            "candidate_kl": v.candidate_kl} for k, v in result.eval.items()}}
        if prof:
            run["train_split"] = profile_split(prof, result.phases["train"])
            if args.profile:
                prof.dump_stats(args.profile)
        runs.append(run)
    print(json.dumps({"sloth_daemon": sloth_daemon.__file__, "runs": runs}))


# ----------------------------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------------------------
def run_config(tree: Path, job: Path, args, profile: Path | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--measure", "--job", str(job),
           "--repeat", str(args.repeat), "--threads", str(args.threads)]
    if profile:
        cmd += ["--profile", str(profile)]
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(result: dict) -> dict:
    """Figures of a configuration: the best of its runs (the least disturbed by other load) per phase."""
    runs = result["runs"]
    best = {k: min(r["phases"].get(k, 0.0) for r in runs) for k in ("attach", "eval_before", "train", "eval_after",
                                                                    "save")}
    steps = runs[-1]["steps"]
    out = {"phases": best, "steps": steps, "tokens": runs[-1]["tokens"], "step_s": round(best["train"] / steps, 4),
           "gate_s": round(best["eval_before"] + best["eval_after"], 4), "split": runs[-1].get("train_split", {})}
    split = out["split"]
    if split:
        out["host_per_step_s"] = round(split["host"] / steps, 5)
    return out


def gate_diff(before: dict, after: dict) -> float:
    """Largest relative difference between two runs' gate figures (each eval set's parent/candidate loss and KL)."""
    worst = 0.0
    for name, fig in before.items():
        for key, x in fig.items():
            y = after.get(name, {}).get(key)
            if x is None or y is None:
                if x != y:
                    return float("inf")
                continue
            worst = max(worst, abs(x - y) / max(abs(x), 1e-6))
    return worst


def fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--profile", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shapes", default="tiny,mid", help="tiny, mid, or a model folder (e.g. bench_loop's 8B shape)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (the job then trains on the NF4 base, kernels off)")
    p.add_argument("--configs", default="before,after")
    p.add_argument("--before", default=BEFORE_REF, help="git ref of the previous code (default %(default)s), or a folder holding its sloth_daemon/ (where there is no git history)")
    p.add_argument("--new", type=int, default=48, help="new examples (the update's taught pairs)")
    p.add_argument("--replay", type=int, default=48)
    p.add_argument("--anchors", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-steps", type=int, default=24)
    p.add_argument("--step-tokens", type=int, default=0)
    p.add_argument("--repeat", type=int, default=2, help="updates per configuration on one loaded base")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: a 2-core machine shared with others)")
    p.add_argument("--work", default=None)
    p.add_argument("--profiles", default=None, help="folder for the cProfile dumps (one per shape and config)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.measure:
        measure(args)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-train-host-"))
    work.mkdir(parents=True, exist_ok=True)
    from benchmarks.bench_serving import checkout  # `sloth_daemon/` of a git ref, extracted

    configs = [c for c in args.configs.split(",") if c]
    trees = {"before": lambda: (Path(args.before).resolve() if Path(args.before).is_dir()  # an extracted tree
                                else checkout(args.before, work / "before")), "after": lambda: ROOT}
    results: dict = {"argv": sys.argv[1:], "before_ref": args.before, "cpu_count": os.cpu_count(),
                     "load_average_start": os.getloadavg(), "shapes": {}}
    lines = ["shape | config | steps | tokens | step s | host s/step | forward | backward | optimizer | host | "
             "gate s | attach s | save s", " | ".join(["---"] * 13)]
    for shape in [s for s in args.shapes.split(",") if s]:
        model = build_model(shape, work)
        shape = shape if shape in SHAPES else model.name  # a folder: named by its last part
        job = work / f"job-{shape}.json"
        job.write_text(json.dumps(make_job(model, work / f"out-{shape}", args)))
        per = {}
        for name in configs:
            prof = Path(args.profiles) / f"{shape}-{name}.prof" if args.profiles else None
            if prof:
                prof.parent.mkdir(parents=True, exist_ok=True)
            raw = run_config(trees[name](), job, args, prof)
            per[name] = {"summary": summary(raw), "raw": raw}
            s = per[name]["summary"]
            sp = s["split"]
            lines.append(" | ".join([shape, name, str(s["steps"]), str(s["tokens"]), fmt(s["step_s"]),
                                     fmt(s.get("host_per_step_s", "-")), fmt(sp.get("forward", "-")),
                                     fmt(sp.get("backward", "-")), fmt(sp.get("optimizer", "-")),
                                     fmt(sp.get("host", "-")), fmt(s["gate_s"]), fmt(s["phases"]["attach"]),
                                     fmt(s["phases"]["save"])]))
            print(lines[-1], flush=True)
        if {"before", "after"} <= per.keys():
            b, a = per["before"], per["after"]
            same = b["raw"]["runs"][-1]["losses"] == a["raw"]["runs"][-1]["losses"]
            diff = max((abs(x - y) for x, y in zip(b["raw"]["runs"][-1]["losses"], a["raw"]["runs"][-1]["losses"])),
                       default=0.0)
            ratios = {"step": a["summary"]["step_s"] / b["summary"]["step_s"],
                      "gate": a["summary"]["gate_s"] / b["summary"]["gate_s"],
                      "host_per_step": (a["summary"].get("host_per_step_s") or 0) / max(
                          b["summary"].get("host_per_step_s") or 1e-9, 1e-9)}
            per["after_over_before"] = {k: round(v, 3) for k, v in ratios.items()}
            per["losses_equal"] = same
            per["max_loss_diff"] = diff
            per["max_gate_rel_diff"] = gate = gate_diff(b["raw"]["runs"][-1]["eval"], a["raw"]["runs"][-1]["eval"])
            lines.append(f"{shape} | after/before | | | {ratios['step']:.3f}x | {ratios['host_per_step']:.3f}x | | | "
                         f"| | {ratios['gate']:.3f}x | | (losses equal: {same}, max diff {diff:.2e}; gate figures "
                         f"max rel diff {gate:.2e})")
            print(lines[-1], flush=True)
        results["shapes"][shape] = per
        if args.out:
            results["load_average_end"] = os.getloadavg()
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + "\n".join(lines))
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
