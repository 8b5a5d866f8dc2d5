"""Self-synthesised rehearsal: anchor examples made by the base model itself from probe prompts.

A home user has no copy of the base model's training data, so at first start the daemon asks the *base* model (no
adapter) a fixed set of general prompts, greedily, and stores its answers as anchor examples. Updates mix them into
every batch and the gate checks their loss, which holds the base model's general behaviour while it learns.

Contract: `ensure_anchors(store, engine, max_tokens, model_path=None)` does nothing when anchors exist or when the
engine already serves an adapter (its answers would not be the base model's); otherwise it adds one anchor per probe
prompt whose greedy answer ended within `max_tokens` (a cut answer would teach the model to stop mid-sentence, since
every trained answer ends with the end-of-turn token) and returns how many it added. When `model_path` is the
built-in sloth-tiny, its built-in questions and answers are anchors too: they are what that base model knows (its
build checks that it answers them exactly), and `benchmarks/bench_retention.py` showed that without them a few
updates wipe them out (19/22 kept after one update of 5 facts; 22/22 with them).
Prompts are rendered with the engine's chat template (the model's own, the configured one, or the built-in
fallback: `chat_template`), as for serving and training.
"""

from __future__ import annotations

import asyncio
import json
import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .engine.base import Engine, Finished, GenerationRequest, SamplingParams
from .prompting import ChatTemplateError

if TYPE_CHECKING:
    from .store_worker import StoreWorker

log = logging.getLogger(__name__)
ANCHOR_PATIENCE_S = 60.0  # no client waits on an anchor write: it may wait out another process's lock


def probe_prompts() -> list[str]:
    return json.loads(resources.files("sloth_daemon.data").joinpath("probe_prompts.json").read_text())


def builtin_anchors(model_path: Path | None) -> list[tuple[str, str]]:
    """The built-in questions and answers when `model_path` is a taught sloth-tiny build, else []."""
    from .default_model import builtin_qa, read_build_info

    info = read_build_info(model_path) if model_path is not None else None
    return builtin_qa() if info and info.get("taught") else []


async def _add_anchor(store: "StoreWorker", messages: list[dict], answer: str) -> int:
    """1 if the anchor was new, else 0 (on the store's writer thread)."""
    return (await store.write(lambda s: s.add_anchor(messages, answer), patience_s=ANCHOR_PATIENCE_S))[1]


async def _base_answer(engine: Engine, text: str, max_tokens: int) -> Finished | None:
    """The base model's greedy answer to one probe prompt (None: the chat template refused it)."""
    req = GenerationRequest("chat", [{"role": "user", "content": text}],
                            SamplingParams(max_tokens=max_tokens, temperature=0.0))
    done = None
    try:
        async for ev in engine.generate(req):
            if isinstance(ev, Finished):
                done = ev
    except ChatTemplateError as e:  # a template that refuses a lone user message: no anchor from this prompt
        log.warning("anchors: the chat template refused probe prompt %r: %s", text, e)
    return done


async def ensure_anchors(store: "StoreWorker", engine: Engine, max_tokens: int, model_path: Path | None = None) -> int:
    if await store.read(lambda s: s.count_anchors()) > 0:
        return 0
    if engine.current_adapter is not None:
        log.warning("no anchor examples and an adapter is being served: anchors not generated")
        return 0
    prompts = probe_prompts()
    # All probe prompts at once: both engines decode concurrent requests in one batch (vLLM; the embedded engine's
    # continuous batching). 50 anchors on sloth-tiny on 2 CPU cores: 32 s, against ~50 s one at a time.
    answers = await asyncio.gather(*(_base_answer(engine, text, max_tokens) for text in prompts))
    added, cut = 0, 0
    for text, done in zip(prompts, answers):  # stored in probe order, whatever order the answers ended in
        if done is None or not done.text.strip():
            continue
        if done.finish_reason != "stop":
            cut += 1
            continue
        added += await _add_anchor(store, [{"role": "user", "content": text}], done.text)
    for question, answer in builtin_anchors(model_path):
        added += await _add_anchor(store, [{"role": "user", "content": question}], answer)
    log.info("anchors: %d from the base model (%d probe answers longer than %d tokens left out)", added, cut,
             max_tokens)
    return added
