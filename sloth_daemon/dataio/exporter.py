"""Taking what the daemon learnt elsewhere: an adapter version as a PEFT folder, a merged 16-bit Hugging Face model
with an Ollama Modelfile, and the learnt examples as JSONL that `sloth-daemon import` reads back.

Contract:
- `export_version(adapter_dir, base_model, base_name, out, merge=True, dtype="bfloat16")` writes
    out/adapter/    the PEFT adapter (adapter_config.json with `base_model_name_or_path` = `base_name`,
                    adapter_model.safetensors), `sloth_adapter.json` (version, parent, update, gate metrics) and a
                    README.md model card saying what it is and how to load it;
    out/merged/     the base with the adapter merged into its weights (peft's `merge_and_unload`), saved in `dtype`
                    (bfloat16 or float16) with the base's tokenizer, chat template and generation config: a plain
                    transformers/vLLM model folder;
    out/Modelfile   an Ollama Modelfile whose FROM is ./merged (Ollama imports safetensors folders of the Llama,
                    Mistral, Gemma and Phi families and reads the chat template from tokenizer_config.json), with
                    the daemon's sampling defaults and the end-of-turn stop token.
  `out` must not exist or be empty. Raises `ExportError` with a readable message.
- `export_examples(examples, fp)` writes one JSON object per example: chat -> `{"messages": prompt + [assistant
  answer]}` (OpenAI chat fine-tuning rows; an answer that calls tools is an assistant message with `tool_calls`,
  and the tools the prompt offered are the row's `tools`), completion -> `{"prompt", "completion"}`, document -> `{"text"}`;
  importing that file gives back the same examples (same content hashes). Returns the number written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable, TextIO

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "sloth_adapter.json")


class ExportError(RuntimeError):
    pass


def example_row(ex: Any) -> dict:
    """One stored example as the dataset row that imports back to it."""
    if ex.kind == "chat":
        answer: dict[str, Any] = {"role": "assistant", "content": ex.answer}
        if getattr(ex, "tool_calls", None):
            answer = {"role": "assistant", "content": ex.answer or None,
                      "tool_calls": [{"id": f"call_{j}", **c} for j, c in enumerate(ex.tool_calls)]}
        row: dict[str, Any] = {"messages": [*ex.prompt, answer]}
        if getattr(ex, "tools", None):
            row["tools"] = ex.tools
        return row
    if ex.kind == "completion":
        return {"prompt": ex.prompt, "completion": ex.answer}
    return {"text": ex.answer}


def export_examples(examples: Iterable[Any], fp: TextIO) -> int:
    n = 0
    for ex in examples:
        fp.write(json.dumps(example_row(ex), ensure_ascii=False) + "\n")
        n += 1
    return n


def _prepare(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)


def write_adapter(adapter_dir: Path, base_name: str, out: Path) -> dict:
    """The PEFT folder with the base model named; returns the adapter's metadata."""
    out.mkdir(parents=True)
    for name in ADAPTER_FILES:
        if (adapter_dir / name).exists():
            shutil.copy2(adapter_dir / name, out / name)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_name
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    meta = json.loads((adapter_dir / "sloth_adapter.json").read_text())
    gate = (meta.get("metrics") or {}).get("gate") or {}
    (out / "README.md").write_text(
        f"# {meta['version']}: a LoRA adapter for {base_name}\n\n"
        f"Trained by sloth-daemon (update {meta.get('update_id')}, parent {meta.get('parent') or 'the base model'}, "
        f"created {meta['created_at']}, status {meta['status']}).\n"
        f"Gate verdict: {gate.get('reason') or meta.get('reason') or 'n/a'}.\n\n"
        "Training metadata (losses, eval-gate measurements) is in `sloth_adapter.json`. Load it with peft:\n\n"
        "```python\nfrom peft import AutoPeftModelForCausalLM\n"
        "model = AutoPeftModelForCausalLM.from_pretrained(\"path/to/adapter\")\n```\n"
    )
    return meta


def write_merged(adapter_dir: Path, base_model: Path, out: Path, dtype: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch_dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(out)


def write_modelfile(out: Path, tokenizer_dir: Path, *, temperature: float, top_p: float) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    lines = ["# Ollama: ollama create <name> -f Modelfile   (made by sloth-daemon export)",
             "FROM ./merged", f"PARAMETER temperature {temperature}", f"PARAMETER top_p {top_p}"]
    if tok.eos_token:
        lines.append(f"PARAMETER stop {json.dumps(tok.eos_token)}")
    (out / "Modelfile").write_text("\n".join(lines) + "\n")


def export_version(adapter_dir: Path, base_model: Path, base_name: str, out: Path, *, merge: bool = True,
                   dtype: str = "bfloat16", temperature: float = 0.7, top_p: float = 1.0) -> dict:
    if dtype not in ("bfloat16", "float16"):
        raise ExportError(f"dtype must be bfloat16 or float16, not {dtype!r}")
    if not (adapter_dir / "adapter_config.json").exists():
        raise ExportError(f"{adapter_dir} holds no adapter")
    if not (base_model / "config.json").exists():
        raise ExportError(f"the base model folder {base_model} is missing (config.json not found)")
    _prepare(out)
    meta = write_adapter(adapter_dir, base_name, out / "adapter")
    if merge:
        write_merged(adapter_dir, base_model, out / "merged", dtype)
        write_modelfile(out, out / "merged", temperature=temperature, top_p=top_p)
    return meta
