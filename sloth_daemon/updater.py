"""One update, from the scheduler's trigger to the swap: select → mix → train (child process) → gate → promote.

Contract:
- `start(trigger)` claims the update slot in the replay store (one update at a time, across processes too), returns
  the update id at once and runs the rest as a background task; `NothingToTrain` when no new example waits,
  `UpdateAlreadyRunning` (from the store) when one runs.
- Every update ends recorded in the store as `promoted`, `rejected` (gate failed, or the engine would not apply it)
  or `failed` (trainer crashed, timed out, or the daemon stopped it); a failed update leaves its examples pending.
- The adapter becomes a registry version only once fully written; it is served only after the gate passed and the
  engine confirmed it applies it; CURRENT is switched last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from sloth_replay import MixRatios, ReplayStore, build_batches, split_holdout

from . import testhooks
from .adapters import AdapterRegistry
from .config import DaemonConfig
from .engine.base import AdapterLoadError, Engine
from .gate import judge
from .trainer.job import LoraSpec, TrainExample, TrainJob
from .trainer.process import TrainerFailed, TrainerProcess

log = logging.getLogger(__name__)


class NothingToTrain(RuntimeError):
    pass


def _train_examples(examples: list[Any]) -> list[TrainExample]:
    return [TrainExample(id=e.id, kind=e.kind, prompt=e.prompt, answer=e.answer) for e in examples]


def _sample(examples: list[Any], n: int, seed: int) -> list[Any]:
    if len(examples) <= n:
        return list(examples)
    return random.Random(seed).sample(examples, n)


class Updater:
    def __init__(self, cfg: DaemonConfig, store: ReplayStore, registry: AdapterRegistry, engine: Engine,
                 base_model: Path, on_change: Callable[[], None] = lambda: None):
        self.cfg = cfg
        self.store = store
        self.registry = registry
        self.engine = engine
        self.base_model = base_model
        self.on_change = on_change  # told when progress or the served version changes (status lines)
        self.ready = asyncio.Event()  # set once anchors exist (or are disabled): updates wait for it
        self._task: asyncio.Task | None = None
        self._trainer: TrainerProcess | None = None
        self._swap_lock = asyncio.Lock()
        self._stop_reason: str | None = None  # set by stop(): the reason the stopped update is recorded with
        self._stoppable = False  # True until training ends; past that (gate, commit, swap) an update runs to its end
        self.progress: dict[str, Any] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- starting -------------------------------------------------------------------------------------------------
    def start(self, trigger: str) -> int:
        if self.store.count_pending() == 0:
            raise NothingToTrain("no new training examples are waiting; teach, correct or rate answers first")
        update_id = self.store.begin_update(trigger=trigger, base_adapter=self.registry.current())
        self.progress = {"update_id": update_id, "progress": 0.0, "message": "starting"}
        self._stoppable = True
        self._task = asyncio.get_running_loop().create_task(self._run(update_id), name=f"update-{update_id}")
        self.on_change()
        return update_id

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self, reason: str = "daemon stopping") -> None:
        """Stop a running update. While it waits or trains, the trainer is killed, its partial output discarded, and
        the update recorded as failed with `reason` (its examples are pending again, so it can run again); an
        update already past training (gate, commit, swap) is left to finish, up to 30 s."""
        self._stop_reason = reason
        if self._task is None or self._task.done():
            return
        if self._stoppable:
            self._task.cancel()
        await asyncio.wait({self._task}, timeout=30)

    # -- the update itself ----------------------------------------------------------------------------------------
    def _device(self) -> str:
        if self.cfg.device != "auto":
            return self.cfg.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def _job(self, update_id: int, staging: Path) -> tuple[TrainJob, list[str], bool]:
        cfg, tc = self.cfg, self.cfg.train
        seed = tc.seed + update_id
        pending = self.store.pending_examples()
        train_new, heldout = split_holdout(
            pending, fraction=cfg.gate.holdout_fraction, min_examples=cfg.gate.min_holdout_examples, seed=seed
        )
        replay, anchors = self.store.replay_pool(), self.store.anchors()
        batches = build_batches(
            train_new, replay, anchors,
            ratios=MixRatios(new=cfg.mix.new, replay=cfg.mix.replay, anchor=cfg.mix.anchor),
            steps=tc.steps, batch_size=tc.batch_size, seed=seed,
        )
        n_eval = cfg.gate.max_eval_examples
        eval_sets = {
            "new": _train_examples(_sample(heldout or train_new, n_eval, seed)),
            "anchor": _train_examples(_sample(anchors, n_eval, seed)),
            "recall": _train_examples(_sample(replay, n_eval, seed)),
        }
        device = self._device()
        current = self.registry.current()
        job = TrainJob(
            base_model=str(self.base_model),
            parent_adapter=str(self.registry.path(current)) if current else None,
            output_dir=str(staging),
            batches=[_train_examples(b) for b in batches],
            eval_sets=eval_sets,
            lora=LoraSpec(r=tc.lora_r, alpha=tc.lora_alpha, dropout=tc.lora_dropout, target_modules=tc.target_modules),
            learning_rate=tc.learning_rate,
            max_seq_len=tc.max_seq_len,
            quantize=("nf4" if device == "cuda" else "none") if tc.quantize == "auto" else tc.quantize,
            kernels=(device == "cuda") if tc.kernels == "auto" else tc.kernels == "on",
            offload=tc.offload_activations,
            device=device,
            seed=seed,
        )
        return job, [e.id for e in pending], bool(heldout)

    def _on_progress(self, update_id: int, event: dict) -> None:
        if event.get("event") != "progress":
            log.info("update %d: %s", update_id, event.get("message", event))
            return
        frac = event["step"] / max(1, event["steps"])
        msg = f"step {event['step']}/{event['steps']} loss {event['loss']:.4f}"
        self.progress = {"update_id": update_id, "progress": frac, "message": msg}
        self.store.set_update_progress(update_id, frac, msg)
        self.on_change()

    async def _run(self, update_id: int) -> None:
        t0 = time.monotonic()
        staging: Path | None = None
        try:
            await self.ready.wait()
            staging = self.registry.new_staging_dir()
            job, example_ids, heldout = self._job(update_id, staging)
            self._trainer = TrainerProcess()
            # An engine may lend the trainer its GPU memory meanwhile (vLLM's sleep mode); serving pauses then.
            training = getattr(self.engine, "training", None)
            async with training() if training is not None else contextlib.nullcontext():
                result = await self._trainer.run(
                    job, self.cfg.runs_dir / f"update-{update_id:06d}",
                    lambda ev: self._on_progress(update_id, ev), self.cfg.train.timeout_s,
                )
            self._stoppable = False
            verdict = judge(result.eval, self.cfg.gate, new_is_heldout=heldout)
            metrics = {"train": result.model_dump(exclude={"eval"}), "eval": {k: v.model_dump() for k, v in result.eval.items()},
                       "gate": verdict.model_dump(), "heldout": heldout, "seconds": round(time.monotonic() - t0, 2)}
            parent = self.registry.current()
            info = self.registry.commit(staging, parent=parent, update_id=update_id, metrics=metrics)
            staging = None
            if not verdict.promote:
                self.registry.update_meta(info.version, status="rejected", reason=verdict.reason)
                self.store.finish_update(update_id, status="rejected", adapter_version=info.version, metrics=metrics,
                                         reason=verdict.reason, example_ids=example_ids)
                log.warning("update %d: %s rejected: %s", update_id, info.version, verdict.reason)
                return
            try:
                await self.promote(info.version)
            except AdapterLoadError as e:
                self.registry.update_meta(info.version, status="rejected", reason=str(e))
                self.store.finish_update(update_id, status="rejected", adapter_version=info.version, metrics=metrics,
                                         reason=str(e), example_ids=example_ids)
                log.error("update %d: %s not served: %s", update_id, info.version, e)
                return
            self.store.finish_update(update_id, status="promoted", adapter_version=info.version, metrics=metrics,
                                     reason=None, example_ids=example_ids)
            log.info("update %d: promoted %s (%s)", update_id, info.version, verdict.reason)
        except (TrainerFailed, asyncio.CancelledError, Exception) as e:
            reason = str(e) or type(e).__name__
            if isinstance(e, asyncio.CancelledError):
                reason = self._stop_reason or "stopped by the daemon"
                if self._trainer is not None:
                    await self._trainer.wait_gone()  # nothing writes into the staging folder once it is removed
            log.error("update %d failed: %s", update_id, reason)
            self.store.finish_update(update_id, status="failed", adapter_version=None, metrics={}, reason=reason,
                                     example_ids=[])
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self._stoppable = False
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            self._trainer = None
            self.progress = None
            self.on_change()

    # -- serving a version ------------------------------------------------------------------------------------------
    async def promote(self, version: str) -> None:
        """Serve `version` (a candidate that passed the gate, or an older promoted one: rollback)."""
        async with self._swap_lock:
            self.registry.update_meta(version, status="promoted")
            await self.engine.swap_adapter(version, self.registry.path(version))
            await testhooks.hold_async("adapter-swap")  # crash tests stop here: served in memory, not on disk
            self.registry.set_current(version)
        self.on_change()

    async def rollback(self, version: str | None) -> None:
        if version is not None and self.registry.get(version).status != "promoted":
            raise ValueError(f"{version} was never promoted (status {self.registry.get(version).status}); "
                             "only promoted versions can be served")
        if version is None:
            async with self._swap_lock:
                await self.engine.swap_adapter(None, None)
                self.registry.set_current(None)
            self.on_change()
        else:
            await self.promote(version)
