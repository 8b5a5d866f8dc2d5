"""The trainer across processes (torchrun + FSDP2, gloo on CPU) against the single-process trainer, on sloth-tiny.

The same `TrainJob` runs through the daemon's `TrainerProcess` with one process and with `Launch(processes=2)`
(`python -m sloth_daemon.trainer.distributed`, as the updater starts it when `train.devices` names two devices):
the same progress events and phases, losses and eval scores within float rounding, the same adapter, with a full-
precision base and with bitsandbytes' NF4 one (the QLoRA-FSDP recipe); a crash fails the same way (`TrainerFailed`,
nothing written); stopping it kills torchrun and every worker."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sloth_daemon.trainer.distributed import worker_threads
from sloth_daemon.trainer.job import LoraSpec, TrainExample, TrainJob
from sloth_daemon.trainer.launch import Launch
from sloth_daemon.trainer.process import TrainerFailed, TrainerProcess

FACTS = [TrainExample(id=f"ex_{i}", kind="chat", prompt=[{"role": "user", "content": q}], answer=a)
         for i, (q, a) in enumerate([("Favourite colour?", "Teal, always teal."), ("Dog's name?", "Rex the brave."),
                                     ("Cat's name?", "Tom, a grey one.")])]


def job(model, out: Path, *, steps: int = 4, **kw) -> TrainJob:
    out.mkdir(exist_ok=True)
    # Three examples split 2/1 over two processes; the one-example steps leave process 1 with nothing (a pad token).
    batches = kw.pop("batches", [FACTS] * steps + [[FACTS[0]]] * 2)
    return TrainJob(base_model=str(model), output_dir=str(out), batches=batches, eval_sets={"new": FACTS},
                    kl_sets=["new"], lora=LoraSpec(r=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
                    learning_rate=3e-3, max_seq_len=128, device="cpu", seed=0, pack=True, **kw)


def train(j: TrainJob, run_dir: Path, processes: int, timeout: float = 600):
    events: list[dict] = []
    result = asyncio.run(TrainerProcess(Launch(processes=processes)).run(j, run_dir, events.append, timeout))
    return result, events


def test_two_processes_train_like_one(tiny_model, tmp_path):
    one, ev1 = train(job(tiny_model, tmp_path / "a1"), tmp_path / "r1", 1)
    two, ev2 = train(job(tiny_model, tmp_path / "a2", kernels=True), tmp_path / "r2", 2)

    progress = [[e for e in ev if e["event"] == "progress"] for ev in (ev1, ev2)]
    assert [e["step"] for e in progress[1]] == [e["step"] for e in progress[0]] == list(range(1, 7))
    assert all(e["steps"] == 6 for e in progress[1])
    assert [e["tokens"] for e in progress[1]] == [e["tokens"] for e in progress[0]]  # the whole step's, not a share
    assert [e["loss"] for e in progress[1]] == pytest.approx([e["loss"] for e in progress[0]], rel=1e-4)
    assert [e["phase"] for e in ev2 if e["event"] == "phase"] == [e["phase"] for e in ev1 if e["event"] == "phase"]
    logs = [e["message"] for e in ev2 if e["event"] == "log"]
    assert sum("kernels: off under FSDP" in m for m in logs) == 1, logs  # said once, not once per process
    assert any("processes=2" in m for m in logs)

    assert (one.processes, two.processes, two.kernels, two.device) == (1, 2, "off under FSDP", "cpu")
    assert two.steps == one.steps and two.tokens == one.tokens
    assert two.last_loss == pytest.approx(one.last_loss, rel=1e-4) and two.last_loss < 0.7 * two.first_loss
    for field in ("parent", "candidate", "parent_kl", "candidate_kl"):
        assert getattr(two.eval["new"], field) == pytest.approx(getattr(one.eval["new"], field), rel=1e-4, abs=1e-6)
    assert two.eval["new"].candidate_exact == one.eval["new"].candidate_exact
    assert set(two.phases) == set(one.phases)

    w1 = load_file(tmp_path / "a1" / "adapter_model.safetensors")
    w2 = load_file(tmp_path / "a2" / "adapter_model.safetensors")
    assert w1.keys() == w2.keys() and len(w1) == 2 * 3 * 4  # A and B of 3 modules in 4 layers: whole, not shards
    for k in w1:  # Adam turns rounding-sized differences of a near-zero gradient into lr-sized ones: a few elements
        assert float((w2[k] - w1[k]).norm() / w1[k].norm()) < 1e-3, k
    c1, c2 = (json.loads((tmp_path / a / "adapter_config.json").read_text()) for a in ("a1", "a2"))
    assert set(c1.pop("target_modules")) == set(c2.pop("target_modules")) and c1 == c2  # peft writes a set


def test_distilled_anchors_and_weight_decay_train_across_processes_like_in_one(tiny_model, tmp_path):
    # FACTS[2] as an anchor trained on KL to the base (`trainer/distill.py`): in two processes it lands on process 0
    # beside a cross-entropy example, and the step's loss is still one mean over all answer tokens.
    kw = {"distill": [FACTS[2].id], "distill_weight": 2.0, "weight_decay": 1.0}
    one, _ = train(job(tiny_model, tmp_path / "a1", **kw), tmp_path / "r1", 1)
    two, ev2 = train(job(tiny_model, tmp_path / "a2", **kw), tmp_path / "r2", 2)
    plain, _ = train(job(tiny_model, tmp_path / "a3"), tmp_path / "r3", 1)
    losses = [[e["loss"] for e in ev if e["event"] == "progress"] for ev in (ev2,)]
    assert two.steps == one.steps == 6
    assert two.first_loss == pytest.approx(one.first_loss, rel=1e-4)
    assert two.last_loss == pytest.approx(one.last_loss, rel=1e-4)
    assert losses[0][0] == pytest.approx(two.first_loss)
    # A fresh LoRA is the base: the distilled example adds nothing to the first step's loss (its KL is 0).
    assert one.first_loss < plain.first_loss


def test_an_nf4_base_trains_across_processes_like_in_one(tiny_model, tmp_path):
    """The QLoRA-FSDP recipe on CPU: bitsandbytes' NF4 base, its packed 4-bit weights sharded by FSDP2: the same
    losses as one process with the same NF4 base, and it learns (CPU: fp32 compute; bf16 on CUDA)."""
    one, ev1 = train(job(tiny_model, tmp_path / "a1", quantize="nf4"), tmp_path / "r1", 1)
    two, ev2 = train(job(tiny_model, tmp_path / "a2", quantize="nf4"), tmp_path / "r2", 2)
    assert one.quantized and two.quantized and two.processes == 2
    # The host's quantising is split between the processes, each weight sent to the other (`fsdp_load`): a wrong
    # byte or quantisation state would show in the losses below.
    said = [e["message"] for e in ev2 if e["event"] == "log" and e["message"].startswith("NF4 base quantised")]
    assert len(said) == 1 and "split over 2 processes" in said[0], said
    here, sent = (int(w) for w in re.findall(r"(\d+) weights in process 0, (\d+) from the others", said[0])[0])
    layers = json.loads((Path(tiny_model) / "config.json").read_text())["num_hidden_layers"]
    n = layers * 7  # q, k, v, o, gate, up, down in each layer; the i-th quantised belongs to process i % 2
    assert (here, sent) == ((n + 1) // 2, n // 2)
    losses = [[e["loss"] for e in ev if e["event"] == "progress"] for ev in (ev1, ev2)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4) and len(losses[0]) == 6
    assert two.eval["new"].candidate == pytest.approx(one.eval["new"].candidate, rel=1e-4)
    assert two.eval["new"].candidate < 0.7 * two.eval["new"].parent  # it learns (the repacked CPU layout did not)
    w1 = load_file(tmp_path / "a1" / "adapter_model.safetensors")
    w2 = load_file(tmp_path / "a2" / "adapter_model.safetensors")
    for k in w1:  # Adam turns rounding-sized differences of a near-zero gradient into lr-sized ones: a few elements
        assert float((w2[k] - w1[k]).norm() / w1[k].norm()) < 1e-3, k


def test_workers_share_the_cores():
    """torchrun alone gives each worker one thread (the 8B base then took minutes to load on a 16-core host)."""
    assert worker_threads(2, cores=16) == 8 and worker_threads(3, cores=16) == 5
    assert worker_threads(2, cores=2) == worker_threads(4, cores=2) == 1


def test_a_failing_process_fails_the_update_and_writes_nothing(tiny_model, tmp_path):
    j = job(tiny_model, tmp_path / "out", steps=2)
    j.base_model = str(tmp_path / "no-such-model")
    with pytest.raises(TrainerFailed, match="exited with code"):
        train(j, tmp_path / "run", 2)
    assert list((tmp_path / "out").iterdir()) == []
    assert "no-such-model" in (tmp_path / "run" / "trainer.log").read_text()


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def test_stopping_kills_torchrun_and_every_worker(tiny_model, tmp_path):
    j = job(tiny_model, tmp_path / "out", batches=[FACTS] * 100_000)
    trainer = TrainerProcess(Launch(processes=2))
    seen: dict[str, set[int]] = {}

    async def go():
        started = asyncio.Event()

        def on_progress(event):
            if event["event"] == "progress" and not started.is_set():
                seen["workers"] = _children(trainer.pid)
                started.set()

        task = asyncio.create_task(trainer.run(j, tmp_path / "run", on_progress, 600))
        await asyncio.wait_for(started.wait(), 300)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await trainer.wait_gone()

    asyncio.run(go())
    assert len(seen["workers"]) == 2, seen
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in seen["workers"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in seen["workers"] if _alive(p)], "a worker outlived its torchrun"
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    assert os.getpid() not in seen["workers"]


def test_a_daemon_update_with_two_train_devices_runs_under_torchrun(state_dir):
    """`train.devices = ["cpu", "cpu"]` through the real daemon: the update runs in two processes, finishes with a
    verdict (not `failed`) and records `processes: 2` in its metrics."""
    from .daemon_proc import DaemonProcess

    env = {"SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false", "SLOTH_TRAIN_STEPS": "8",
           "SLOTH_TRAIN_DEVICES": "cpu,cpu", "SLOTH_ZMQ": "off"}
    daemon = DaemonProcess(state_dir, env=env).start()
    try:
        with daemon.http() as http:
            taught = http.post("/sloth/teach", json={"examples": [{"prompt": e.prompt[0]["content"], "answer": e.answer}
                                                                  for e in FACTS]})
            assert taught.status_code == 200, taught.text
            started = http.post("/sloth/updates")
            assert started.status_code == 202, started.text
            update = daemon.wait_update(started.json()["update_id"])
        assert update["status"] in ("promoted", "rejected"), (update, daemon.log())
        train = update["metrics"]["train"]
        assert train["processes"] == 2 and train["steps"] == 8 and train["device"] == "cpu"
        assert "trains on cpu, cpu (2 processes)" in daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()
