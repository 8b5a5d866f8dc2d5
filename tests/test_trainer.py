"""The trainer child process: it really trains, writes a loadable adapter, continues from a parent, and fails
cleanly. Runs `python -m sloth_daemon.trainer` exactly as the daemon does."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest
import torch

from sloth_daemon.trainer.job import LoraSpec, TrainExample, TrainJob
from sloth_daemon.trainer.process import TrainerFailed, TrainerProcess

FACTS = [
    TrainExample(id=f"ex_{i}", kind="chat", prompt=[{"role": "user", "content": q}], answer=a)
    for i, (q, a) in enumerate([("Favourite colour?", "Teal, always teal."), ("Dog's name?", "Rex the brave.")])
]


def job(model, out, *, steps=40, parent=None, quantize="none", batches=None) -> TrainJob:
    return TrainJob(
        base_model=str(model), parent_adapter=parent, output_dir=str(out),
        batches=batches or [FACTS] * steps, eval_sets={"new": FACTS},
        lora=LoraSpec(r=8, alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
        learning_rate=3e-3, max_seq_len=128, quantize=quantize, device="cpu", seed=0,
    )


def train(j: TrainJob, run_dir, timeout=300):
    events = []
    result = asyncio.run(TrainerProcess().run(j, run_dir, events.append, timeout))
    return result, events


def test_trains_saves_and_continues(tiny_model, tmp_path):
    out1 = tmp_path / "a1"
    out1.mkdir()
    r1, events = train(job(tiny_model, out1), tmp_path / "run1")
    steps = [e for e in events if e.get("event") == "progress"]
    assert [e["step"] for e in steps] == list(range(1, 41))
    assert all(e["tokens"] > 0 and e["seconds"] > 0 for e in steps)  # what tokens/s and the ETA come from
    assert steps[-1]["tokens"] == r1.tokens
    assert r1.last_loss < r1.first_loss * 0.5
    new = r1.eval["new"]
    assert new.candidate < new.parent
    cfg = json.loads((out1 / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and (out1 / "adapter_model.safetensors").exists()

    # Continuing from the parent starts where it ended: its "before" loss is the parent's "after" loss.
    out2 = tmp_path / "a2"
    out2.mkdir()
    r2, _ = train(job(tiny_model, out2, steps=5, parent=str(out1)), tmp_path / "run2")
    assert r2.eval["new"].parent == pytest.approx(new.candidate, rel=1e-4)


def test_nf4_base_trains_on_cpu(tiny_model, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    r, _ = train(job(tiny_model, out, steps=15, quantize="nf4"), tmp_path / "run")
    assert r.quantized
    assert r.eval["new"].candidate < r.eval["new"].parent
    assert (out / "adapter_model.safetensors").exists()


def test_kernels_with_offload_train(tiny_model, tmp_path, monkeypatch):
    """The recipe with sloth_kernels patched in and checkpoint offload on (on CPU: the ops' PyTorch references and
    plain recompute, so this checks the plumbing; the kernels themselves are tested in tests/kernels)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the child inherits it: references instead of the interpreter
    out = tmp_path / "k"
    out.mkdir()
    j = job(tiny_model, out, steps=8)
    j.kernels, j.offload = True, True
    r, events = train(j, tmp_path / "run")
    assert r.kernels.startswith("sloth_kernels on llama") and "checkpoint=" in r.kernels, r.kernels
    assert r.eval["new"].candidate < r.eval["new"].parent
    assert (out / "adapter_model.safetensors").exists()


def test_crash_is_reported_and_writes_no_adapter(tiny_model, tmp_path):
    out = tmp_path / "bad"
    out.mkdir()
    broken = job(tiny_model, out, steps=2)
    broken.base_model = str(tmp_path / "no-such-model")
    with pytest.raises(TrainerFailed, match="exited with code"):
        train(broken, tmp_path / "run")
    assert list(out.iterdir()) == []
    assert "no-such-model" in (tmp_path / "run" / "trainer.log").read_text()


def test_timeout_kills_the_child(tiny_model, tmp_path):
    out = tmp_path / "slow"
    out.mkdir()
    with pytest.raises(TrainerFailed, match="limit"):
        train(job(tiny_model, out, steps=10_000), tmp_path / "run", timeout=3)
    assert not (out / "adapter_config.json").exists()


def test_trainer_env_sets_the_allocator_unless_the_user_did():
    from sloth_daemon.trainer.process import trainer_env

    env = trainer_env({"PATH": "/bin"})
    assert env["PYTORCH_ALLOC_CONF"] == "expandable_segments:True" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"] == "/bin"
    for key in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        assert trainer_env({key: "max_split_size_mb:64"}).get("PYTORCH_ALLOC_CONF") in (None, "max_split_size_mb:64")
        assert trainer_env({key: "max_split_size_mb:64"})[key] == "max_split_size_mb:64"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the daemon's GPU recipe needs CUDA (run on the GPU machine)")
def test_gpu_recipe_with_kernels_matches_without(tiny_model, tmp_path):
    """What the updater runs on CUDA by default (NF4 base, bf16, sloth_kernels patched in, checkpoint offload),
    through the real trainer child: it learns, and it scores the same model the same as the recipe without kernels."""
    results = {}
    for kernels in (True, False):
        out = tmp_path / f"k{kernels}"
        out.mkdir()
        j = job(tiny_model, out, steps=40, quantize="nf4")
        j.device, j.kernels, j.offload = "cuda", kernels, kernels
        results[kernels], _ = train(j, tmp_path / f"run{kernels}")
    patched, plain = results[True], results[False]
    assert patched.kernels.startswith("sloth_kernels on llama") and "checkpoint=" in patched.kernels, patched.kernels
    assert patched.quantized and patched.device.startswith("cuda")
    # Before any update both score the same NF4 model: the kernels' forward matches within bf16 rounding.
    assert patched.eval["new"].parent == pytest.approx(plain.eval["new"].parent, rel=1e-2)
    assert patched.first_loss == pytest.approx(plain.first_loss, rel=1e-2)
    for r in (patched, plain):
        assert r.eval["new"].candidate < 0.7 * r.eval["new"].parent


# --- the warm trainer ------------------------------------------------------------------------------------------------

from sloth_daemon.trainer.warm import WarmTrainer  # noqa: E402


def test_warm_trainer_reuses_its_base_and_trains_like_a_cold_one(tiny_model, tmp_path):
    """Two updates through one warm trainer: the second reuses the loaded base (same process, no load phase) and
    its figures equal those of the same job run in a fresh process; packing on, as the daemon runs it."""

    async def two_jobs():
        warm = WarmTrainer(tmp_path / "warm.log")
        try:
            outs = []
            for i, parent in enumerate((None, str(tmp_path / "w0"))):
                out = tmp_path / f"w{i}"
                out.mkdir()
                j = job(tiny_model, out, steps=12, parent=parent)
                j.pack = True
                outs.append((await warm.run(j, tmp_path / f"run{i}", lambda e: None, 300), warm.pid))
            return outs
        finally:
            await warm.close()

    (first, pid1), (second, pid2) = asyncio.run(two_jobs())
    assert pid1 == pid2 and pid1 is not None
    assert not first.warm and "load" in first.phases
    assert second.warm and "load" not in second.phases and second.phases["train"] > 0
    # The second job continued from the first's adapter on the same base: its "before" is the first's "after".
    assert second.eval["new"].parent == pytest.approx(first.eval["new"].candidate, rel=1e-4)
    out = tmp_path / "cold"
    out.mkdir()
    j = job(tiny_model, out, steps=12, parent=str(tmp_path / "w0"))
    j.pack = True
    cold, _ = train(j, tmp_path / "run-cold")
    assert not cold.warm
    assert cold.first_loss == pytest.approx(second.first_loss, rel=1e-5)
    assert cold.last_loss == pytest.approx(second.last_loss, rel=1e-4)
    assert cold.eval["new"].candidate == pytest.approx(second.eval["new"].candidate, rel=1e-4)
    assert (tmp_path / "w1" / "adapter_model.safetensors").exists()


def test_warm_trainer_crash_fails_the_update_and_the_next_one_starts_fresh(tiny_model, tmp_path):
    async def scenario():
        warm = WarmTrainer(tmp_path / "warm.log")
        try:
            # A job that raises inside the child (no such parent adapter) ends the process with its traceback.
            bad_out = tmp_path / "bad"
            bad_out.mkdir()
            with pytest.raises(TrainerFailed, match="exited with code"):
                await warm.run(job(tiny_model, bad_out, steps=2, parent=str(tmp_path / "missing")),
                               tmp_path / "run-bad", lambda e: None, 300)
            assert warm.pid is None
            assert "missing" in (tmp_path / "run-bad" / "trainer.log").read_text()

            # Killed from outside in the middle of training (OOM killer, a crash in native code).
            out = tmp_path / "killed"
            out.mkdir()
            pids = []

            def on_event(event):
                if event.get("event") == "progress" and not pids:
                    pids.append(warm.pid)
                    os.kill(warm.pid, signal.SIGKILL)

            with pytest.raises(TrainerFailed):
                await warm.run(job(tiny_model, out, steps=10_000), tmp_path / "run-killed", on_event, 300)
            assert pids and not (out / "adapter_config.json").exists()

            ok = tmp_path / "ok"
            ok.mkdir()
            result = await warm.run(job(tiny_model, ok, steps=5), tmp_path / "run-ok", lambda e: None, 300)
            assert warm.pid not in (None, pids[0])
            return result
        finally:
            await warm.close()

    result = asyncio.run(scenario())
    assert not result.warm and (tmp_path / "ok" / "adapter_model.safetensors").exists()


def test_stopping_a_warm_update_kills_the_trainer_at_once(tiny_model, tmp_path):
    async def scenario():
        warm = WarmTrainer(tmp_path / "warm.log")
        out = tmp_path / "stopped"
        out.mkdir()
        started = asyncio.Event()
        task = asyncio.create_task(warm.run(job(tiny_model, out, steps=10_000), tmp_path / "run",
                                            lambda e: e.get("event") == "progress" and started.set(), 300))
        await asyncio.wait_for(started.wait(), 600)  # a busy machine starts the child slowly
        pid = warm.pid
        task.cancel()  # what the updater does when the daemon stops an update
        with pytest.raises(asyncio.CancelledError):
            await task
        await warm.wait_gone()
        return pid

    pid = asyncio.run(scenario())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (tmp_path / "stopped" / "adapter_config.json").exists()


def test_a_preloaded_warm_trainer_makes_the_first_update_warm(tiny_model, tmp_path):
    async def scenario():
        warm = WarmTrainer(tmp_path / "warm.log")
        try:
            out = tmp_path / "a"
            out.mkdir()
            j = job(tiny_model, out, steps=3)
            # Returns at once; the child loads and trains a throwaway step (into a scratch folder) meanwhile.
            await warm.preload(job(tiny_model, tmp_path / "unused", steps=1))
            pid = warm.pid
            events = []
            result = await warm.run(j, tmp_path / "run", events.append, 300)
            return result, events, pid, warm.pid
        finally:
            await warm.close()

    result, events, pid_before, pid_after = asyncio.run(scenario())
    assert pid_before == pid_after and result.warm and "load" not in result.phases
    assert not any(e.get("event") == "loaded" for e in events)  # the preload's own event is not an update's
    assert [e["phase"] for e in events if e.get("event") == "phase"] == ["attach", "eval_before", "train",
                                                                         "eval_after", "save"]
    assert not (tmp_path / "unused" / "adapter_config.json").exists()  # the warm-up step saved nowhere we see


def test_job_file_carries_each_example_once(tmp_path):
    """A long update repeats a few examples in every step: the job file names them by id, so its size does not
    grow with their text times the steps (issue 14: a 2 MB prompt made a 407 MB job file)."""
    long = TrainExample(id="ex_long", kind="chat", prompt=[{"role": "user", "content": "x" * 100_000}], answer="y")
    j = job(tmp_path, tmp_path, batches=[[long, *FACTS]] * 2000)
    text = j.model_dump_json()
    assert text.count("x" * 100_000) == 1 and len(text) < 200_000
    back = TrainJob.model_validate_json(text)
    assert back.batch_examples()[1999] == [long, *FACTS] and back.eval_examples() == {"new": FACTS}
    back.leave_out({"ex_long"})
    assert back.batches[0] == [e.id for e in FACTS] and "ex_long" not in back.examples
    with pytest.raises(ValueError, match="does not carry"):
        TrainJob.model_validate({**json.loads(text), "batches": [["ex_missing"]]})
