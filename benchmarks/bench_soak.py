"""Soak: many clients for minutes against one real daemon, with updates and swaps under load and one SIGKILL and
restart in the middle, then a reconciliation of what the clients were told against what the replay store holds
(issue 12, item 9). A benchmark, not a test: it prints a table and writes JSON.

    python -m benchmarks.bench_soak [--clients 50] [--minutes 5] [--max-tokens 16] [--update-every 45]
                                    [--train-steps 8] [--no-kill] [--model-cache DIR] [--out benchmarks/results/soak.json]

One daemon (`sloth-daemon serve`, embedded engine, the built-in sloth-tiny, anchors off, no scheduled updates) on a
fresh state dir. `--clients` concurrent clients loop until `--minutes` are over (at most 30), each request drawn at
random: a plain chat (40%), a streaming chat (30%, read to `[DONE]`), a teach of one new fact (15%), a thumbs-up
on one of the client's earlier answers (15%). Every `--update-every` seconds an update is triggered (when none runs),
so adapters are trained and swapped in while the clients run. Half-way through, the daemon is SIGKILLed and started
again on the same state dir and port (`--no-kill` skips this); clients count what fails meanwhile and go on.

Reported: requests and failures by status (`conn` = no HTTP answer: the daemon was down), p50/p99 latency of plain
chats idle and while an update trained, the daemon's RSS at start and end (of the process running at the end), and
the reconciliation, read from `replay.db` once the daemon has stopped:
- `logged_missing`: answers that said `logged: true` (or `journaled: true`) but are not in the store (must be 0);
- `unexpected_rows`: turns in the store that no client got an answer for (a turn committed just before a SIGKILL
  cut its answer off is the only expected cause; each is listed);
- `half_swapped`: answers whose `adapter_version` is not the store's record of that turn, or names a version the
  registry does not list as promoted (an answer served by a half-swapped adapter; must be 0);
- the updates by outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from benchmarks.bench_loop import pct  # noqa: E402

PROMPTS = ["Hello", "What is sloth-daemon?", "Tell me about sloths.", "What is 2 + 2?", "Who are you?",
           "How do I teach you something?"]


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


class Soak:
    def __init__(self, args, daemon, model: str):
        self.args, self.daemon, self.model = args, daemon, model
        self.records: list[dict] = []  # one per request
        self.training: list[tuple[float, float]] = []  # (start, end) of spans in which an update ran
        self.kill: dict = {}
        self.up = asyncio.Event()
        self.up.set()
        self.end = 0.0

    # -- clients --------------------------------------------------------------------------------------------------
    async def client(self, k: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(f"soak/{k}")
        mine: list[str] = []
        n = 0
        while time.monotonic() < self.end:
            await self.up.wait()
            n += 1
            roll = rng.random()
            if roll < 0.4:
                await self.chat(http, rng, stream=False, mine=mine)
            elif roll < 0.7:
                await self.chat(http, rng, stream=True, mine=mine)
            elif roll < 0.85:
                await self.call(http, "teach", "/sloth/teach", {"examples": [
                    {"prompt": f"What does client {k} keep in box {n}?", "answer": f"Box {n} holds {rng.random():.6f}."}]})
            elif mine:
                await self.call(http, "feedback", "/sloth/feedback", {"interaction_id": rng.choice(mine), "rating": "up"})
            else:
                await asyncio.sleep(0)  # nothing to rate yet: let the others run

    async def call(self, http: httpx.AsyncClient, kind: str, path: str, body: dict) -> dict:
        rec = {"kind": kind, "t0": time.monotonic()}
        try:
            r = await http.post(path, json=body)
            rec["status"] = str(r.status_code)
        except httpx.HTTPError as e:
            rec["status"] = "conn"
            rec["error"] = type(e).__name__
            await asyncio.sleep(0.5)
        rec["t1"] = time.monotonic()
        self.records.append(rec)
        return rec

    async def chat(self, http: httpx.AsyncClient, rng: random.Random, *, stream: bool, mine: list[str]) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                "max_tokens": self.args.max_tokens, "temperature": 0.8, "stream": stream}
        rec = {"kind": "stream" if stream else "chat", "t0": time.monotonic()}
        try:
            if stream:
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    rec["status"] = str(r.status_code)
                    last, done = None, False
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: {"):
                            event = json.loads(line[6:])
                            if "error" in event:
                                rec["status"] = "stream_error"
                            elif event.get("choices") and event["choices"][0].get("finish_reason"):
                                last = event
                    if r.status_code == 200 and not done:
                        rec["status"] = "no_done"
                    if last is not None:
                        rec.update(id=last["id"], **last.get("sloth", {}))
            else:
                r = await http.post("/v1/chat/completions", json=body)
                rec["status"] = str(r.status_code)
                if r.status_code == 200:
                    out = r.json()
                    rec.update(id=out["id"], **out["sloth"])
        except httpx.HTTPError as e:
            rec["status"] = "conn"
            rec["error"] = type(e).__name__
            rec.pop("id", None)  # an answer cut off is no answer
            await asyncio.sleep(0.5)
        rec["t1"] = time.monotonic()
        self.records.append(rec)
        if rec.get("logged") or rec.get("journaled"):
            mine.append(rec["id"])

    # -- the daemon's side ----------------------------------------------------------------------------------------
    async def watch(self, http: httpx.AsyncClient) -> None:
        """Trigger updates every `--update-every` s and note when one runs (polled every 0.5 s)."""
        last_trigger, running_since = 0.0, None
        while time.monotonic() < self.end:
            await asyncio.sleep(0.5)
            if not self.up.is_set():
                continue
            try:
                status = (await http.get("/sloth/status")).json()
            except (httpx.HTTPError, ValueError):
                continue
            now = time.monotonic()
            running = status.get("update") is not None
            if running and running_since is None:
                running_since = now
            elif not running and running_since is not None:
                self.training.append((running_since, now))
                running_since = None
            if not running and now - last_trigger > self.args.update_every:
                last_trigger = now
                try:
                    triggered = (await http.post("/sloth/updates")).status_code == 202
                except httpx.HTTPError:
                    continue
                if triggered:
                    running_since = running_since or now
        if running_since is not None:
            self.training.append((running_since, time.monotonic()))

    async def kill_and_restart(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        pid = self.daemon.proc.pid
        self.kill = {"at_s": round(at - self.started, 1), "rss_before_kill": rss_bytes(pid)}
        self.up.clear()
        self.daemon.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.daemon.proc.wait)
        t0 = time.monotonic()
        await asyncio.to_thread(self.daemon.start, 600)
        self.kill["restart_s"] = round(time.monotonic() - t0, 2)
        self.up.set()

    async def run(self) -> None:
        args = self.args
        self.started = time.monotonic()
        self.end = self.started + args.minutes * 60
        limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
        async with httpx.AsyncClient(base_url=self.daemon.url, timeout=300, limits=limits) as http:
            tasks = [asyncio.create_task(self.client(k, http)) for k in range(args.clients)]
            tasks.append(asyncio.create_task(self.watch(http)))
            if not args.no_kill:
                tasks.append(asyncio.create_task(self.kill_and_restart(self.started + args.minutes * 30)))
            await asyncio.gather(*tasks)

    def while_training(self, rec: dict) -> bool:
        return any(a <= rec["t1"] and rec["t0"] <= b for a, b in self.training)


def reconcile(records: list[dict], db: Path, promoted: set[str]) -> dict:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = dict(con.execute("SELECT id, adapter_version FROM interactions").fetchall())
    updates: dict[str, int] = {}
    for (status,) in con.execute("SELECT status FROM updates"):
        updates[status] = updates.get(status, 0) + 1
    con.close()
    answered = {r["id"]: r for r in records if r.get("id")}
    said_logged = [r for r in answered.values() if r.get("logged") or r.get("journaled")]
    missing = [r["id"] for r in said_logged if r["id"] not in rows]
    unexpected = sorted(set(rows) - set(answered))
    half = [i for i, r in answered.items() if i in rows and (rows[i] != r.get("adapter_version") or
                                                            (r.get("adapter_version") not in promoted | {None}))]
    return {"store_rows": len(rows), "answers_said_logged": len(said_logged),
            "answers_journaled": sum(1 for r in said_logged if r.get("journaled")),
            "logged_missing": len(missing), "missing_ids": missing[:20], "unexpected_rows": len(unexpected),
            "unexpected_ids": unexpected[:20], "half_swapped": len(half), "half_swapped_ids": half[:20],
            "updates": updates}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--update-every", type=float, default=45.0, help="seconds between update triggers")
    ap.add_argument("--train-steps", type=int, default=8, help="SLOTH_TRAIN_STEPS: short updates on CPU")
    ap.add_argument("--no-kill", action="store_true", help="no SIGKILL and restart half-way")
    ap.add_argument("--model-cache", help="a folder holding (or to hold) the built sloth-tiny; default: built afresh")
    ap.add_argument("--out", default="benchmarks/results/soak.json")
    args = ap.parse_args()
    args.minutes = min(max(args.minutes, 0.2), 30.0)

    from sloth_daemon.default_model import ensure_default_model
    from tests.daemon_proc import DaemonProcess

    work = Path(tempfile.mkdtemp(prefix="sloth-soak-"))
    try:
        tiny = ensure_default_model(Path(args.model_cache) if args.model_cache else work / "model-cache")
        state = work / "state"
        shutil.copytree(tiny, state / "models" / tiny.name)
        daemon = DaemonProcess(state, env={"SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false",
                                           "SLOTH_ZMQ": "off", "SLOTH_TRAIN_STEPS": str(args.train_steps)}
                               ).start(timeout=600)
        model = httpx.get(daemon.url + "/v1/models", timeout=60).json()["data"][0]["id"]
        rss_start = rss_bytes(daemon.proc.pid)
        soak = Soak(args, daemon, model)
        wall0 = time.monotonic()
        asyncio.run(soak.run())
        wall = time.monotonic() - wall0
        # Let a running update and the journal settle, then read what the daemon says it serves.
        http = httpx.Client(base_url=daemon.url, timeout=120)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = http.get("/sloth/status").json()
            if status["update"] is None and not status.get("journaled_turns"):
                break
            time.sleep(1)
        promoted = {a["version"] for a in http.get("/sloth/adapters").json()["data"] if a["status"] == "promoted"}
        rss_end = rss_bytes(daemon.proc.pid)
        daemon.stop()
        result = summarise(soak, args, wall, rss_start, rss_end,
                           reconcile(soak.records, state / "replay.db", promoted))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def summarise(soak: Soak, args, wall: float, rss_start, rss_end, recon: dict) -> dict:
    by_status: dict[str, dict[str, int]] = {}
    for r in soak.records:
        by_status.setdefault(r["kind"], {}).setdefault(r["status"], 0)
        by_status[r["kind"]][r["status"]] += 1
    chats = [r for r in soak.records if r["kind"] == "chat" and r["status"] == "200"]
    idle = [r["t1"] - r["t0"] for r in chats if not soak.while_training(r)]
    busy = [r["t1"] - r["t0"] for r in chats if soak.while_training(r)]

    def ms(xs: list[float], q: float) -> float | None:
        v = pct(xs, q)
        return None if v is None else round(v * 1000, 1)

    return {
        "config": {"clients": args.clients, "minutes": args.minutes, "max_tokens": args.max_tokens,
                   "update_every_s": args.update_every, "train_steps": args.train_steps, "kill": not args.no_kill},
        "wall_s": round(wall, 1), "requests": len(soak.records),
        "requests_per_s": round(len(soak.records) / wall, 2), "by_kind_and_status": by_status,
        "chat_latency_ms": {"idle": {"n": len(idle), "p50": ms(idle, 50), "p99": ms(idle, 99)},
                            "while_training": {"n": len(busy), "p50": ms(busy, 50), "p99": ms(busy, 99)}},
        "training_s": round(sum(b - a for a, b in soak.training), 1),
        "rss_mb": {"start": rss_start and round(rss_start / 2**20), "end": rss_end and round(rss_end / 2**20)},
        "kill": soak.kill, "reconciliation": recon,
    }


def print_table(res: dict) -> None:
    c = res["config"]
    print(f"\nsoak: {c['clients']} clients, {c['minutes']} min, max_tokens {c['max_tokens']}, an update every "
          f"{c['update_every_s']} s ({c['train_steps']} steps), SIGKILL half-way: {c['kill']}")
    print(f"{'requests':<28}{res['requests']} ({res['requests_per_s']}/s over {res['wall_s']} s)")
    for kind, statuses in sorted(res["by_kind_and_status"].items()):
        print(f"  {kind:<26}" + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())))
    for when, lat in res["chat_latency_ms"].items():
        print(f"{'chat latency ' + when:<28}p50 {lat['p50']} ms, p99 {lat['p99']} ms (n={lat['n']})")
    print(f"{'time training':<28}{res['training_s']} s")
    print(f"{'daemon RSS':<28}{res['rss_mb']['start']} MB at start, {res['rss_mb']['end']} MB at end")
    if res["kill"]:
        print(f"{'SIGKILL':<28}at {res['kill']['at_s']} s, healthy again after {res['kill'].get('restart_s')} s")
    r = res["reconciliation"]
    print(f"{'store rows':<28}{r['store_rows']}; answers that said logged/journaled: {r['answers_said_logged']} "
          f"({r['answers_journaled']} journaled)")
    print(f"{'logged but missing':<28}{r['logged_missing']}")
    print(f"{'rows nobody got':<28}{r['unexpected_rows']} {r['unexpected_ids'][:5]}")
    print(f"{'half-swapped answers':<28}{r['half_swapped']}")
    print(f"{'updates':<28}{r['updates']}")


if __name__ == "__main__":
    main()
