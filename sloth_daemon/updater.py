"""One update, from the scheduler's trigger to the swap: select → mix → train (child process) → gate → promote.

Contract:
- `await start(trigger)` claims the update slot in the replay store (one update at a time, across processes too),
  returns the update id at once and runs the rest as a background task; `NothingToTrain` when no new example waits,
  `UpdateAlreadyRunning` (from the store) when one runs, `StoreBusy` when the store's lock is held elsewhere.
- `stop(reason)` cancels a running update once (a second `stop` only waits): its failure is recorded with the first
  reason before the task ends, and that recording cannot itself be interrupted (SIGTERM's "daemon stopping" is in
  the store before the daemon exits). Store and file I/O run on the store worker's threads, never on the loop.
- What an update trains on and what its gate judges is `planning.plan_update`'s plan; the new examples it trains on
  are claimed in the store when training starts (they stop counting as pending).
- Every update ends recorded in the store as `promoted`, `rejected` (gate failed, or the engine would not apply it,
  or every new example contradicted an earlier answer) or `failed` (trainer crashed, timed out, or the daemon
  stopped it). A failed update leaves its examples pending; a rejected one sets them aside with its reason
  (`ReplayStore.requeue` makes them pending again); contradicting examples are set aside whatever the verdict.
- The adapter becomes a registry version only once fully written; it is served only after the gate passed and the
  engine confirmed it applies it; CURRENT is switched last.
- Rebuilds: while the served version is tainted (trained on forgotten data, `sloth_replay.forgetting`), every
  update is a rebuild: a fresh LoRA on the base (no parent: a tainted parent would hand the data down) trained on
  every learnt and pending example, judged also on the forgotten examples (`planning`, `gate`). Once one is
  promoted the kept text of the forgotten examples is deleted. `rebuild_if_needed` starts one (after a forget, and
  at start-up, so a crash in between only delays it); with nothing left to learn it serves the base model instead.
  Tainted versions are never served again by a rollback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from sloth_replay import MixRatios, UpdateAlreadyRunning, batch_counts, build_batches
from sloth_replay.forgetting import forgotten_examples, purge_forgotten, tainted_adapters

from . import testhooks
from .adapters import AdapterRegistry
from .config import DaemonConfig
from .engine.base import AdapterLoadError, Engine
from .gate import judge
from .placement import TrainPlacement, train_placement
from .planning import Plan, plan_update
from .housekeeping import prune
from .progress import training_progress
from .trainer.job import LoraSpec, TrainExample, TrainJob
from .trainer.launch import Launch
from .trainer.plan import planned_steps, step_tokens
from .trainer.process import TrainerFailed, TrainerProcess
from .trainer.warm import WarmTrainer

if TYPE_CHECKING:
    from .store_worker import StoreWorker

log = logging.getLogger(__name__)
VERDICT_PATIENCE_S = 30.0  # an update's own store reads/writes wait this long for another process's lock


class NothingToTrain(RuntimeError):
    pass


async def _uncancellable(aw: Any) -> Any:
    """Await `aw` to its end even if the awaiting task is cancelled meanwhile (the cancel is re-raised after)."""
    fut = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(fut)
            break
        except asyncio.CancelledError:
            if fut.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


def _train_examples(examples: list[Any], made: dict[str, TrainExample] | None = None) -> list[TrainExample]:
    """`examples` as the trainer's `TrainExample`s; `made` reuses those already made (batches repeat examples)."""
    made = {} if made is None else made
    out = []
    for e in examples:
        if e.id not in made:
            made[e.id] = TrainExample(id=e.id, kind=e.kind, prompt=e.prompt, answer=e.answer, tools=e.tools,
                                       tool_calls=e.tool_calls)
        out.append(made[e.id])
    return out


class Updater:
    def __init__(self, cfg: DaemonConfig, store: "StoreWorker", registry: AdapterRegistry, engine: Engine,
                 base_model: Path, on_change: Callable[[], None] = lambda: None):
        self.cfg = cfg
        self.store = store
        self.registry = registry
        self.engine = engine
        self.base_model = base_model
        self.on_change = on_change  # told when progress or the served version changes (status lines)
        self.ready = asyncio.Event()  # set once anchors exist (or are disabled): updates wait for it
        self._task: asyncio.Task | None = None
        self._trainer: TrainerProcess | WarmTrainer | None = None
        self._warm: WarmTrainer | None = None  # the long-lived trainer (train.warm), kept between updates
        self._timeline: dict[str, float] = {}  # wall-clock time (s) at which each phase of the running update ended
        self._swap_lock = asyncio.Lock()
        self._stop_reason: str | None = None  # set by stop(): the reason the stopped update is recorded with
        self._cancelled = False  # stop() cancels the task once; a second cancel would cut short its recording
        self._stoppable = False  # True until training ends; past that (gate, commit, swap) an update runs to its end
        self.progress: dict[str, Any] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- starting -------------------------------------------------------------------------------------------------
    async def start(self, trigger: str) -> int:
        # A running update first: its examples are not pending (they are claimed), so "nothing to train" would hide it.
        rebuild = await self.needs_rebuild()
        running, pending, replay = await self.store.read(
            lambda s: (s.running_update(), s.count_pending(), bool(rebuild and s.replay_pool())))
        if running is not None:
            raise UpdateAlreadyRunning(running["id"])
        if pending == 0 and not (rebuild and replay):
            raise NothingToTrain("no new training examples are waiting; teach, correct or rate answers first")
        base = None if rebuild else await asyncio.to_thread(self.registry.current)
        update_id = await self.store.write(lambda s: s.begin_update(trigger=trigger, base_adapter=base))
        self._timeline = {"trigger": time.time()}
        self.progress = {"update_id": update_id, "progress": 0.0, "message": "starting"}
        self._stoppable = True
        self._cancelled = False
        self._stop_reason = None
        self._task = asyncio.get_running_loop().create_task(self._run(update_id), name=f"update-{update_id}")
        self.on_change()
        return update_id

    async def needs_rebuild(self) -> bool:
        """Whether the served version was trained on forgotten data (the replay store's record decides)."""
        current = await asyncio.to_thread(self.registry.current)
        return current is not None and current in await self.store.read(tainted_adapters)

    async def rebuild_if_needed(self, trigger: str) -> dict | None:
        """Start a rebuild when the served version is tainted: {"update_id", "status": "running"}; with nothing left
        to learn, serve the base model: {"update_id": None, "status": "base"}. None when no rebuild is needed (the
        kept text of forgotten examples is deleted then: nothing served can carry them)."""
        if not await self.needs_rebuild():
            await self.store.write(purge_forgotten, patience_s=VERDICT_PATIENCE_S)
            return None
        if not await self.store.read(lambda s: s.count_pending() > 0 or bool(s.replay_pool())):
            await self.rollback(None)
            await self.store.write(purge_forgotten, patience_s=VERDICT_PATIENCE_S)
            log.warning("forgetting: nothing is left to learn; serving the base model")
            return {"update_id": None, "status": "base"}
        update_id = await self.start(trigger)
        log.warning("forgetting: the served adapter was trained on forgotten data; rebuild update %d started",
                    update_id)
        return {"update_id": update_id, "status": "running"}

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self, reason: str = "daemon stopping") -> None:
        """Stop a running update. While it waits or trains, the trainer is killed, its partial output discarded, and
        the update recorded as failed with `reason` (its examples are pending again, so it can run again); an
        update already past training (gate, commit, swap) is left to finish, up to 30 s."""
        if self._task is None or self._task.done():
            return
        if self._stoppable and not self._cancelled:
            self._stop_reason = reason
            self._cancelled = True
            self._task.cancel()
        await asyncio.wait({self._task}, timeout=30)

    async def close(self) -> None:
        """End the warm trainer (the daemon is stopping; call after `stop`)."""
        if self._warm is not None:
            await self._warm.close()
            self._warm = None

    async def preload(self) -> None:
        """On CUDA with a warm trainer: start it, load the base model and train one throwaway step now (in the
        background), so that the first update waits neither for the base to be loaded and quantised nor for the
        kernels to compile. Errors are logged; updates start the trainer again."""
        if not self._warm_wanted() or not self._device().startswith("cuda"):
            return
        try:
            device, tc = self._device(), self.cfg.train
            # One throwaway step on one made-up example, so the kernels compile before the first update needs them.
            warmup = TrainExample(id="warmup", kind="chat", prompt=[{"role": "user", "content": "Warm-up?"}],
                                  answer="Warm-up.")
            fmt = getattr(self.engine, "chat_format", None)
            job = TrainJob(
                base_model=str(self.base_model), output_dir="", batches=[[warmup]], device=device,
                chat_template=fmt.template if fmt else None,  # the warm-up example renders as updates will
                quantize=self._quantize(device), kernels=self._kernels(device), offload=tc.offload_activations,
                lora=LoraSpec(r=tc.lora_r, alpha=tc.lora_alpha, dropout=tc.lora_dropout,
                              target_modules=tc.target_modules),
                max_seq_len=tc.max_seq_len, pack=tc.pack,
            )
            await self._trainer_for_update().preload(job)  # type: ignore[union-attr]
        except Exception:
            log.exception("could not preload the trainer's base model; the first update loads it")

    def _warm_wanted(self) -> bool:
        # A vLLM that sleeps through updates wants the GPU back whole afterwards: no base may stay resident.
        # Several trainer processes (torchrun) cannot be a warm trainer: each update starts them afresh.
        return (self.cfg.train.warm and not (self.cfg.engine == "vllm" and self.cfg.vllm.sleep_during_updates)
                and self._placement().processes == 1)

    def _trainer_for_update(self) -> TrainerProcess | WarmTrainer:
        launch = Launch.for_placement(self._placement())
        if not self._warm_wanted():
            return TrainerProcess(launch)
        if self._warm is not None and self._warm.launch != launch:
            raise RuntimeError("the warm trainer runs on other devices; close it first")
        if self._warm is None:
            self._warm = WarmTrainer(self.cfg.runs_dir / "warm-trainer.log", launch)
        return self._warm

    # -- the update itself ----------------------------------------------------------------------------------------
    def _placement(self) -> TrainPlacement:
        """Where the next update trains (`train.devices`, else the engine's `device`; `placement.py`)."""
        return train_placement(self.cfg.train.devices, self.cfg.device, os.environ,
                               cuda_available=torch.cuda.is_available())

    def _device(self) -> str:
        return self._placement().device

    def _kernels(self, device: str) -> bool:
        tc = self.cfg.train
        return device.startswith("cuda") if tc.kernels == "auto" else tc.kernels == "on"

    def _quantize(self, device: str) -> str:
        """auto: NF4 on CUDA, and wherever the embedded engine serves from NF4 (an adapter is served on the base
        it was trained and judged on: one trained on the fp32 base recalled 1 of 5 facts on the NF4 base)."""
        tc = self.cfg.train
        if tc.quantize != "auto":
            return tc.quantize
        serves_nf4 = self.cfg.engine == "embedded" and self.cfg.embedded.quantization == "nf4"
        return "nf4" if device.startswith("cuda") or serves_nf4 else "none"

    def _job(self, update_id: int, staging: Path, pending: list, replay: list, anchors: list,
             forgotten: list | None) -> tuple[TrainJob | None, Plan]:
        """The training job and its plan (runs in a worker thread: it reads the registry and mixes the examples)."""
        cfg, tc = self.cfg, self.cfg.train
        seed = tc.seed + update_id
        plan = plan_update(pending, replay, anchors, cfg.gate, seed=seed, forgotten=forgotten)
        if not plan.train_new:
            return None, plan  # every new example contradicts an earlier answer
        ratios = MixRatios(new=cfg.mix.new, replay=cfg.mix.replay, anchor=cfg.mix.anchor)
        new_per_batch, _, _ = batch_counts(ratios, tc.batch_size, has_replay=bool(plan.replay),
                                           has_anchors=bool(plan.train_anchors))
        batches = build_batches(
            plan.train_new, plan.replay, plan.train_anchors, ratios=ratios,
            steps=planned_steps(tc, len(plan.train_new), new_per_batch), batch_size=tc.batch_size, seed=seed,
        )
        device = self._device()
        current = None if plan.rebuild else self.registry.current()
        chat_format = getattr(self.engine, "chat_format", None)
        made: dict[str, TrainExample] = {}
        job = TrainJob(
            base_model=str(self.base_model),
            chat_template=chat_format.template if chat_format else None,
            parent_adapter=str(self.registry.path(current)) if current else None,
            output_dir=str(staging),
            batches=[_train_examples(b, made) for b in batches],
            eval_sets={name: _train_examples(ex, made) for name, ex in plan.eval_sets.items()},
            kl_sets=["anchor"],
            lora=LoraSpec(r=tc.lora_r, alpha=tc.lora_alpha, dropout=tc.lora_dropout, target_modules=tc.target_modules),
            learning_rate=tc.learning_rate,
            weight_decay=tc.weight_decay,
            distill=[e.id for e in plan.train_anchors] if tc.anchor_loss == "kl" else [],
            distill_weight=tc.anchor_kl_weight,
            max_seq_len=tc.max_seq_len,
            quantize=self._quantize(device),
            kernels=self._kernels(device),
            offload=tc.offload_activations,
            device=device,
            seed=seed,
            pack=tc.pack,
            step_tokens=step_tokens(tc, device),
        )
        return job, plan

    def _on_progress(self, update_id: int, event: dict) -> None:
        if event.get("event") == "phase":
            self._timeline[event["phase"]] = event["time"]
            log.debug("update %d: %s done", update_id, event["phase"])
            return
        if event.get("event") != "progress":
            log.info("update %d: %s", update_id, event.get("message", event))
            return
        frac = event["step"] / max(1, event["steps"])
        msg = f"step {event['step']}/{event['steps']} loss {event['loss']:.4f}"
        self.progress = {"update_id": update_id, "progress": frac, "message": msg,
                         **training_progress(event, (self.progress or {}).get("loss_curve", []))}
        self.store.write_soon(lambda s: s.set_update_progress(update_id, frac, msg), f"update {update_id} progress")
        self.on_change()

    async def _run(self, update_id: int) -> None:
        t0 = time.monotonic()
        staging: Path | None = None
        try:
            await self.ready.wait()
            staging = await asyncio.to_thread(self.registry.new_staging_dir)
            rebuild = await self.needs_rebuild()
            examples = await self.store.read(lambda s: (s.pending_examples(), s.replay_pool(), s.anchors(),
                                                        forgotten_examples(s) if rebuild else None),
                                             patience_s=VERDICT_PATIENCE_S)
            job, plan = await asyncio.to_thread(self._job, update_id, staging, *examples)
            if job is None:
                reason = (f"nothing left to train: {len(plan.conflicts)} new example(s) contradict earlier answers "
                          "and were set aside (see status)")
                await self._finish(update_id, status="rejected", adapter_version=None,
                                   metrics={"plan": plan.summary()}, reason=reason, example_ids=[],
                                   set_aside=plan.conflicts)
                log.warning("update %d: %s", update_id, reason)
                return
            trained = plan.trained_ids
            await self.store.write(lambda s: s.claim_examples(update_id, trained), patience_s=VERDICT_PATIENCE_S)
            if self._warm is not None and (not self._warm_wanted()
                                           or self._warm.launch != Launch.for_placement(self._placement())):
                await self.close()  # switched off, or moved to other devices, by a reload
            self._trainer = self._trainer_for_update()
            placement = self._placement()
            log.info("update %d trains on %s (%d process%s)", update_id, ", ".join(placement.devices),
                     placement.processes, "es" if placement.processes > 1 else "")
            self._timeline["job"] = time.time()
            # An engine may lend the trainer its GPU memory meanwhile (vLLM's sleep mode); serving pauses then.
            training = getattr(self.engine, "training", None)
            async with training() if training is not None else contextlib.nullcontext():
                result = await self._trainer.run(
                    job, self.cfg.runs_dir / f"update-{update_id:06d}",
                    lambda ev: self._on_progress(update_id, ev), self.cfg.train.timeout_s,
                )
            await testhooks.hold_async("update-trained")  # tests act here: trained, status still shows it running
            self._stoppable = False
            verdict = judge(result.eval, self.cfg.gate, heldout_note=plan.heldout_note, rebuild=plan.rebuild)
            # The loss curve that status showed live stays in the record (the page plots it once the update is done).
            curve = (self.progress or {}).get("loss_curve", [])
            metrics = {"train": {**result.model_dump(exclude={"eval"}), "loss_curve": curve},
                       "eval": {k: v.model_dump() for k, v in result.eval.items()},
                       "gate": verdict.model_dump(), "plan": plan.summary(), "timeline": self._timeline,
                       "seconds": round(time.monotonic() - t0, 2)}
            example_ids = plan.trained_ids
            parent = None if plan.rebuild else await asyncio.to_thread(self.registry.current)
            info = await asyncio.to_thread(self.registry.commit, staging, parent=parent, update_id=update_id,
                                           metrics=metrics)
            self._timeline["commit"] = time.time()
            staging = None
            if not verdict.promote:
                await asyncio.to_thread(self.registry.update_meta, info.version, status="rejected",
                                        reason=verdict.reason)
                await self._finish(update_id, status="rejected", adapter_version=info.version, metrics=metrics,
                                   reason=verdict.reason, example_ids=example_ids, set_aside=plan.conflicts)
                log.warning("update %d: %s rejected: %s", update_id, info.version, verdict.reason)
                return
            try:
                await self.promote(info.version)
                self._timeline["swap"] = time.time()
            except AdapterLoadError as e:
                await asyncio.to_thread(self.registry.update_meta, info.version, status="rejected", reason=str(e))
                await self._finish(update_id, status="rejected", adapter_version=info.version, metrics=metrics,
                                   reason=str(e), example_ids=example_ids, set_aside=plan.conflicts)
                log.error("update %d: %s not served: %s", update_id, info.version, e)
                return
            await self._finish(update_id, status="promoted", adapter_version=info.version, metrics=metrics,
                               reason=None, example_ids=example_ids, set_aside=plan.conflicts)
            if plan.rebuild:  # nothing served carries them now
                await self.store.write(purge_forgotten, patience_s=VERDICT_PATIENCE_S)
            log.info("update %d: promoted %s (%s)", update_id, info.version, verdict.reason)
        except (TrainerFailed, asyncio.CancelledError, Exception) as e:
            reason = str(e) or type(e).__name__
            if isinstance(e, asyncio.CancelledError):
                reason = self._stop_reason or "stopped by the daemon"
            # Recorded whatever else arrives meanwhile (a second cancel must not leave the update `running`).
            await _uncancellable(self._record_failure(update_id, reason))
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self._stoppable = False
            self._trainer = None
            self.progress = None
            await _uncancellable(asyncio.to_thread(self._clean_up, staging))
            self.on_change()

    def _clean_up(self, staging: Path | None) -> None:
        """After an update (in a worker thread: file I/O): its staging folder, and old runs and rejected adapters."""
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        prune(self.cfg.runs_dir, self.registry, self.cfg.retention.keep_last)

    async def _record_failure(self, update_id: int, reason: str) -> None:
        if self._trainer is not None:
            await self._trainer.wait_gone()  # nothing writes into the staging folder once it is removed
        log.error("update %d failed: %s", update_id, reason)
        try:
            await self._finish(update_id, status="failed", adapter_version=None, metrics={}, reason=reason,
                               example_ids=[])
        except Exception:
            log.exception("update %d: could not record the failure (the next start marks it failed)", update_id)

    async def _finish(self, update_id: int, **verdict: Any) -> None:
        """Record an update's verdict; no client waits on it, so it may wait out another process's lock."""
        await self.store.write(lambda s: s.finish_update(update_id, **verdict), patience_s=VERDICT_PATIENCE_S)

    # -- serving a version ------------------------------------------------------------------------------------------
    async def promote(self, version: str) -> None:
        """Serve `version` (a candidate that passed the gate, or an older promoted one: rollback)."""
        async with self._swap_lock:
            await asyncio.to_thread(self.registry.update_meta, version, status="promoted")
            await self.engine.swap_adapter(version, self.registry.path(version))
            await testhooks.hold_async("adapter-swap")  # crash tests stop here: served in memory, not on disk
            await asyncio.to_thread(self.registry.set_current, version)
        self.on_change()

    async def rollback(self, version: str | None) -> None:
        if version is not None:
            info = await asyncio.to_thread(self.registry.get, version)
            if info.tainted:
                raise ValueError(f"{version} was trained on forgotten data ({info.tainted}); it is not served again")
            if info.status != "promoted":
                raise ValueError(f"{version} was never promoted (status {info.status}); only promoted versions can "
                                 "be served")
        if version is None:
            async with self._swap_lock:
                await self.engine.swap_adapter(None, None)
                await asyncio.to_thread(self.registry.set_current, None)
            self.on_change()
        else:
            await self.promote(version)
