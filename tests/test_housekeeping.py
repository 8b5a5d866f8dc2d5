"""Housekeeping without a daemon: retention deletes old run folders and rejected
adapters but never a promoted or served one, progress fields for status, and JSON logs."""

from __future__ import annotations

import json
import logging

import pytest

from sloth_daemon.adapters import AdapterRegistry
from sloth_daemon.housekeeping import prune
from sloth_daemon.logs import configure_logging
from sloth_daemon.progress import training_progress


def _version(registry: AdapterRegistry, update_id: int, status: str) -> str:
    staging = registry.new_staging_dir()
    (staging / "adapter_config.json").write_text("{}")
    info = registry.commit(staging, parent=None, update_id=update_id)
    registry.update_meta(info.version, status=status)
    return info.version


def test_retention_keeps_the_last_n_and_everything_promoted(tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    runs = tmp_path / "runs"
    statuses = {1: "promoted", 2: "rejected", 3: "rejected", 4: "promoted", 5: "rejected", 6: "rejected"}
    versions = {u: _version(registry, u, s) for u, s in statuses.items()}
    registry.set_current(versions[1])  # a rollback: an old promoted version is served
    for u in range(1, 9):  # updates 7 and 8 failed: a run folder, no adapter
        (runs / f"update-{u:06d}").mkdir(parents=True)
        (runs / f"update-{u:06d}" / "job.json").write_text("{}")
    removed = prune(runs, registry, keep_last=2)
    assert removed["adapters"] == [versions[2], versions[3]]
    left = {i.version: i.status for i in registry.list()}
    assert left == {versions[1]: "promoted", versions[4]: "promoted", versions[5]: "rejected",
                    versions[6]: "rejected"}
    assert sorted(p.name for p in runs.iterdir()) == ["update-000001", "update-000004", "update-000007",
                                                      "update-000008"]
    assert not list((tmp_path / "adapters").glob(".staging-*"))
    assert prune(runs, registry, keep_last=2) == {"runs": [], "adapters": []}  # nothing more to do
    with pytest.raises(ValueError):
        registry.remove(versions[4])
    # The numbering goes on past the deleted versions.
    assert _version(registry, 9, "candidate") == "v000007"


def test_kept_job_files_lose_the_example_texts(tmp_path):
    """After a run the job file keeps ids, not text: a text forgotten on request must not live on in runs/."""
    from sloth_daemon.trainer.job import TrainExample, TrainJob

    ex = TrainExample(id="ex_1", kind="chat", prompt=[{"role": "user", "content": "My PIN?"}], answer="4711.")
    run = tmp_path / "runs" / "update-000001"
    run.mkdir(parents=True)
    (run / "job.json").write_text(TrainJob(base_model="m", output_dir="o", batches=[[ex]] * 3,
                                           eval_sets={"new": [ex]}).model_dump_json())
    registry = AdapterRegistry(tmp_path / "adapters")
    _version(registry, 1, "promoted")
    prune(tmp_path / "runs", registry, keep_last=5)
    text = (run / "job.json").read_text()
    assert "4711" not in text and "My PIN" not in text
    assert json.loads(text)["batches"] == [["ex_1"]] * 3 and json.loads(text)["eval_sets"] == {"new": ["ex_1"]}


def test_training_progress_for_status():
    p = training_progress({"step": 5, "steps": 20, "loss": 1.5, "tokens": 1000, "seconds": 2.0}, [[4, 1.7]])
    assert p == {"step": 5, "steps": 20, "loss": 1.5, "tokens_per_s": 500.0, "eta_s": 6.0,
                 "loss_curve": [[4, 1.7], [5, 1.5]]}
    assert training_progress({"step": 1, "steps": 2, "loss": float("nan")}, [])["loss"] is None


def test_json_log_format(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        assert configure_logging("info", "json") is None
        logging.getLogger("sloth_daemon.test").info("update %d promoted", 3)
        logging.getLogger("sloth_daemon.test").debug("not shown")
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines == [{"time": lines[0]["time"], "level": "INFO", "logger": "sloth_daemon.test",
                      "message": "update 3 promoted"}]
