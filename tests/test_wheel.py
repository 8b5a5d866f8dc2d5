"""The built wheel, installed in a fresh venv, is a whole sloth-daemon: it serves, installs the service (the unit and
examples are package data) and runs every command, with nothing read from this checkout.

CI builds the wheel once (`.ci/run`) and names it in `SLOTH_TEST_WHEEL`; without it the test builds one. The fresh
venv gets the wheel with `--no-deps` and sees the test venv's installed dependencies through a `.pth` line (a plain
path: the test venv's editable install of this checkout is *not* activated there), so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import httpx
import pytest

from .daemon_proc import free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    given = os.environ.get("SLOTH_TEST_WHEEL")
    if given:
        return Path(given).resolve()
    if os.environ.get("CI"):
        pytest.fail("CI must build the wheel and name it in SLOTH_TEST_WHEEL (.ci/run does)")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                    str(REPO)], check=True, timeout=300)
    return next(out.glob("sloth_daemon-*.whl"))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with only the wheel installed in it; returns its bin folder."""
    root = tmp_path_factory.mktemp("wheel-venv")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir / "bin"


def run(bin_dir: Path, *args: str, cwd: Path, timeout: float = 120, stdin: str | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SLOTH_CONFIG")}
    env["COLUMNS"] = "200"
    return subprocess.run([str(bin_dir / "sloth-daemon"), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout, input=stdin)


def test_the_wheel_has_everything_and_runs_every_command(installed, state_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    py = installed / "python"
    where = subprocess.run([str(py), "-c", "import sloth_daemon, sloth_replay, sloth_kernels; "
                            "print(sloth_daemon.__file__, sloth_replay.__file__, sloth_kernels.__file__)"],
                           capture_output=True, text=True, cwd=elsewhere, check=True).stdout.split()
    assert all(p.startswith(str(installed.parent)) for p in where), where  # from the wheel, not this checkout

    # install-service into a packaging root: the unit and both examples come from package data.
    r = run(installed, "install-service", "--prefix", str(tmp_path / "root"), "--user", "sloth", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    unit = (tmp_path / "root" / "etc" / "systemd" / "system" / "sloth-daemon.service").read_text()
    assert f"ExecStart={installed / 'sloth-daemon'} serve" in unit
    assert "[train]" in (tmp_path / "root" / "etc" / "sloth-daemon" / "config.toml").read_text()
    assert (tmp_path / "root" / "etc" / "sloth-daemon" / "sloth-daemon.env").exists()

    port = free_port()
    log = open(tmp_path / "daemon.log", "wb")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(SLOTH_SCHEDULE_ENABLED="false", SLOTH_PORT=str(port), SLOTH_STATE_DIR=str(state_dir),
               SLOTH_ANCHORS_ENABLED="false")
    proc = subprocess.Popen([str(installed / "sloth-daemon"), "serve"], cwd=elsewhere, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        import time

        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()[-4000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the wheel's daemon did not come up"
            time.sleep(0.3)
        url = ["--url", f"http://127.0.0.1:{port}"]
        other = tmp_path / "another-dir"
        other.mkdir()
        r = run(installed, "status", "--json", *url, cwd=other)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["model"] == "sloth-tiny"
        assert run(installed, "adapters", "list", *url, cwd=other).returncode == 0
        r = run(installed, "train-now", *url, cwd=other)
        assert r.returncode == 1 and "409" in r.stderr  # nothing to train yet: the daemon refused, as documented
        r = run(installed, "replay", "stats", "--json", "--state-dir", str(state_dir), cwd=other)
        assert r.returncode == 0 and json.loads(r.stdout)["schema_version"] >= 1
        # chat finds the daemon the way status does (from another directory, no --zmq).
        r = run(installed, "chat", *url, "--max-tokens", "4", cwd=other, stdin="Hello\n/up\n/quit\n")
        assert r.returncode == 0, r.stdout + r.stderr
        r = httpx.get(f"http://127.0.0.1:{port}/sloth/status").json()
        assert r["pending_examples"] == 1  # the /up made a training example
        data = tmp_path / "data.jsonl"
        data.write_text('{"instruction": "Name the sloth.", "output": "Sid."}\n{"text": "Sloths are slow."}\n')
        r = run(installed, "import", str(data), *url, cwd=other)
        assert r.returncode == 0 and "2 new example" in r.stdout, r.stderr
        r = run(installed, "replay", "export", "-", "--pending", "--state-dir", str(state_dir), cwd=other)
        assert r.returncode == 0 and '"Sid."' in r.stdout, r.stderr
        r = run(installed, "export", "latest", str(tmp_path / "out"), "--state-dir", str(state_dir), cwd=other)
        assert r.returncode == 1 and "no latest adapter" in r.stderr  # nothing trained yet: refused, as documented
        base = f"http://127.0.0.1:{port}"
        assert "sloth_pending_examples 3.0" in httpx.get(base + "/metrics").text
        page = httpx.get(base + "/")  # the status page's files are package data
        assert page.status_code == 200 and "/ui/app.js" in page.text
        assert httpx.get(base + "/ui/app.js").status_code == 200 and httpx.get(base + "/ui/style.css").is_success
    finally:
        proc.terminate()
        proc.wait(60)
