"""Self-synthesised rehearsal: anchor examples made by the base model itself from probe prompts.

A home user has no copy of the base model's training data, so at first start the daemon asks the *base* model (no
adapter) a fixed set of general prompts, greedily, and stores its answers as anchor examples. Updates mix them into
every batch and the gate checks their loss, which holds the base model's general behaviour while it learns.

Contract: `ensure_anchors(store, engine, max_tokens)` does nothing when anchors exist or when the engine already
serves an adapter (its answers would not be the base model's); otherwise it adds one anchor per probe prompt and
returns how many it added.
"""

from __future__ import annotations

import json
import logging
from importlib import resources

from sloth_replay import ReplayStore

from .engine.base import Engine, Finished, GenerationRequest, SamplingParams

log = logging.getLogger(__name__)


def probe_prompts() -> list[str]:
    return json.loads(resources.files("sloth_daemon.data").joinpath("probe_prompts.json").read_text())


async def ensure_anchors(store: ReplayStore, engine: Engine, max_tokens: int) -> int:
    if store.count_anchors() > 0:
        return 0
    if engine.current_adapter is not None:
        log.warning("no anchor examples and an adapter is being served: anchors not generated")
        return 0
    added = 0
    for text in probe_prompts():
        messages = [{"role": "user", "content": text}]
        req = GenerationRequest("chat", messages, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        answer = None
        async for ev in engine.generate(req):
            if isinstance(ev, Finished):
                answer = ev.text
        if answer and answer.strip():
            added += store.add_anchor(messages, answer)[1]
    log.info("anchors: generated %d from the base model", added)
    return added
