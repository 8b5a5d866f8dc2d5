"""Embedded-engine serving under concurrency: time to first token and throughput, 1 client vs C concurrent ones,
for the engine before continuous batching and the current one, in the same run.

    python benchmarks/bench_serving.py [--before REF] [--clients 1,8] [--requests 4] [--repeat 3] [--max-tokens 32]
                                       [--via engine,http] [--model DIR] [--out benchmarks/results/serving_cpu.json]

Each configuration runs in its own Python process with `sloth_daemon` imported from a different tree: `before` from
`git archive REF` (default: the last commit whose embedded engine served one request at a time), `after` from this
checkout (the rest of the environment, e.g. `sloth_replay`, is this checkout's for both). Both load the same model
(`--model`, else sloth-tiny built once into `--work`) on `--device`, two ways (`--via`): `engine` drives an
`EmbeddedEngine` in-process (the engine alone), `http` starts the real daemon (`sloth-daemon serve`, no schedule,
no anchors, no ZeroMQ) and streams chat completions over HTTP as clients do (`store: false`).
In each of `--repeat` rounds, for each client count C in turn: C clients start together and each sends
`--requests` streaming greedy chat requests back to back (`--max-tokens` tokens each, prompts of different
lengths); recorded per request: time to first token (TTFT: from the call to the first text), total latency and
completion tokens; pooled over the rounds per C. Reported: TTFT p50/p90/max, the first waves' worst TTFT (every
client's first request of a round, all arriving at once), latency p50, and tokens/s over the whole run (1 client =
serial). Ratios are against the same configuration's 1-client row.
A table, and JSON (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file (also each configuration's process): make `benchmarks` importable,
    sys.path.append(str(ROOT))  # after PYTHONPATH, whose `sloth_daemon` (the tree measured) must come first

from benchmarks.sse import has_text, iter_sse_chunks  # noqa: E402
BEFORE_REF = "56fb062"  # main before continuous batching (issue 17, item 4)
PROMPTS = ["Hello", "What is sloth-daemon?", "How do I teach you something?",
           "Tell me about sloths, their habits, where they live and what they eat, in a few words.",
           "What is 2 + 2?", "Who are you?", "Where do I live?",
           "Please write a short poem about a very slow animal that hangs from the trees all day long."]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


# -- one configuration, in its own process ----------------------------------------------------------------------
async def _client(engine, k: int, requests: int, max_tokens: int) -> list[dict]:
    from sloth_daemon.engine.base import Finished, GenerationRequest, SamplingParams, TextDelta

    out = []
    for i in range(requests):
        prompt = PROMPTS[(k * 3 + i) % len(PROMPTS)]
        req = GenerationRequest("chat", [{"role": "user", "content": prompt}],
                                SamplingParams(max_tokens=max_tokens, temperature=0))
        t0 = time.perf_counter()
        first, tokens = None, 0
        async for ev in engine.generate(req):
            if isinstance(ev, TextDelta) and first is None:
                first = time.perf_counter()
            elif isinstance(ev, Finished):
                tokens = ev.completion_tokens
        end = time.perf_counter()
        out.append({"client": k, "i": i, "ttft_s": (first or end) - t0,
                    "latency_s": end - t0, "tokens": tokens})
    return out


async def _rounds(clients: list[int], repeat: int, one_run) -> list[dict]:
    """`repeat` rounds of every client count in turn (so a machine's load drifting during the run hits each count
    alike), pooled per count."""
    pooled: dict[int, list] = {c: [] for c in clients}
    walls = dict.fromkeys(clients, 0.0)
    for _ in range(repeat):
        for c in clients:
            t0 = time.perf_counter()
            runs = await asyncio.gather(*(one_run(k) for k in range(c)))
            walls[c] += time.perf_counter() - t0
            pooled[c] += [r for run in runs for r in run]
    return [_summary(c, pooled[c], walls[c]) for c in clients]


def _summary(c: int, rs: list[dict], wall: float) -> dict:
    ttft = [r["ttft_s"] for r in rs]
    return {"clients": c, "requests": len(rs), "wall_s": wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p90_s": pct(ttft, 90), "ttft_max_s": max(ttft),
            "first_wave_ttft_max_s": max(r["ttft_s"] for r in rs if r["i"] == 0),
            "latency_p50_s": statistics.median(r["latency_s"] for r in rs),
            "tokens": sum(r["tokens"] for r in rs), "tokens_per_s": sum(r["tokens"] for r in rs) / wall}


async def _measure_engine(model: str, device: str, clients: list[int], requests: int, max_tokens: int,
                          repeat: int) -> list:
    from sloth_daemon.engine.embedded import EmbeddedEngine

    engine = EmbeddedEngine(model, model_name="bench", device=device)
    await engine.start()
    try:
        await _client(engine, 0, 2, max_tokens)  # warm-up
        return await _rounds(clients, repeat, lambda k: _client(engine, k, requests, max_tokens))
    finally:
        await engine.stop()


async def _http_client(http, model: str, k: int, requests: int, max_tokens: int) -> list[dict]:
    out = []
    for i in range(requests):
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[(k * 3 + i) % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True, "store": False,
                "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first, tokens = None, 0
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for chunk in iter_sse_chunks(r):
                if first is None and has_text(chunk):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        end = time.perf_counter()
        out.append({"client": k, "i": i, "ttft_s": (first or end) - t0, "latency_s": end - t0, "tokens": tokens})
    return out


async def _measure_http(model: str, device: str, clients: list[int], requests: int, max_tokens: int,
                        repeat: int, state: Path) -> list:
    """The same through the real daemon (`sloth-daemon serve`, this process's `sloth_daemon`) over HTTP."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false", "SLOTH_ZMQ": "off",
           "SLOTH_DEVICE": device}
    state.mkdir(parents=True, exist_ok=True)
    log = open(state.parent / f"{state.name}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "sloth_daemon.cli", "serve", "--port", str(port), "--state-dir",
                             str(state), "--model", model], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
            deadline = time.monotonic() + 600
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"daemon did not start; see {log.name}")
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.3)
            name = (await http.get("/v1/models")).json()["data"][0]["id"]
            await _http_client(http, name, 0, 2, max_tokens)  # warm-up
            return await _rounds(clients, repeat, lambda k: _http_client(http, name, k, requests, max_tokens))
    finally:
        proc.terminate()
        proc.wait(60)


async def _measure(args, clients: list[int]) -> dict:
    import sloth_daemon

    out = {"sloth_daemon": str(Path(sloth_daemon.__file__).parent)}
    for via in args.via.split(","):
        if via == "engine":
            out["engine"] = await _measure_engine(args.model, args.device, clients, args.requests, args.max_tokens,
                                                  args.repeat)
        else:
            out["http"] = await _measure_http(args.model, args.device, clients, args.requests, args.max_tokens,
                                              args.repeat, Path(args.state))
    return out


# -- the driver ---------------------------------------------------------------------------------------------------
def checkout(ref: str, dest: Path) -> Path:
    """`sloth_daemon/` of git `ref`, extracted under `dest` (returned: the folder to put on PYTHONPATH)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "src.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), ref, "sloth_daemon"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


def run_config(name: str, tree: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, __file__, "--measure", "--model", str(args.model), "--device", args.device,
           "--clients", args.clients, "--requests", str(args.requests), "--max-tokens", str(args.max_tokens),
           "--via", args.via, "--repeat", str(args.repeat), "--state", str(Path(args.work) / f"state-{name}")]
    # cwd too: `python -m` puts the working directory first on sys.path (the daemon's `sloth_daemon` comes from there)
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(result["sloth_daemon"]).resolve() != (tree / "sloth_daemon").resolve():
        raise RuntimeError(f"{name} imported {result['sloth_daemon']}, not {tree / 'sloth_daemon'}")
    return result


def table(results: dict[str, dict], via: str) -> str:
    head = ("config", "via", "clients", "TTFT p50", "p90", "max", "first wave max", "TTFT vs 1 client",
            "latency p50", "tokens/s", "tokens/s vs serial")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for way in via.split(","):
        for name, res in results.items():
            one = res[way][0]
            for r in res[way]:
                lines.append(" | ".join([
                    name, way, str(r["clients"]), f"{r['ttft_p50_s'] * 1e3:.1f} ms", f"{r['ttft_p90_s'] * 1e3:.1f} ms",
                    f"{r['ttft_max_s'] * 1e3:.1f} ms", f"{r['first_wave_ttft_max_s'] * 1e3:.1f} ms",
                    f"{r['ttft_p50_s'] / one['ttft_p50_s']:.2f}x", f"{r['latency_p50_s'] * 1e3:.0f} ms",
                    f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=BEFORE_REF, help="git ref of the baseline engine (default %(default)s)")
    p.add_argument("--configs", default="before,after")
    p.add_argument("--clients", default="1,8", help="client counts; the first is the baseline of the ratios")
    p.add_argument("--requests", type=int, default=4, help="requests per client and round")
    p.add_argument("--repeat", type=int, default=3, help="rounds over the client counts, pooled")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="model folder (default: sloth-tiny, built into --work)")
    p.add_argument("--work", default=None, help="working folder (default: a temp dir)")
    p.add_argument("--out", default=None)
    p.add_argument("--via", default="engine,http", help="engine (in-process) and/or http (the real daemon)")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one configuration, in this process
    p.add_argument("--state", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    clients = [int(x) for x in args.clients.split(",")]
    if args.measure:
        print(json.dumps(asyncio.run(_measure(args, clients))))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-serving-"))
    args.work = str(work)
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from sloth_daemon.default_model import ensure_default_model

        args.model = ensure_default_model(work / "models")
    trees = {"before": lambda: checkout(args.before, work / "before"), "after": lambda: ROOT}
    results = {}
    for name in args.configs.split(","):
        results[name] = run_config(name, trees[name](), args)
        print(f"{name}: done", flush=True)
    print("\n" + table(results, args.via))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "argv": sys.argv[1:], "before_ref": args.before, "model": str(args.model), "device": args.device,
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "results": results}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
