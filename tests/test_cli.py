"""The CLI's commands, exit codes and messages, run as real processes."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import API_KEY
from .daemon_proc import free_port


def cli(*args, env=None, timeout=120):
    import os

    return subprocess.run([sys.executable, "-m", "sloth_daemon.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_unreachable_daemon_exits_3():
    r = cli("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 3 and "not reachable" in r.stderr


def test_bad_configuration_exits_2(tmp_path):
    r = cli("status", env={"SLOTH_PORT": "not-a-port"})
    assert r.returncode == 2 and "port" in r.stderr
    r = cli("serve", "--model", str(tmp_path / "nothing-here"), "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 2 and "config.json" in r.stderr
    assert cli("adapters", "frobnicate").returncode == 2


def test_client_commands_against_a_running_daemon(shared_daemon):
    env = {"SLOTH_API_KEY": API_KEY}
    url = ["--url", shared_daemon.url]
    r = cli("status", "--json", *url, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "sloth-tiny"
    r = cli("adapters", "list", *url, env=env)
    assert r.returncode == 0 and "adapters" in r.stdout
    r = cli("adapters", "rollback", "v000099", *url, env=env)
    assert r.returncode == 1 and "404" in r.stderr
    r = cli("status", *url)  # no API key
    assert r.returncode == 1 and "API key" in r.stderr


def test_replay_stats_reads_the_store_directly(shared_daemon, tmp_path):
    r = cli("replay", "stats", "--json", "--state-dir", str(shared_daemon.state_dir))
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["interactions"] >= 0 and stats["anchors"] >= 0
    r = cli("replay", "stats", "--state-dir", str(tmp_path / "empty"))
    assert r.returncode == 1 and "no replay store" in r.stderr
