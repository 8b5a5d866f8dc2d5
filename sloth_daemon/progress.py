"""A running update's training progress as status shows it, from the trainer's progress events.

Contract: `training_progress(event, curve)` takes one trainer event (`{"step", "steps", "loss", "tokens",
"seconds"}`: tokens and seconds so far in the training loop) and the loss curve so far, and returns the fields that
`GET /sloth/status` carries under `update` (besides `update_id`, `progress`, `message`):
`step`, `steps`, `loss` (None when not finite: JSON has no NaN), `tokens_per_s` (tokens trained per second so far),
`eta_s` (seconds left at the pace so far) and `loss_curve` (`[[step, loss], ...]`, every step: an update has a few
hundred at most). The CLI's progress bar, the status page's live plot and the metrics read these.
`train_tokens_per_s(train)` is a finished update's training throughput from its record (`metrics.train`).
"""

from __future__ import annotations

import math
from typing import Any


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def training_progress(event: dict, curve: list[list[float | None]]) -> dict[str, Any]:
    step, steps = int(event["step"]), int(event["steps"])
    seconds = float(event.get("seconds") or 0.0)
    tokens = int(event.get("tokens") or 0)
    loss = _finite(event.get("loss"))
    return {
        "step": step,
        "steps": steps,
        "loss": loss,
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
        "eta_s": round(seconds / step * (steps - step), 1) if step > 0 and seconds > 0 else None,
        "loss_curve": [*curve, [step, loss]],
    }


def train_tokens_per_s(train: dict) -> float | None:
    """Tokens trained per second of a finished update's training loop: `tokens` over `phases.train` (seconds), or
    over the whole trainer run `seconds` (loading and the gate's evaluation included) for a record without phases;
    None without tokens."""
    seconds = (train.get("phases") or {}).get("train") or train.get("seconds")
    return train["tokens"] / seconds if train.get("tokens") and seconds else None
