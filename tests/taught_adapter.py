"""A LoRA adapter taught non-ASCII answers by the real trainer (`python -m sloth_daemon.trainer`, as an update runs
it), and a way to put an adapter into a state dir as the served version, as a promoted update leaves it.

Used by the stop-string tests on both engines: greedy decoding with this adapter answers "Where do I live?" with
"You live in Zürich." ("ü" is two bytes, so two tokens of sloth-tiny's byte-level tokenizer).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from sloth_daemon.adapters import AdapterRegistry
from sloth_daemon.trainer.job import LoraSpec, TrainExample, TrainJob
from sloth_daemon.trainer.process import TrainerProcess

QUESTION = "Where do I live?"
ANSWER = "You live in Zürich."
# stop strings, and what the answer becomes with them
STOP_CUTS = [
    (["Zü"], "You live in "),
    (["ü"], "You live in Z"),
    (["xyz", "rich"], "You live in Zü"),
    (["ich.", "Zürich"], "You live in "),  # the earliest match wins
    (["Zx", "Zü"], "You live in "),
    (["üx"], ANSWER),  # a prefix that never completes is sent in the end
    ([], ANSWER),
]
TAUGHT = [TrainExample(id="zurich", kind="chat", prompt=[{"role": "user", "content": QUESTION}], answer=ANSWER)]


def train_taught_adapter(model: Path, out: Path, *, steps: int = 16, timeout_s: float = 600,
                         quantize: str = "none") -> Path:
    """Train `TAUGHT` into a fresh LoRA on `model` (on its NF4 base with `quantize="nf4"`, as the trainer's GPU
    default does); returns the adapter folder `out`."""
    out.mkdir(parents=True, exist_ok=True)
    job = TrainJob(base_model=str(model), output_dir=str(out), batches=[TAUGHT * 2] * steps,
                   eval_sets={"new": TAUGHT},
                   lora=LoraSpec(r=8, alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
                   learning_rate=3e-3, max_seq_len=128, device="cpu", seed=0, quantize=quantize)
    result = asyncio.run(TrainerProcess().run(job, out.parent / f"{out.name}-run", lambda _ev: None, timeout_s))
    assert result.eval["new"].candidate < 0.05, result
    return out


def serve_adapter(state_dir: Path, adapter: Path) -> str:
    """Commit `adapter` into the state dir's registry as a promoted version and make it CURRENT; its version."""
    (state_dir / "adapters").mkdir(parents=True, exist_ok=True)
    registry = AdapterRegistry(state_dir / "adapters")
    staging = registry.new_staging_dir()
    shutil.copytree(adapter, staging, dirs_exist_ok=True)
    version = registry.commit(staging, parent=None, update_id=None).version
    registry.update_meta(version, status="promoted")
    registry.set_current(version)
    return version
