"""The whole loop at scale: teach N examples, run one update, and time every phase from trigger to served, with
serving latency measured idle and while the update trains. GPU by default; `--tiny` runs sloth-tiny on CPU.

    python -m benchmarks.bench_loop [--tiny] [--examples 100,500,2000] [--configs before,after] [--clients 1,16]
                                    [--layers 32] [--out benchmarks/results/loop.json]

The model: on the GPU a Llama-3.1-8B-shaped model (hidden 4096, 32 layers, 32/8 heads, intermediate 14336; `--layers`
for fewer) with random weights (seeded) and sloth-tiny's byte-level tokenizer, built on the GPU and saved as a bf16
checkpoint once per run (its build time is reported). `--tiny`: the built-in sloth-tiny, built from scratch by
`default_model.build_default_model` (its build time and its check, every built-in question answered exactly under
greedy decoding, are reported: the build is timed here, never in a test).

Per configuration, one real daemon (`sloth-daemon serve`, the embedded engine, the device's defaults) on a fresh
state dir; per N (in order, so later Ns continue from the earlier updates' adapters and replay pools):
1. teach N new question/answer pairs (`POST /sloth/teach`);
2. idle serving: for each client count C, C concurrent streaming chat requests, `--requests` each (greedy,
   `--max-tokens` tokens): p50/p99 of the whole request and of the first token;
3. trigger an update (`POST /sloth/updates`) and keep requests going while it runs, the client count switching
   between the smallest and the largest C every `--window` seconds; requests that end inside the training phase count
   for "while training";
4. from the update's record (`metrics.timeline`: wall-clock ends of the phases, `metrics.train.phases`): trigger ->
   trainer ready (base loaded, LoRA attached, batches prepared), gate evaluation (the eval sets scored before and after
   training), training (steps, tokens, tokens/s), adapter write (save + commit), swap (load, probe, flip, drain), and
   trigger -> the first request answered by the new version ("feedback -> served", from the clients' side);
5. recall: greedy answers to up to `--recall` of the taught prompts, exact matches counted;
6. peak GPU memory (nvidia-smi's used memory of the device, daemon + trainer, sampled every 0.2 s), idle and during
   the update.
Configurations (daemon environment; `before` is the previous code's recipe, measured in the same run):
- `before`: a fresh trainer process per update, no packing, a fixed 120 steps (SLOTH_TRAIN_WARM=false,
  SLOTH_TRAIN_PACK=false, SLOTH_TRAIN_STEPS=120);
- `after`: the defaults (warm trainer, packing, steps from the data, tokens per step on CUDA);
- `nf4`: `after` with the embedded engine serving from the 4-bit NF4 base (`embedded.quantization = "nf4"`) instead
  of bf16: compare its GPU peaks and serving tokens/s (completion tokens per second of wall time over all clients,
  idle) with `after`'s in the same run.
A table per configuration and N, and JSON (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from benchmarks.sse import has_text, iter_sse_chunks  # noqa: E402

CONFIGS = {
    "before": {"SLOTH_TRAIN_WARM": "false", "SLOTH_TRAIN_PACK": "false", "SLOTH_TRAIN_STEPS": "120"},
    "after": {},
    "nf4": {"SLOTH_EMBEDDED_QUANTIZATION": "nf4"},
}
WORDS = ["amber", "falcon", "cobalt", "zebra", "maple", "onyx", "tulip", "raven", "cedar", "lumen", "quartz", "delta"]
PROBES = ["Hello", "What is sloth-daemon?", "How do I teach you something?", "Tell me about sloths.",
          "What is 2 + 2?", "Who are you?"]


def facts(n: int, offset: int, seed: int = 0) -> list[tuple[str, str]]:
    """N distinct question/answer pairs (deterministic)."""
    rng = random.Random(f"facts/{seed}/{offset}")
    out = []
    for i in range(offset, offset + n):
        code = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}-{rng.randint(10, 99)}"
        out.append((f"What is the code word for locker {i}?", f"Locker {i} opens with {code}."))
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
def build_tiny(root: Path) -> tuple[Path, dict]:
    from sloth_daemon.default_model import build_default_model, read_build_info

    started = time.monotonic()
    folder = build_default_model(root / "sloth-tiny")
    info = read_build_info(folder) or {}
    return folder, {"build_seconds": round(time.monotonic() - started, 2), "build": info}


def build_big(root: Path, layers: int) -> tuple[Path, dict]:
    """An 8B-shaped Llama with random weights and the byte-level tokenizer, saved in bf16."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from sloth_daemon.default_model import _generation_config, _save_tokenizer, build_tokenizer

    started = time.monotonic()
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folder = root / "llama-8b-shape"
    model.generation_config = _generation_config(tokenizer)
    assert isinstance(model.generation_config, GenerationConfig)
    model.save_pretrained(folder)
    _save_tokenizer(tokenizer, folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return folder, {"build_seconds": round(time.monotonic() - started, 2), "params": params, "layers": layers}


# ----------------------------------------------------------------------------------------------------------------
# GPU memory
# ----------------------------------------------------------------------------------------------------------------
class GpuMemory:
    """Samples nvidia-smi's used memory (MiB) of GPU 0 every 0.2 s; `mark(name)` starts a named span."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = None
        self.available = shutil.which("nvidia-smi") is not None

    def start(self):
        if self.available:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.samples.append((time.time(), float(out.strip().splitlines()[0])))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.2)

    def peak_gib(self, since: float = 0.0, until: float = float("inf")) -> float | None:
        xs = [m for t, m in self.samples if since <= t <= until]
        return round(max(xs) / 1024, 2) if xs else None

    def stop(self):
        self._stop.set()


# ----------------------------------------------------------------------------------------------------------------
# Clients
# ----------------------------------------------------------------------------------------------------------------
async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "store": False, "stream_options": {"include_usage": True}}
    start = time.time()
    first = None
    version = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for chunk in iter_sse_chunks(r):
            if first is None and has_text(chunk):
                first = time.time()
            if "sloth" in chunk:
                version = chunk["sloth"].get("adapter_version")
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens") or 0
    end = time.time()
    return {"start": start, "end": end, "latency": end - start, "ttft": (first or end) - start, "version": version,
            "tokens": tokens}


async def idle_latency(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def worker(k: int):
            return [await one_request(client, model, PROBES[(k + i) % len(PROBES)], max_tokens) for i in range(requests)]

        started = time.time()
        runs = await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.time() - started
    rs = [r for run in runs for r in run]
    return summarise(rs, clients, wall)


def summarise(rs: list[dict], clients: int, wall: float | None = None) -> dict:
    lat = [r["latency"] for r in rs]
    ttft = [r["ttft"] for r in rs]
    out = {"clients": clients, "requests": len(rs), "p50_s": pct(lat, 50), "p99_s": pct(lat, 99),
           "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99)}
    if wall:
        out["requests_per_s"] = round(len(rs) / wall, 3)
        out["tokens_per_s"] = round(sum(r.get("tokens", 0) for r in rs) / wall, 1)  # completion tokens, all clients
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


async def load_during(url: str, model: str, counts: list[int], window: float, max_tokens: int,
                      done: asyncio.Event, records: list[dict]) -> None:
    """Requests from max(counts) workers while `done` is unset, appended to `records`; the active count cycles
    through `counts` every `window` seconds. Each record carries the number of active clients at its start."""
    active = {"n": counts[0]}

    async def controller():
        i = 0
        while not done.is_set():
            active["n"] = counts[i % len(counts)]
            i += 1
            try:
                await asyncio.wait_for(done.wait(), window)
            except asyncio.TimeoutError:
                pass

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def worker(k: int):
            i = 0
            while not done.is_set():
                if k >= active["n"]:
                    await asyncio.sleep(0.02)
                    continue
                n = active["n"]
                r = await one_request(client, model, PROBES[(k + i) % len(PROBES)], max_tokens)
                r["clients"] = n
                records.append(r)
                i += 1

        await asyncio.gather(controller(), *(worker(k) for k in range(max(counts))))


# ----------------------------------------------------------------------------------------------------------------
# One configuration
# ----------------------------------------------------------------------------------------------------------------
def start_daemon(state: Path, model: Path | None, env: dict[str, str]):
    from tests.daemon_proc import DaemonProcess

    args = ["--model", str(model)] if model else []
    return DaemonProcess(state, env={"SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ZMQ": "off", **env},
                         args=args).start(timeout=900)


def greedy(http: httpx.Client, model: str, prompt: str, max_tokens: int = 64) -> str:
    r = http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": prompt}],
                                                "temperature": 0, "max_tokens": max_tokens, "store": False})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def run_config(name: str, args, model_dir: Path, work: Path, gpu: GpuMemory, save) -> list[dict]:
    state = work / f"state-{name}"
    if args.tiny:  # the built-in model, from the models cache (no --model)
        shutil.copytree(model_dir, state / "models" / model_dir.name)
    daemon = start_daemon(state, None if args.tiny else model_dir, CONFIGS[name])
    rows = []
    try:
        http = httpx.Client(base_url=daemon.url, timeout=600)
        model = http.get("/v1/models").json()["data"][0]["id"]
        # Anchors are made in the background at first start; updates wait for them: wait here, off the clock.
        deadline = time.monotonic() + 600
        anchors = CONFIGS[name].get("SLOTH_ANCHORS_ENABLED", "true").lower() != "false"  # off: none will come
        while anchors and http.get("/sloth/status").json().get("anchors", 1) == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        offset = 0
        for n in args.examples:
            taught = facts(n, offset)
            offset += n
            r = http.post("/sloth/teach", json={"examples": [{"prompt": q, "answer": a} for q, a in taught]})
            r.raise_for_status()
            row = {"config": name, "examples": n, "device": "cuda" if gpu.available else "cpu"}
            idle_start = time.time()
            idle_wanted = not (args.idle_first_only and name != args.configs.split(",")[0]
                               and "SLOTH_EMBEDDED_QUANTIZATION" not in CONFIGS[name])  # nf4 serves differently
            row["idle"] = [asyncio.run(idle_latency(daemon.url, model, c, args.requests, args.max_tokens))
                           for c in args.clients] if idle_wanted else []
            row["gpu_peak_idle_gib"] = gpu.peak_gib(idle_start)
            row.update(asyncio.run(one_update(http, daemon, model, args)))
            row["gpu_peak_update_gib"] = gpu.peak_gib(row["timeline"]["trigger"], time.time())
            sample = taught[: args.recall]
            exact = sum(greedy(http, model, q) == a for q, a in sample)
            row["recall"] = {"exact": exact, "asked": len(sample)}
            rows.append(row)
            save(rows)
            print(table([row]), flush=True)
        http.close()
    finally:
        daemon.stop()
    (work / f"daemon-{name}.log").write_text(daemon.log())
    return rows


async def one_update(http: httpx.Client, daemon, model: str, args) -> dict:
    done = asyncio.Event()
    records: list[dict] = []
    load = asyncio.create_task(load_during(daemon.url, model, sorted({min(args.clients), max(args.clients)}),
                                           args.window, args.max_tokens, done, records))
    await asyncio.sleep(0.5)
    trigger = time.time()
    r = await asyncio.to_thread(http.post, "/sloth/updates")
    r.raise_for_status()
    update_id = r.json()["update_id"]
    while True:
        u = (await asyncio.to_thread(http.get, f"/sloth/updates/{update_id}")).json()
        if u["status"] != "running":
            break
        await asyncio.sleep(0.25)
    # Keep the clients going until one of them is answered by the new version (or 60 s pass).
    version = u.get("adapter_version") if u["status"] == "promoted" else None
    deadline = time.time() + 60
    while version and time.time() < deadline and not any(r.get("version") == version for r in records):
        await asyncio.sleep(0.1)
    done.set()
    await load
    metrics = u.get("metrics") or {}
    tl = dict(metrics.get("timeline") or {})
    train = metrics.get("train") or {}
    phases = train.get("phases") or {}
    out = {"update_id": update_id, "status": u["status"], "reason": u.get("reason"), "timeline": tl or {"trigger": trigger},
           "steps": train.get("steps"), "tokens": train.get("tokens"), "warm": train.get("warm")}
    if tl:
        t0 = tl.get("trigger", trigger)
        out["trigger_to_ready_s"] = round(tl["attach"] - t0, 2) if "attach" in tl else None
        out["train_s"] = phases.get("train")
        out["tokens_per_s"] = round(train["tokens"] / phases["train"], 1) if phases.get("train") else None
        out["gate_eval_s"] = round(phases.get("eval_before", 0) + phases.get("eval_after", 0), 2)
        out["adapter_write_s"] = round(tl["commit"] - tl["eval_after"], 2) if "commit" in tl and "eval_after" in tl else None
        out["swap_s"] = round(tl["swap"] - tl["commit"], 2) if "swap" in tl and "commit" in tl else None
        new = [r["end"] for r in records if version and r.get("version") == version]
        out["trigger_to_served_s"] = round(min(new) - t0, 2) if new else None
        out["promoted_to_first_answer_s"] = round(min(new) - tl["commit"], 2) if new and "commit" in tl else None
        out["update_s"] = round(tl.get("swap", tl.get("commit", t0)) - t0, 2)
        lo, hi = tl.get("attach", t0), tl.get("train", time.time())
        during = [r for r in records if lo <= r["start"] and r["end"] <= hi]
        out["training"] = [summarise([r for r in during if r["clients"] == c], c)
                           for c in sorted({r["clients"] for r in during})]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def fmt(v, unit="") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}{unit}"
    return f"{v}{unit}"


def table(rows: list[dict]) -> str:
    head = ("config", "N", "status", "ready", "train", "steps", "tok/s", "gate", "write", "swap", "served",
            "recall", "idle p50/p99 (C)", "idle tok/s (C)", "training p50/p99 (C)", "GPU GiB idle/update")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        idle = "; ".join(f"{fmt(x['p50_s'])}/{fmt(x['p99_s'])} ({x['clients']})" for x in r.get("idle", []))
        during = "; ".join(f"{fmt(x['p50_s'])}/{fmt(x['p99_s'])} ({x['clients']})" for x in r.get("training", []))
        speed = "; ".join(f"{fmt(x.get('tokens_per_s'))} ({x['clients']})" for x in r.get("idle", []))
        lines.append(" | ".join([
            r["config"], str(r["examples"]), r["status"], fmt(r.get("trigger_to_ready_s"), "s"),
            fmt(r.get("train_s"), "s"), fmt(r.get("steps")), fmt(r.get("tokens_per_s")), fmt(r.get("gate_eval_s"), "s"),
            fmt(r.get("adapter_write_s"), "s"), fmt(r.get("swap_s"), "s"), fmt(r.get("trigger_to_served_s"), "s"),
            f"{r['recall']['exact']}/{r['recall']['asked']}" if "recall" in r else "-", idle, speed, during,
            f"{fmt(r.get('gpu_peak_idle_gib'))}/{fmt(r.get('gpu_peak_update_gib'))}",
        ]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="sloth-tiny on CPU (plumbing; relative figures only)")
    p.add_argument("--examples", default=None, help="comma-separated N (default 100,500,2000; --tiny: 5,50)")
    p.add_argument("--configs", default="before,after")
    p.add_argument("--clients", default=None, help="client counts (default 1,16; --tiny: 1,8)")
    p.add_argument("--requests", type=int, default=4, help="requests per client in the idle measurement")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--window", type=float, default=2.0, help="seconds per client count while training")
    p.add_argument("--recall", type=int, default=20, help="taught prompts asked back after each update")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--idle-first-only", action="store_true",
                   help="measure idle serving for the first configuration and nf4 only (the others serve alike)")
    p.add_argument("--work", default=None, help="working folder (default: a temp dir, removed)")
    p.add_argument("--env", action="append", default=[], metavar="SLOTH_KEY=VALUE",
                   help="daemon setting for every configuration (e.g. SLOTH_ANCHORS_MAX_TOKENS=48)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.examples = [int(x) for x in (args.examples or ("5,50" if args.tiny else "100,500,2000")).split(",")]
    args.clients = [int(x) for x in (args.clients or ("1,8" if args.tiny else "1,16")).split(",")]
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    env = dict(kv.split("=", 1) for kv in args.env)
    for name in CONFIGS:
        CONFIGS[name] = {**env, **CONFIGS[name]}
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    gpu = GpuMemory().start()
    try:
        model_dir, build = build_tiny(work / "models") if args.tiny else build_big(work / "models", args.layers)
        print(f"model: {model_dir} {json.dumps({k: v for k, v in build.items() if k != 'build'})}", flush=True)
        if args.tiny:
            info = build["build"]
            print(f"sloth-tiny build: {build['build_seconds']}s, {info.get('steps')} steps, "
                  f"check {info.get('check')}", flush=True)
        rows: list[dict] = []

        def save(more: list[dict]) -> None:  # after every row: a run cut short keeps what it measured
            if args.out:
                result = {"argv": sys.argv[1:], "tiny": args.tiny, "model": build, "rows": rows + more,
                          "gpu_peak_gib": gpu.peak_gib(), "cpu_count": os.cpu_count(),
                          "load_average": os.getloadavg(), "env": env}
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

        for name in configs:
            rows += run_config(name, args, model_dir, work, gpu, save)
        save([])
        print("\n" + table(rows))
        if args.out:
            print(f"wrote {args.out}")
    finally:
        gpu.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
