"""Placement (`device`, `train.devices`, `vllm.tensor_parallel_size`): config validation with errors that name the
key, what each process is given (the trainer child's CUDA_VISIBLE_DEVICES and command line, the vLLM server's
command line and environment), and the refusal to start on GPUs the machine lacks. The real trainer child is
started and its environment read from /proc while it trains."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from sloth_daemon.config import ConfigError, load_config
from sloth_daemon.engine.vllm_server import VllmServer
from sloth_daemon.placement import check_available, serving_env, train_placement, visible_devices
from sloth_daemon.service import check_gpus
from sloth_daemon.trainer.job import LoraSpec, TrainExample, TrainJob
from sloth_daemon.trainer.launch import Launch
from sloth_daemon.trainer.process import TrainerProcess
from sloth_daemon.trainer.warm import WarmTrainer
from sloth_daemon.updater import Updater


def test_devices_from_file_and_environment(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('device = "cuda:0"\n[train]\ndevices = [1, "cuda:2"]\n[vllm]\ntensor_parallel_size = 2\n')
    cfg = load_config(f, env={})
    assert cfg.device == "cuda:0" and cfg.train.devices == ["cuda:1", "cuda:2"]
    assert cfg.vllm.tensor_parallel_size == 2
    assert load_config(env={"SLOTH_TRAIN_DEVICES": "0,1"}).train.devices == ["cuda:0", "cuda:1"]
    assert load_config(env={"SLOTH_TRAIN_DEVICES": "1"}).train.devices == ["cuda:1"]
    assert load_config(env={"SLOTH_TRAIN_DEVICES": '["cpu", "cpu"]'}).train.devices == ["cpu", "cpu"]
    assert load_config(env={"SLOTH_DEVICE": "CUDA:1"}).device == "cuda:1"
    assert load_config(env={}).train.devices == [] and load_config(env={}).device == "auto"


@pytest.mark.parametrize("env,needle", [
    ({"SLOTH_DEVICE": "gpu0"}, "device: Value error, 'gpu0' is not a device"),
    ({"SLOTH_DEVICE": "cpu:1"}, "'cpu:1' is not a device"),
    ({"SLOTH_TRAIN_DEVICES": "0,0"}, "train.devices: Value error, ['cuda:0', 'cuda:0']: a GPU is named twice"),
    ({"SLOTH_TRAIN_DEVICES": "cpu,1"}, "GPUs and cpu do not mix"),
    ({"SLOTH_TRAIN_DEVICES": "cuda"}, "'cuda' does not say which GPU"),
    ({"SLOTH_TRAIN_DEVICES": "tpu:0"}, "'tpu:0' is not a device: give cuda:N, a GPU index N, or cpu"),
    ({"SLOTH_TRAIN_DEVICES": "-1"}, "is not a GPU index"),
    ({"SLOTH_TRAIN_DEVICES": "true"}, "True: give a list of devices"),
    ({"SLOTH_VLLM_TENSOR_PARALLEL_SIZE": "0"}, "vllm.tensor_parallel_size"),
])
def test_bad_placement_names_the_key_and_the_variable(env, needle):
    with pytest.raises(ConfigError) as e:
        load_config(env=env)
    assert needle in str(e.value)
    assert f"env {next(iter(env))}" in str(e.value)


def test_trainer_placement():
    one = train_placement(["cuda:1"], "cuda:0", {})
    assert (one.device, one.processes, one.env) == ("cuda", 1, {"CUDA_VISIBLE_DEVICES": "1"})
    two = train_placement(["cuda:0", "cuda:1"], "cuda:0", {})
    assert (two.device, two.processes, two.env) == ("cuda", 2, {"CUDA_VISIBLE_DEVICES": "0,1"})
    cpus = train_placement(["cpu", "cpu"], "auto", {})
    assert (cpus.device, cpus.processes, cpus.env) == ("cpu", 2, {})
    # Empty: trains where the engine serves, as before (no environment change).
    assert train_placement([], "cuda:1", {}) == train_placement([], "cuda:1", {"CUDA_VISIBLE_DEVICES": "3"})
    assert train_placement([], "cuda:1", {}).device == "cuda:1" and train_placement([], "cuda:1", {}).env == {}
    assert train_placement([], "auto", {}, cuda_available=False).device == "cpu"
    assert train_placement([], "auto", {}, cuda_available=True).device == "cuda"
    # The daemon's own CUDA_VISIBLE_DEVICES (systemd): indices are into it.
    assert train_placement(["cuda:1"], "auto", {"CUDA_VISIBLE_DEVICES": "4,6"}).env == {"CUDA_VISIBLE_DEVICES": "6"}
    assert visible_devices([0, 1], {"CUDA_VISIBLE_DEVICES": "GPU-a, GPU-b"}) == "GPU-a,GPU-b"
    with pytest.raises(ValueError, match="GPU 2 is not among the daemon's CUDA_VISIBLE_DEVICES=4,6"):
        train_placement(["cuda:2"], "auto", {"CUDA_VISIBLE_DEVICES": "4,6"})


def test_launch_command_lines():
    assert Launch().command("job.json") == [sys.executable, "-P", "-m", "sloth_daemon.trainer", "job.json"]
    assert Launch(processes=2).command("job.json") == [
        sys.executable, "-P", "-m", "sloth_daemon.trainer.distributed", "--nproc-per-node", "2", "job.json"]
    assert Launch().warm and not Launch(processes=2).warm
    with pytest.raises(ValueError, match="a warm trainer is one process"):
        WarmTrainer(Path("/nonexistent/warm.log"), Launch(processes=2))


def _cfg(**env):
    return load_config(env={"SLOTH_STATE_DIR": "/tmp/sloth-placement-test", **env})


def test_updater_hands_the_placement_to_the_trainer(tiny_model):
    def updater(**env):
        return Updater(_cfg(**env), store=None, registry=None, engine=None, base_model=tiny_model)

    u = updater(SLOTH_DEVICE="cuda:0", SLOTH_TRAIN_DEVICES="1")
    t = u._trainer_for_update()
    assert isinstance(t, WarmTrainer) and t.launch == Launch(1, {"CUDA_VISIBLE_DEVICES": "1"})
    # The job says cuda (the child sees only GPU 1); NF4 and the kernels follow a cuda device.
    assert u._device() == "cuda" and u._quantize("cuda") == "nf4" and u._kernels("cuda")
    assert u._quantize("cuda:1") == "nf4" and not u._kernels("cpu")
    # Several devices: a fresh torchrun per update, never a warm trainer.
    u = updater(SLOTH_TRAIN_DEVICES="cpu,cpu")
    assert not u._warm_wanted()
    t = u._trainer_for_update()
    assert isinstance(t, TrainerProcess) and t.launch == Launch(2, {})
    u = updater(SLOTH_TRAIN_DEVICES="0,1")  # across GPUs: NF4 and the kernels asked for as on one (FSDP decides)
    assert u._device() == "cuda" and u._quantize("cuda") == "nf4" and u._kernels("cuda")
    # Unset: the engine's device, one process, no environment change (today's behaviour).
    u = updater(SLOTH_DEVICE="cpu", SLOTH_TRAIN_WARM="false")
    assert u._device() == "cpu" and u._trainer_for_update().launch == Launch()


def test_the_trainer_child_gets_its_devices_in_its_environment(tiny_model, tmp_path):
    """A real trainer child started with a placement's launch: /proc/<pid>/environ holds CUDA_VISIBLE_DEVICES
    (the job trains on cpu here; on a GPU machine the child would see GPU 1 as its cuda:0), no API key."""
    placement = train_placement(["cuda:1"], "cuda:0", {})
    facts = [TrainExample(id="a", kind="chat", prompt=[{"role": "user", "content": "Colour?"}], answer="Teal.")]
    job = TrainJob(base_model=str(tiny_model), output_dir=str(tmp_path / "out"), batches=[facts] * 3,
                   lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj"]), max_seq_len=64, device="cpu")
    (tmp_path / "out").mkdir()
    trainer = TrainerProcess(Launch.for_placement(placement))
    seen: dict[str, str] = {}

    def on_progress(event):
        if not seen and trainer.pid:
            raw = Path(f"/proc/{trainer.pid}/environ").read_bytes().split(b"\0")
            seen.update(kv.decode().split("=", 1) for kv in raw if b"=" in kv)

    os.environ["SLOTH_API_KEY"] = "not-for-the-child"
    try:
        result = asyncio.run(trainer.run(job, tmp_path / "run", on_progress, 300))
    finally:
        del os.environ["SLOTH_API_KEY"]
    assert result.steps == 3
    assert seen.get("CUDA_VISIBLE_DEVICES") == "1" and "SLOTH_API_KEY" not in seen
    assert seen.get("PYTHONSAFEPATH") == "1"


def test_vllm_server_gets_tensor_parallel_size_and_its_gpus(tmp_path):
    cfg = _cfg(SLOTH_VLLM_TENSOR_PARALLEL_SIZE="2").vllm
    server = VllmServer(tmp_path, "m", cfg, device="cuda:1")
    cmd = server.command()
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert server.environment()["CUDA_VISIBLE_DEVICES"] == "1,2"
    plain = VllmServer(tmp_path, "m", _cfg().vllm, device="auto")
    assert "--tensor-parallel-size" not in plain.command()
    assert plain.environment().get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    assert serving_env("cuda:0", 1, {}) == {"CUDA_VISIBLE_DEVICES": "0"} and serving_env("cpu", 1, {}) == {}


def test_start_refuses_gpus_the_machine_lacks():
    with pytest.raises(ValueError, match=r"train.devices: cuda:2 is not on this machine: this machine has 2 GPU\(s\) "
                                         r"\(0-1\)"):
        check_available(["cuda:1", "cuda:2"], "cuda:0", 1, 2)
    with pytest.raises(ValueError, match="device: cuda:1 with vllm.tensor_parallel_size=2 needs GPUs up to 2"):
        check_available([], "cuda:1", 2, 2)
    check_available(["cuda:1"], "cuda:0", 1, 2)
    check_available(["cpu", "cpu"], "cpu", 1, 0)
    if not __import__("torch").cuda.is_available():  # this machine: no GPU at all
        with pytest.raises(ConfigError, match="train.devices: cuda:0 is not on this machine: this machine has 0"):
            check_gpus(_cfg(SLOTH_TRAIN_DEVICES="0"))
        check_gpus(_cfg(SLOTH_TRAIN_DEVICES="cpu,cpu"))
