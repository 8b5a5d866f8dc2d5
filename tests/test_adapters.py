"""The adapter registry: atomic versions, crash leftovers, the CURRENT pointer."""

import pytest

from sloth_daemon.adapters import AdapterNotFound, AdapterRegistry


def staged(reg: AdapterRegistry, marker: str):
    d = reg.new_staging_dir()
    (d / "adapter_config.json").write_text('{"r": 4}')
    (d / "adapter_model.safetensors").write_text(marker)
    return d


def test_commit_numbers_versions_and_publishes_whole_folders(tmp_path):
    reg = AdapterRegistry(tmp_path / "adapters")
    a = reg.commit(staged(reg, "one"), parent=None, update_id=1, metrics={"x": 1})
    b = reg.commit(staged(reg, "two"), parent=a.version, update_id=2)
    assert (a.version, b.version) == ("v000001", "v000002")
    assert (reg.path("v000002") / "adapter_model.safetensors").read_text() == "two"
    assert [i.version for i in reg.list()] == ["v000001", "v000002"]
    assert reg.get("v000002").parent == "v000001"
    assert not list((tmp_path / "adapters").glob(".staging-*"))


def test_staging_without_adapter_is_refused_and_cleaned_up(tmp_path):
    reg = AdapterRegistry(tmp_path)
    empty = reg.new_staging_dir()
    with pytest.raises(ValueError):
        reg.commit(empty, parent=None, update_id=None)
    staged(reg, "half")  # a crash mid-write leaves this behind
    assert len(reg.cleanup_staging()) == 2
    assert reg.list() == []


def test_current_only_points_at_promoted_versions(tmp_path):
    reg = AdapterRegistry(tmp_path)
    v = reg.commit(staged(reg, "x"), parent=None, update_id=1).version
    assert reg.current() is None
    with pytest.raises(ValueError):
        reg.set_current(v)
    reg.update_meta(v, status="promoted")
    reg.set_current(v)
    assert AdapterRegistry(tmp_path).current() == v  # survives a new process
    reg.set_current(None)
    assert reg.current() is None
    with pytest.raises(AdapterNotFound):
        reg.get("v999999")
    with pytest.raises(AdapterNotFound):
        reg.path("../etc")
