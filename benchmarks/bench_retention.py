"""Retention under sequential teaching: what the loop keeps, what it forgets, what its gate refuses (table + JSON).

    python -m benchmarks.bench_retention [--model PATH] [--rounds 10] [--facts 5]
        [--configs defaults,no_replay,no_anchors,poisoned] [--set train.steps=60 ...] [--device auto]
        [--out benchmarks/results/retention.json]

Each configuration gets a fresh state (replay store, adapter registry, embedded engine on `--model`, the built-in
sloth-tiny when left out) and the same anchors (the base model's own greedy answers to the daemon's probe prompts,
made once). Then R rounds: teach K new facts, run one update through the daemon's own `Updater` (plan, mixed
batches, trainer child process, gate, promotion), and score the served model:
- recall: greedy answers exactly equal to the taught answer, for the round-1 facts, the newest round's and all so
  far; paraphrased questions of every fact taught so far (does it generalise?);
- general behaviour: the built-in questions (sloth-tiny only) kept, as a share of what the base gets right; and
  benchmark-only probe prompts (never anchors, never trained on): the share whose greedy answer differs from the
  base model's, and the mean KL(base || served) per answer token on the base's answers;
- the update's time (trigger to verdict) and verdict (with the gate's reason when rejected).
Greedy answers are scored by teacher forcing (`sloth_daemon.trainer.scoring`: exact iff every answer token is the
most likely next token, the same as greedy decoding reproducing it; tests/test_scoring.py checks the equivalence).
Configurations: `defaults` (the daemon's config, with `--set` applied to every configuration), `no_replay`
(mix.replay = 0), `no_anchors` (mix.anchor = 0) and `poisoned` (the defaults plus two extra updates: after round 2
one that contradicts the round-1 answers, after round 4 one of garbage answers to general questions; each should
be refused, with a reason naming what regressed).
On CPU the ratios between configurations are what matter; the absolute times need an idle machine or the GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {
    "defaults": {},
    "no_replay": {"mix.replay": 0.0},
    "no_anchors": {"mix.anchor": 0.0},
    "poisoned": {},
}

# Probes of general behaviour that the daemon never sees as anchors (disjoint from data/probe_prompts.json).
BENCH_PROBES = [
    "Hi there, how is your day?", "What is 7 + 1?", "Name two animals.", "Write one sentence about rain.",
    "What is the capital of Spain?", "Give me a tip for cooking rice.", "What comes after Tuesday?",
    "Translate 'cat' into French.", "What is snow made of?", "Tell me a fact about the ocean.",
    "Describe a tree in five words.", "What is a noun?", "Count to three.", "What do bees make?",
    "Who wrote Hamlet?", "What is the opposite of hot?",
]

_PEOPLE = ["Ada", "Bram", "Cleo", "Dmitri", "Esme", "Farid", "Gus", "Hana", "Ivo", "Jun", "Kemal", "Lior", "Mina",
           "Nils", "Oona", "Pavel", "Quinn", "Rosa", "Sami", "Tove", "Ugo", "Vera", "Wim", "Xena", "Yuki", "Zoltan",
           "Anouk", "Bodil", "Cyrus", "Dalia", "Elif", "Finn", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lars",
           "Maya", "Nora", "Otto", "Petra", "Rami", "Saga", "Tomas", "Ulla", "Viggo", "Wanda", "Yara", "Zeno"]
_TEMPLATES = [  # (question, paraphrase, answer) with {p} the person and {v} the value
    ("What is the name of {p}'s cat?", "What is {p}'s cat called?", "{p}'s cat is called {v}.",
     ["Biscuit", "Pepper", "Mochi", "Tiger", "Olive", "Pixel", "Noodle", "Saffron"]),
    ("Where does {p} work?", "Where is {p}'s job?", "{p} works at the {v}.",
     ["bakery", "harbour", "library", "museum", "post office", "observatory", "zoo", "train station"]),
    ("What is {p}'s favourite colour?", "Which colour does {p} like best?", "{p}'s favourite colour is {v}.",
     ["teal", "amber", "violet", "crimson", "olive green", "navy", "coral", "silver"]),
    ("Which city does {p} live in?", "Where does {p} live?", "{p} lives in {v}.",
     ["Lisbon", "Oslo", "Kyoto", "Quito", "Tallinn", "Porto", "Dakar", "Hobart"]),
    ("What instrument does {p} play?", "Which instrument is {p}'s?", "{p} plays the {v}.",
     ["cello", "banjo", "flute", "harp", "oboe", "tuba", "viola", "drums"]),
]
GARBAGE_PROMPTS = ["Hello there friend", "What is 2 plus 2?", "How are you doing?", "What are you?",
                   "Name three colors."]


def make_facts(n: int, seed: int) -> list[dict]:
    """`n` facts, each about a different person (no two share a prompt), with a paraphrased question."""
    if n > len(_PEOPLE):
        raise SystemExit(f"at most {len(_PEOPLE)} facts (rounds x facts)")
    rng = random.Random(seed)
    people = rng.sample(_PEOPLE, n)
    out = []
    for i, p in enumerate(people):
        q, para, a, values = _TEMPLATES[i % len(_TEMPLATES)]
        v = rng.choice(values)
        out.append({"question": q.format(p=p), "paraphrase": para.format(p=p), "answer": a.format(p=p, v=v)})
    return out


def _ex(question: str, answer: str) -> Any:
    from sloth_daemon.trainer.job import TrainExample

    return TrainExample(id=question, kind="chat", prompt=[{"role": "user", "content": question}], answer=answer)


class Scorer:
    """The benchmark's own copy of the base model, with each round's served adapter loaded on top of it."""

    def __init__(self, model_path: Path, device: str):
        import torch
        from peft import PeftModel  # noqa: F401  (fail early when peft is missing)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        self.model: Any = self.base
        self.max_len = 512

    def use(self, adapter: Path | None) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.base = self.model.unload()  # the base weights, adapter layers removed
        self.model = self.base if adapter is None else PeftModel.from_pretrained(self.base, adapter).eval()

    def generate(self, prompts: list[str], max_new_tokens: int = 160) -> list[tuple[str, bool]]:
        """Greedy answers of the current model: (text, ended with the end-of-turn token)."""
        from sloth_daemon.prompting import render_prompt

        out = []
        for p in prompts:
            text = render_prompt(self.tokenizer, "chat", [{"role": "user", "content": p}])
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").to(self.device)
            with self.torch.no_grad():
                gen = self.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                          eos_token_id=self.tokenizer.eos_token_id,
                                          pad_token_id=self.tokenizer.pad_token_id)
            new = gen[0, ids["input_ids"].shape[1]:]
            ended = bool(len(new) and int(new[-1]) == self.tokenizer.eos_token_id)
            out.append((self.tokenizer.decode(new, skip_special_tokens=True), ended))
        return out

    def score(self, pairs: list[tuple[str, str]], kl: bool = False) -> list[Any]:
        from sloth_daemon.trainer.scoring import score_examples

        if not pairs:
            return []
        return score_examples(self.model, self.tokenizer, [_ex(q, a) for q, a in pairs], self.max_len,
                              self.device, kl_to_base=kl and hasattr(self.model, "disable_adapter"))


def _share(xs: list[bool]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


async def run_config(name: str, overrides: dict, args, model: Path, anchors: list[tuple[list, str]],
                     facts: list[dict], scorer: Scorer, base_ref: dict, work: Path) -> dict:
    from sloth_daemon.adapters import AdapterRegistry
    from sloth_daemon.config import load_config
    from sloth_daemon.engine.embedded import EmbeddedEngine
    from sloth_daemon.store_worker import StoreWorker
    from sloth_daemon.updater import Updater

    state = work / name
    cfg = load_config(None, env={}, overrides={"state_dir": str(state), "device": args.device,
                                                  **args.overrides, **overrides})
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    store = StoreWorker(cfg.replay_db, cfg.state_dir / "turn-journal.jsonl")
    registry = AdapterRegistry(cfg.adapters_dir)
    engine = EmbeddedEngine(model, model_name=model.name, device=args.device)
    await engine.start()
    for prompt, answer in anchors:
        await store.write(lambda s, p=prompt, a=answer: s.add_anchor(p, a))
    updater = Updater(cfg, store, registry, engine, model)
    updater.ready.set()
    rows: list[dict] = []

    async def update(label: str, pairs: list[tuple[str, str]]) -> dict:
        for q, a in pairs:
            await store.write(lambda s, q=q, a=a: s.add_taught([{"role": "user", "content": q}], a))
        t0 = time.monotonic()
        uid = await updater.start("bench")
        await updater.wait()
        u = await store.read(lambda s: s.get_update(uid))
        pending, set_aside = await store.read(lambda s: (s.count_pending(), s.count_set_aside()))
        gate = (u["metrics"].get("gate") or {}).get("checks", [])
        train = u["metrics"].get("train") or {}
        return {"label": label, "update_id": uid, "verdict": u["status"], "reason": u["reason"],
                "steps": train.get("steps"), "phases": train.get("phases"),
                "seconds": round(time.monotonic() - t0, 2), "adapter": u["adapter_version"],
                "checks": [{k: c.get(k) for k in ("name", "passed", "measured", "bound")} for c in gate],
                "pending_after": pending, "set_aside_after": set_aside,
                "anchor_eval": (u["metrics"].get("eval") or {}).get("anchor")}

    try:
        for r in range(args.rounds):
            new = facts[r * args.facts:(r + 1) * args.facts]
            row = await update(f"round {r + 1}", [(f["question"], f["answer"]) for f in new])
            served = registry.current()
            scorer.use(registry.path(served) if served else None)
            taught = facts[:(r + 1) * args.facts]
            exact = [s.exact for s in scorer.score([(f["question"], f["answer"]) for f in taught])]
            para = [s.exact for s in scorer.score([(f["paraphrase"], f["answer"]) for f in taught])]
            builtin = [s.exact for s in scorer.score(base_ref["builtin"])]
            builtin_held = [ok for ok, h in zip(builtin, base_ref["builtin_heldout"]) if h]
            probes = scorer.score(base_ref["probes"], kl=True)
            kls = [s.kl for s in probes if s.kl is not None]
            row.update({
                "round": r + 1, "served": served,
                "recall_round1": _share(exact[:args.facts]), "recall_newest": _share(exact[-args.facts:]),
                "recall_all": _share(exact), "paraphrases": _share(para),
                "builtin_kept": (round(sum(builtin) / base_ref["builtin_base"], 4)
                                 if base_ref["builtin_base"] else None),
                "builtin_heldout": _share(builtin_held),
                "probe_changed": _share([not s.exact for s in probes]),
                "probe_kl": round(sum(kls) / len(kls), 5) if kls else 0.0,
            })
            rows.append(row)
            print(_line(name, row), flush=True)
            if name == "poisoned" and r + 1 == 2:
                poison = [(f["question"], f"{f['answer'].split(' ')[0]} has no idea, sorry.")
                          for f in facts[:args.facts]]
                rows.append(await update("poison: contradicts round 1", poison))
                print(_line(name, rows[-1]), flush=True)
            if name == "poisoned" and r + 1 == 4:
                rng = random.Random(7)
                garbage = [(p, "".join(rng.choice("qxzjvkw ") for _ in range(40)).strip())
                           for p in GARBAGE_PROMPTS]
                rows.append(await update("poison: garbage answers", garbage))
                print(_line(name, rows[-1]), flush=True)
    finally:
        await updater.close()  # the warm trainer process of this configuration
        await engine.stop()
        store.close()
    return {"config": name, "overrides": {**args.overrides, **overrides}, "rows": rows}


def _line(name: str, r: dict) -> str:
    if "round" not in r:
        return f"{name:<11} {r['label']:<28} {r['verdict']:<9} {r['seconds']:>6.1f}s  {(r['reason'] or '')[:110]}"
    return (f"{name:<11} round {r['round']:>2}  {r['verdict']:<9} {r['seconds']:>6.1f}s  r1 {r['recall_round1']:.2f}"
            f"  new {r['recall_newest']:.2f}  all {r['recall_all']:.2f}  para {r['paraphrases']:.2f}  builtin "
            f"{r['builtin_kept'] if r['builtin_kept'] is not None else '-'} (held-out {r['builtin_heldout']})  changed {r['probe_changed']:.2f}"
            f"  KL {r['probe_kl']:.4f}")


def summarise(result: dict, facts_per_round: int) -> dict:
    rounds = [r for r in result["rows"] if "round" in r]
    poison = [r for r in result["rows"] if "round" not in r]
    last = rounds[-1]
    return {
        "config": result["config"],
        "round1_recall_final": last["recall_round1"],
        "recall_all_final": last["recall_all"],
        "own_round_min": min(r["recall_newest"] for r in rounds),
        "builtin_kept_min": min((r["builtin_kept"] for r in rounds if r["builtin_kept"] is not None), default=None),
        "builtin_heldout_final": last.get("builtin_heldout"),
        "probe_changed_final": last["probe_changed"],
        "probe_kl_final": last["probe_kl"],
        "promoted": sum(r["verdict"] == "promoted" for r in rounds),
        "rounds": len(rounds),
        "update_seconds_median": sorted(r["seconds"] for r in rounds)[len(rounds) // 2],
        "poison": [{"label": p["label"], "verdict": p["verdict"], "reason": p["reason"]} for p in poison],
    }


def print_table(summary: list[dict]) -> None:
    head = ("config", "round-1 recall", "all recall", "own round min", "built-in kept min",
            "held-out built-in", "probes changed",
            "probe KL", "promoted", "update s (median)")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for s in summary:
        cells = [s["config"], f"{s['round1_recall_final']:.0%}", f"{s['recall_all_final']:.0%}",
                 f"{s['own_round_min']:.0%}",
                 "-" if s["builtin_kept_min"] is None else f"{s['builtin_kept_min']:.0%}",
                 "-" if s.get("builtin_heldout_final") is None else f"{s['builtin_heldout_final']:.0%}",
                 f"{s['probe_changed_final']:.0%}", f"{s['probe_kl_final']:.4f}", f"{s['promoted']}/{s['rounds']}",
                 f"{s['update_seconds_median']:.1f}"]
        print("| " + " | ".join(cells) + " |")
    for s in summary:
        for p in s["poison"]:
            print(f"{s['config']}: {p['label']}: {p['verdict']}: {p['reason']}")


async def amain(args) -> dict:
    import torch

    from sloth_daemon.anchors import ensure_anchors
    from sloth_daemon.default_model import DEFAULT_MODEL_NAME, builtin_qa, ensure_default_model
    from sloth_daemon.engine.embedded import EmbeddedEngine
    from sloth_daemon.config import GateConfig
    from sloth_daemon.gate import heldout_anchors
    from sloth_daemon.store_worker import StoreWorker
    from sloth_replay import make_example

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="bench-retention-"))
    try:
        model = Path(args.model) if args.model else ensure_default_model(Path(args.model_cache))
        # Anchors once, from the base model, exactly as the daemon makes them at first start.
        engine = EmbeddedEngine(model, model_name=model.name, device=args.device)
        await engine.start()
        anchor_store = StoreWorker(work / "anchors.db", work / "anchors-journal.jsonl")
        await ensure_anchors(anchor_store, engine, max_tokens=96, model_path=model)
        anchors = [(a.prompt, a.answer) for a in await anchor_store.read(lambda s: s.anchors())]
        anchor_store.close()
        await engine.stop()

        scorer = Scorer(model, args.device)
        probe_answers = scorer.generate(BENCH_PROBES)
        probes = [(p, text) for p, (text, ended) in zip(BENCH_PROBES, probe_answers) if ended and text.strip()]
        builtin = builtin_qa() if model.name == DEFAULT_MODEL_NAME or args.builtin else []
        # Built-in questions that are held-out anchors (never trained on) are scored apart from the rest.
        held = {(a.prompt[0]["content"], a.answer) for a in heldout_anchors(
            [make_example("chat", p, a, "anchor") for p, a in anchors], GateConfig().anchor_holdout_fraction)[1]}
        base_ref = {"builtin": builtin, "probes": probes, "builtin_heldout": [p in held for p in builtin],
                    "builtin_base": sum(s.exact for s in scorer.score(builtin))}
        print(f"model {model} on {args.device}: {len(anchors)} anchors, {len(probes)} benchmark probes, "
              f"built-in answered by the base: {base_ref['builtin_base']}/{len(builtin)}", flush=True)
        facts = make_facts(args.rounds * args.facts, args.seed)
        results = []
        for name in args.configs:
            results.append(await run_config(name, CONFIGS[name], args, model, anchors, facts, scorer, base_ref,
                                            work))
        summary = [summarise(r, args.facts) for r in results]
        return {"model": str(model), "device": args.device, "rounds": args.rounds, "facts_per_round": args.facts,
                "overrides": args.overrides, "anchors": len(anchors), "bench_probes": len(probes),
                "builtin_base": base_ref["builtin_base"], "builtin_total": len(builtin),
                "summary": summary, "results": results, "facts": facts}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _parse_set(items: list[str]) -> dict:
    import tomllib

    out = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="local Hugging Face model folder (default: the built-in sloth-tiny)")
    ap.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "sloth-bench-models"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--facts", type=int, default=5)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="daemon setting for every configuration, e.g. train.steps=60 (repeatable)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--builtin", action="store_true", help="score the built-in questions on a model other than sloth-tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/retention.json")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="combine reports of runs made apart (one configuration each, e.g. in parallel) into one")
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        report = {**parts[0], "summary": [s for p in parts for s in p["summary"]],
                  "results": [r for p in parts for r in p["results"]], "seconds": max(p["seconds"] for p in parts),
                  "merged_from": [Path(p).name for p in args.merge]}
        print_table(report["summary"])
        Path(args.out).write_text(json.dumps(report, indent=2))
        return
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    args.overrides = _parse_set(args.set)
    t0 = time.monotonic()
    report = asyncio.run(amain(args))
    report["seconds"] = round(time.monotonic() - t0, 1)
    print_table(report["summary"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{report['seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
