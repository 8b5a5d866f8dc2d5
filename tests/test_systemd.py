"""The systemd pieces without a running daemon: the unit passes `systemd-analyze verify`, the example config and env
files hold valid settings, `$STATE_DIRECTORY` is the default state dir, `install-service` plans and writes the
right files, and the notify protocol's datagrams reach a socket the test binds (path and abstract namespace)."""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sloth_daemon.config import DaemonConfig, _setting_paths, env_name, load_config
from sloth_daemon.install import UNIT_NAME, plan
from sloth_daemon.notify import Notifier

SYSTEMD = Path(__file__).resolve().parent.parent / "sloth_daemon" / "systemd"


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing: install Debian's systemd package (.ci/run does)"
    return exe


def verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run([systemd_analyze(), "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=60)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sloth_daemon.cli", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "300"})


# -- the unit ------------------------------------------------------------------------------------------------------
def test_installed_unit_passes_systemd_analyze_verify(tmp_path):
    r = cli("install-service", "--prefix", str(tmp_path), "--user", "sloth")
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "etc" / "systemd" / "system" / UNIT_NAME
    text = unit.read_text()
    exec_start = unit_settings(text)["ExecStart"][0].split()
    assert Path(exec_start[0]).exists() and exec_start[1] == "serve", exec_start
    result = verify(unit)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr

    # The check is live: a unit with a typo'd key or a missing program fails it.
    broken = tmp_path / "broken" / UNIT_NAME
    broken.parent.mkdir()
    broken.write_text(text.replace("WatchdogSec=", "WatchdogSecs=").replace(exec_start[0], "/nonexistent/sloth"))
    result = verify(broken)
    assert "WatchdogSecs" in result.stderr and "/nonexistent/sloth" in result.stderr


def test_unit_stop_bounds_fit_the_daemons_shutdown():
    s = unit_settings((SYSTEMD / UNIT_NAME).read_text())
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"] and s["KillMode"] == ["mixed"]
    # SIGTERM: grace for requests + up to 30 s for an update past training + up to 30 s for the engine to stop.
    timeout_stop = int(re.fullmatch(r"(\d+)s", s["TimeoutStopSec"][0]).group(1))
    assert timeout_stop > DaemonConfig().shutdown_grace_s + 60
    # Pings go out at half of WatchdogSec; a start that builds a model must not hit TimeoutStartSec first.
    assert re.fullmatch(r"\d+s", s["WatchdogSec"][0])
    # The caches CUDA/Triton write to are inside the unit's writable cache directory.
    cache_env = dict(e.split("=", 1) for e in s["Environment"])
    for var in ("TRITON_CACHE_DIR", "HF_HOME", "CUDA_CACHE_PATH", "XDG_CACHE_HOME"):
        assert cache_env[var].startswith("%C/" + s["CacheDirectory"][0])


# -- example config and environment --------------------------------------------------------------------------------
def test_config_example_shows_the_defaults(tmp_path):
    text = (SYSTEMD / "sloth-daemon.toml.example").read_text()
    as_is = tmp_path / "as-is.toml"
    as_is.write_text(text)
    assert load_config(as_is, env={}) == load_config(env={})
    # Uncommented, every `# key = value` line is a valid setting showing its default (examples aside).
    uncommented = tmp_path / "uncommented.toml"
    uncommented.write_text(re.sub(r"^# ([a-z_]+ = .*)$", r"\1", text, flags=re.M))
    cfg = load_config(uncommented, env={})
    examples = {"model", "served_model_name", "api_key", "state_dir"}
    defaults = DaemonConfig()
    assert cfg.model_dump(exclude=examples) == defaults.model_dump(exclude=examples)
    assert cfg.model and cfg.api_key


def test_env_example_names_real_settings():
    names = re.findall(r"^#?(SLOTH_[A-Z_]+)=", (SYSTEMD / "sloth-daemon.env.example").read_text(), flags=re.M)
    known = {env_name(p) for p in _setting_paths(DaemonConfig)}
    assert names and set(names) <= known


def test_state_directory_is_the_default_state_dir(tmp_path):
    systemd_env = {"STATE_DIRECTORY": f"{tmp_path}/lib:{tmp_path}/other"}
    assert load_config(env=systemd_env).state_dir == tmp_path / "lib"
    assert load_config(env={**systemd_env, "SLOTH_STATE_DIR": str(tmp_path / "env")}).state_dir == tmp_path / "env"
    f = tmp_path / "c.toml"
    f.write_text(f'state_dir = "{tmp_path}/file"\n')
    assert load_config(f, env=systemd_env).state_dir == tmp_path / "file"
    cfg = load_config(f, env=systemd_env, overrides={"state_dir": str(tmp_path / "flag")})
    assert cfg.state_dir == tmp_path / "flag"
    assert load_config(env={}).state_dir == Path("sloth-state").resolve()


# -- install-service -----------------------------------------------------------------------------------------------
def test_install_service_dry_run_prints_the_steps_and_changes_nothing(tmp_path):
    user = "sloth-test-nouser"
    exe = "/opt/sloth-daemon/.venv/bin/sloth-daemon"
    r = cli("install-service", "--dry-run", "--user", user, "--exec", exe)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    lines = [line for line in out.splitlines() if line.startswith(("run ", "write "))]
    steps = [line.split("#")[0].split() for line in lines]
    assert steps[0][:3] == ["run", "useradd", "--system"] and steps[0][-1] == user
    assert ["write", "/etc/systemd/system/sloth-daemon.service"] in [s[:2] for s in steps]
    assert ["write", "/etc/sloth-daemon/config.toml"] in [s[:2] for s in steps]
    assert ["write", "/etc/sloth-daemon/sloth-daemon.env"] in [s[:2] for s in steps]
    assert steps[-2:] == [["run", "systemctl", "daemon-reload"],
                          ["run", "systemctl", "enable", "--now", "sloth-daemon.service"]]
    with pytest.raises(KeyError):
        pwd.getpwnam(user)  # not created
    r = cli("install-service", "--dry-run", "--prefix", str(tmp_path / "root"))
    assert r.returncode == 0 and not (tmp_path / "root").exists()


def test_install_service_refuses_what_the_unit_would_hide():
    r = cli("install-service", "--dry-run", "--exec", "/home/alice/sloth/.venv/bin/sloth-daemon")
    assert r.returncode == 1 and "ProtectHome" in r.stderr


def test_install_into_a_root_keeps_settings_on_upgrade(tmp_path):
    exe = Path(sys.executable).parent / "sloth-daemon"
    actions = plan(user="llm", prefix=tmp_path, executable=exe)
    assert not any(a.describe().startswith("run") for a in actions)  # only files in a packaging root
    assert cli("install-service", "--prefix", str(tmp_path), "--user", "llm").returncode == 0
    etc = tmp_path / "etc"
    unit = (etc / "systemd" / "system" / UNIT_NAME).read_text()
    assert unit_settings(unit)["User"] == ["llm"] and unit_settings(unit)["Group"] == ["llm"]
    assert (etc / "sloth-daemon" / "sloth-daemon.env").stat().st_mode & 0o777 == 0o640
    config = etc / "sloth-daemon" / "config.toml"
    config.write_text("port = 9123\n")
    (etc / "systemd" / "system" / UNIT_NAME).write_text("stale")
    assert cli("install-service", "--prefix", str(tmp_path), "--user", "llm").returncode == 0
    assert config.read_text() == "port = 9123\n"  # the user's settings stay
    assert (etc / "systemd" / "system" / UNIT_NAME).read_text() == unit  # the unit is the new one


# -- the notify protocol -------------------------------------------------------------------------------------------
def _bound_socket(address: str | bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(5)
    return s


def test_notifier_reads_and_clears_the_environment(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = _bound_socket(path)
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid()), "OTHER": "x"}
    n = Notifier.from_environment(env)
    assert env == {"OTHER": "x"}  # children (the trainer) must not think they are the service
    assert n.watchdog_interval == 1.5
    n.ready("serving base model; idle, 0 examples pending")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving base model; idle, 0 examples pending"
    n.status("two\nlines")
    n.status("two\nlines")  # unchanged: not sent again
    n.stopping()
    assert sock.recv(4096) == b"STATUS=two lines"
    assert sock.recv(4096) == b"STOPPING=1"
    n.reloading()
    msg = sock.recv(4096).decode().split("\n")
    assert msg[0] == "RELOADING=1" and re.fullmatch(r"MONOTONIC_USEC=\d+", msg[1])
    assert Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10", "WATCHDOG_PID": "1"}
                                     ).watchdog_interval is None  # meant for another process
    assert Notifier.from_environment({}).send("READY=1") is False  # not under systemd: nothing to do


def test_notifier_abstract_socket_and_a_vanished_manager(tmp_path):
    name = f"sloth-test-{os.getpid()}"
    sock = _bound_socket(b"\0" + name.encode())
    n = Notifier("@" + name)
    assert n.send("READY=1")
    assert sock.recv(4096) == b"READY=1"
    gone = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert gone.send("READY=1") is False  # logged, never raised


def test_watchdog_pings_from_the_event_loop_and_stop_when_it_blocks(tmp_path):
    path = str(tmp_path / "wd.sock")
    sock = _bound_socket(path)
    sock.settimeout(0.1)
    pings: list[float] = []
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            try:
                assert sock.recv(64) == b"WATCHDOG=1"
                pings.append(time.monotonic())
            except socket.timeout:
                pass

    listener = threading.Thread(target=listen)
    listener.start()
    n = Notifier(path, watchdog_interval=0.05)

    async def run() -> tuple[float, float]:
        task = asyncio.create_task(n.run_watchdog())
        await asyncio.sleep(0.3)
        blocked_from = time.monotonic()
        time.sleep(0.5)  # a stuck event loop: no pings, so systemd's watchdog would fire
        blocked_to = time.monotonic()
        await asyncio.sleep(0.3)
        task.cancel()
        return blocked_from, blocked_to

    blocked_from, blocked_to = asyncio.run(run())
    time.sleep(0.2)
    done.set()
    listener.join()
    before = [t for t in pings if t < blocked_from]
    after = [t for t in pings if t > blocked_to + 0.1]
    assert len(before) >= 3 and len(after) >= 3
    assert not [t for t in pings if blocked_from + 0.1 < t < blocked_to]  # margin: the listener may lag
