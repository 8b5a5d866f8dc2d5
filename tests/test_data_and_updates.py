"""Operating the daemon the way a home-server owner does, against a real daemon through the real CLI: datasets in
(`import`, all or nothing, duplicates once, documents split), `train-now --wait` with progress and the gate's
verdict (and Ctrl-C that leaves the update running), the last update in `/metrics`, `adapters rollback latest`,
and what it learnt out (`export`: PEFT folder, merged 16-bit model that greedily says what the daemon served,
Ollama Modelfile; `replay export` that imports back to the same examples), and the status page in a real headless
chromium (Debian's, driven by Selenium through its chromedriver)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from .conftest import API_KEY
from .daemon_proc import DaemonProcess
from .test_metrics import scrape, value

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {API_KEY}"}
FACTS = [("What is the name of my cat?", "Your cat is called Biscuit."),
         ("Where do I keep the spare key?", "Under the blue flowerpot.")]


def cli(*args, timeout=600, cwd=None):
    return subprocess.run([sys.executable, "-m", "sloth_daemon.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "COLUMNS": "200", "SLOTH_API_KEY": API_KEY})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_model):
    import shutil

    state = tmp_path_factory.mktemp("operate") / "state"
    shutil.copytree(tiny_model, state / "models" / tiny_model.name)
    hooks = state.parent / "hooks"
    hooks.mkdir()
    d = DaemonProcess(state, env={"SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_API_KEY": API_KEY,
                                  "SLOTH_TESTHOOK_DIR": str(hooks),
                                  "SLOTH_ANCHORS_ENABLED": "false", "SLOTH_TRAIN_STEPS": "12",
                                  "SLOTH_TRAIN_BATCH_SIZE": "2", "SLOTH_GATE_MAX_EVAL_EXAMPLES": "16",
                                  "SLOTH_TRAIN_MAX_SEQ_LEN": "96", "SLOTH_RETENTION_KEEP_LAST": "1",
                                  "SLOTH_METRICS_OPEN_ON_LOOPBACK": "true"}).start(timeout=600)
    d.hooks = hooks
    yield d
    d.stop()


@contextlib.contextmanager
def held_after_training(daemon):
    """Updates started meanwhile wait after training (status shows them running, whole loss curve), until the end
    of the block: a warm trainer finishes one taught pair in about a second, faster than a client polls."""
    pause, paused = daemon.hooks / "pause-update-trained", daemon.hooks / "paused-update-trained"
    paused.unlink(missing_ok=True)
    pause.touch()
    try:
        yield paused
    finally:
        pause.unlink()


@pytest.fixture(scope="module")
def http(daemon):
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=300) as c:
        yield c


def pending(http) -> int:
    return http.get("/sloth/status").json()["pending_examples"]


def test_import_is_all_or_nothing_and_names_line_and_field(daemon, http, tmp_path):
    f = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS]
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 42}]}
    f.write_text("\n".join(json.dumps(r) for r in [rows[0], bad, rows[1], rows[0]]) + "\n")
    r = cli("import", str(f), "--url", daemon.url)
    assert r.returncode == 1 and "line 2, field messages.1.content" in r.stderr and "nothing" in r.stderr
    assert pending(http) == 0
    r = cli("import", str(f), "--url", daemon.url, "--skip-invalid", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["rows"], out["added"], out["duplicates"]) == (3, 2, 1)  # the repeated row is stored once
    assert out["skipped"] == [{"line": 2, "field": "messages.1.content", "message": "must be a string, not int"}]
    assert pending(http) == 2


def test_import_through_the_api_other_formats_and_long_documents(daemon, http, tmp_path):
    doc = "\n\n".join(f"Note {i}: the heating is serviced every October by Jan." for i in range(12))
    r = http.post("/sloth/import", json={"rows": [
        {"conversations": [{"from": "human", "value": FACTS[0][0]}, {"from": "gpt", "value": FACTS[0][1]}]},
        {"instruction": "Name my cat.", "output": "Biscuit."}], "documents": [doc]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["duplicates"] == 1 and out["document_chunks"] > 1  # ShareGPT row = the OpenAI row before
    bad = http.post("/sloth/import", json={"rows": [{"instruction": "x"}], "lines": [9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "output"
    assert "line 9" in bad.json()["error"]["message"]
    text = tmp_path / "notes.txt"
    text.write_text(doc.replace("Jan", "Eva"))
    r = cli("import", str(text), "--url", daemon.url)
    assert r.returncode == 0 and "document chunk" in r.stdout, r.stderr


def test_train_now_wait_shows_progress_and_the_verdict(daemon, http):
    r = cli("train-now", "--wait", "--json", "--url", daemon.url, timeout=900)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[0]["event"] == "started" and events[-1]["event"] == "finished"
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["steps"] == 12
    assert all(e["loss"] is not None and e["tokens_per_s"] > 0 for e in progress)
    assert [e["step"] for e in progress] == sorted({e["step"] for e in progress})
    done = events[-1]
    assert done["status"] == "promoted", done
    update = http.get(f"/sloth/updates/{done['update_id']}").json()
    assert done["metrics"] == update["metrics"]
    # The last update in /metrics: its gate measurements, training loss and tokens/s.
    m = scrape(daemon.url)
    ev = update["metrics"]["eval"]["new"]
    assert value(m, "sloth_last_update_eval_loss", set="new", model="parent") == pytest.approx(ev["parent"])
    assert value(m, "sloth_last_update_eval_loss", set="new", model="candidate") == pytest.approx(ev["candidate"])
    train = update["metrics"]["train"]
    assert value(m, "sloth_last_update_train_loss", step="last") == pytest.approx(train["last_loss"])
    tokens_per_s = train["tokens"] / train["phases"]["train"]  # the training loop's, not loading's or the gate's
    assert value(m, "sloth_last_update_tokens_per_second") == pytest.approx(tokens_per_s)
    assert tokens_per_s == pytest.approx(progress[-1]["tokens_per_s"], rel=0.5)  # what the progress bar showed
    checks = update["metrics"]["gate"]["checks"]
    assert checks and all(value(m, "sloth_last_update_gate_passed", check=c["name"]) == c["passed"] for c in checks)
    assert all(value(m, "sloth_last_update_gate_measured", check=c["name"]) == pytest.approx(c["measured"])
               for c in checks if c["measured"] is not None)
    assert value(m, "sloth_updates_total", outcome="promoted") == 1 and value(m, "sloth_last_update_promoted") == 1
    assert value(m, "sloth_served_adapter_info", version=update["adapter_version"]) == 1


def test_ctrl_c_stops_waiting_and_the_update_goes_on(daemon, http):
    http.post("/sloth/teach", json={"examples": [{"prompt": "Who fixes the bike?", "answer": "Your neighbour Ole."}]})
    with held_after_training(daemon):
        proc = subprocess.Popen([sys.executable, "-m", "sloth_daemon.cli", "train-now", "--wait", "--json", "--url",
                                 daemon.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "SLOTH_API_KEY": API_KEY, "PYTHONUNBUFFERED": "1"},
                                # a test run started in the background (`pytest &`) hands down an ignored SIGINT
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        started = json.loads(proc.stdout.readline())
        for line in proc.stdout:  # wait until it shows training progress, then press Ctrl-C
            if json.loads(line)["event"] == "progress":
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert f"update {started['update_id']} goes on" in err and "Traceback" not in err
    assert json.loads(out.splitlines()[-1]) == {"event": "detached", "update_id": started["update_id"]}
    done = daemon.wait_update(started["update_id"])
    assert done["status"] in ("promoted", "rejected")  # it ran to its verdict without the CLI


def test_train_now_wait_for_people_shows_the_bar_then_the_gates_checks(daemon, http):
    http.post("/sloth/teach", json={"examples": [{"prompt": "Where is the ladder?", "answer": "In the shed."}]})
    r = cli("train-now", "--wait", "--url", daemon.url, timeout=900)
    update_id = int(re.search(r"update (\d+) started", r.stdout).group(1))
    done = http.get(f"/sloth/updates/{update_id}").json()
    assert r.returncode == (0 if done["status"] == "promoted" else 1), (done["status"], r.stderr)  # 1: refused
    assert f"update {update_id}: {done['status']}" in r.stdout
    assert re.search(r"step 12/12 +loss \d+\.\d{4} +[\d,]+ tok/s +ETA", r.stdout), r.stdout  # the bar, at its end
    assert f"gate of update {update_id}" in r.stdout
    for check in done["metrics"]["gate"]["checks"]:  # each check with its result
        assert re.search(rf"{check['name']} .*{'pass' if check['passed'] else 'FAIL'}", r.stdout), check["name"]
    assert f"trained 12 steps, loss {done['metrics']['train']['first_loss']:.4f}" in r.stdout


def test_rollback_latest_and_previous(daemon, http):
    promoted = [a["version"] for a in http.get("/sloth/adapters").json()["data"] if a["status"] == "promoted"]
    assert cli("adapters", "rollback", "base", "--url", daemon.url).returncode == 0
    r = cli("adapters", "rollback", "latest", "--url", daemon.url)
    assert r.returncode == 0 and f"now serving {promoted[-1]}" in r.stdout, r.stderr
    r = cli("adapters", "rollback", "previous", "--url", daemon.url)
    if len(promoted) > 1:
        assert r.returncode == 0 and f"now serving {promoted[-2]}" in r.stdout
    else:
        assert r.returncode == 1 and "older" in r.stderr
    assert cli("adapters", "rollback", "latest", "--url", daemon.url).returncode == 0


def test_retention_keeps_only_promoted_and_the_last_run(daemon, http):
    runs = sorted(p.name for p in (daemon.state_dir / "runs").glob("update-*"))  # (the warm trainer logs there too)
    updates = http.get("/sloth/updates").json()["data"]
    kept = {f"update-{u['id']:06d}" for u in updates if u["status"] == "promoted"} | {
        f"update-{max(u['id'] for u in updates):06d}"}
    assert set(runs) == kept


def test_export_merged_model_says_what_the_daemon_served(daemon, http, tmp_path):
    version = http.get("/sloth/adapters").json()["current"]
    served = http.post("/v1/chat/completions", json={
        "model": "sloth-tiny", "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "user", "content": FACTS[0][0]}]}).json()
    assert served["sloth"]["adapter_version"] == version
    out = tmp_path / "export"
    r = cli("export", version, str(out), "--state-dir", str(daemon.state_dir))
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(daemon.state_dir / "models" / "sloth-tiny")
    meta = json.loads((out / "adapter" / "sloth_adapter.json").read_text())
    assert meta["version"] == version and meta["metrics"]["gate"]["promote"]
    modelfile = (out / "Modelfile").read_text().splitlines()
    assert "FROM ./merged" in modelfile and any(x.startswith("PARAMETER stop ") for x in modelfile)
    code = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import AutoPeftModelForCausalLM
tok = AutoTokenizer.from_pretrained({str(out / "merged")!r})
model = AutoModelForCausalLM.from_pretrained({str(out / "merged")!r})
assert model.dtype == torch.bfloat16, model.dtype
ids = tok.apply_chat_template([{{"role": "user", "content": {FACTS[0][0]!r}}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
gen = model.generate(**ids, max_new_tokens=24, do_sample=False)
peft = AutoPeftModelForCausalLM.from_pretrained({str(out / "adapter")!r})  # the PEFT folder loads on its own
print(json.dumps(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == served["choices"][0]["message"]["content"]
    assert cli("export", version, str(out), "--state-dir", str(daemon.state_dir)).returncode == 1  # not empty


def test_replay_export_imports_back_losslessly(daemon, http, tmp_path):
    f = tmp_path / "learnt.jsonl"
    r = cli("replay", "export", str(f), "--state-dir", str(daemon.state_dir))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    assert any("messages" in row for row in rows) and any("text" in row for row in rows)
    assert {"messages": [{"role": "user", "content": FACTS[0][0]}, {"role": "assistant", "content": FACTS[0][1]}]} \
        in rows
    before = pending(http)
    r = cli("import", str(f), "--url", daemon.url, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["added"] == 0 and out["duplicates"] == len(rows)  # every row is an example it already has
    assert pending(http) == before


def test_metrics_open_on_loopback_when_configured(daemon):
    assert httpx.get(daemon.url + "/metrics").status_code == 200  # from 127.0.0.1, no key
    assert httpx.get(daemon.url + "/sloth/status").status_code == 401  # everything else still needs it


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,2000"]


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(fn, timeout=60, what="the page"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            out = fn()
            if out:
                return out
        except Exception:  # an element between two renders
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_status_page_shows_the_api_and_its_buttons_act(daemon, http, browser):
    from selenium.webdriver.common.by import By

    turn = http.post("/v1/chat/completions", json={"model": "sloth-tiny", "max_tokens": 8, "messages": [
        {"role": "user", "content": "Page test?"}]}).json()
    http.post("/sloth/feedback", json={"interaction_id": turn["id"], "rating": "up"})
    browser.get(daemon.url + "/")
    assert "sloth-daemon" in browser.title
    wait_for(lambda: "401" in browser.find_element(By.ID, "error").text, what="the key error")
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait_for(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"), what="a load")
    status = http.get("/sloth/status").json()
    assert browser.find_element(By.ID, "adapter").text == status["adapter"]
    assert browser.find_element(By.ID, "pending").text == str(status["pending_examples"])

    # The gate plot has one point per finished update and series, at the API's values.
    updates = http.get("/sloth/updates", params={"limit": 100}).json()["data"]
    for series, (set_, model) in {"new-candidate": ("new", "candidate"), "new-parent": ("new", "parent")}.items():
        expected = {u["id"]: u["metrics"]["eval"][set_][model] for u in updates
                    if u["status"] in ("promoted", "rejected")}
        points = browser.find_elements(By.CSS_SELECTOR, f"#gate-plot .point[data-series='{series}']")
        shown = {int(p.get_attribute("data-update")): float(p.get_attribute("data-y")) for p in points}
        assert shown.keys() == expected.keys() and len(points) == len(expected) >= 2
        assert all(shown[k] == pytest.approx(v) for k, v in expected.items())
    rejected = [u["id"] for u in updates if u["status"] == "rejected"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gate-plot .point.rejected[data-series='new-candidate']")) \
        == len(rejected)
    # Recent turns with their feedback.
    row = browser.find_element(By.CSS_SELECTOR, f"#interactions tr[data-interaction='{turn['id']}']")
    assert "👍" in row.find_element(By.CLASS_NAME, "feedback").text

    # "Serve the base model" rolls back through the API, with the key.
    browser.find_element(By.CSS_SELECTOR, "button.rollback[data-version='base']").click()
    wait_for(lambda: browser.find_element(By.ID, "adapter").text == "base model", what="the rollback")
    assert http.get("/sloth/adapters").json()["current"] is None
    # "Train now" starts an update; the page follows it: its live loss curve while it runs (held after training
    # here: a warm trainer finishes one taught pair faster than the page refreshes), and once it is done the curve
    # its record keeps. Both point for point as the API has them.
    http.post("/sloth/teach", json={"examples": [{"prompt": "Page button?", "answer": "It trains."}]})

    def drawn(update_id, state):
        plot = browser.find_element(By.ID, "loss-plot")
        if plot.get_attribute("data-update") != str(update_id) or plot.get_attribute("data-state") != state:
            return None
        return [(int(p.get_attribute("data-x")), float(p.get_attribute("data-y")))
                for p in plot.find_elements(By.CSS_SELECTOR, ".point[data-series='loss']")]

    def expected(curve):
        return [(step, pytest.approx(loss)) for step, loss in curve if loss is not None]

    with held_after_training(daemon) as paused:
        browser.find_element(By.ID, "train-now").click()
        text = wait_for(lambda: re.search(r"update (\d+) started", browser.find_element(By.ID, "action-result").text),
                        what="train now")
        started = int(text.group(1))
        assert http.get(f"/sloth/updates/{started}").json()["trigger"] == "manual" and started > updates[0]["id"]
        wait_for(paused.exists, timeout=300, what="the update to finish training")
        live = http.get("/sloth/status").json()["update"]
        assert live["update_id"] == started and len(live["loss_curve"]) == live["steps"] == 12
        # (a refresh during training drew part of it: wait for the whole curve)
        wait_for(lambda: drawn(started, "running") == expected(live["loss_curve"]), what="the live loss curve")
        assert browser.find_element(By.ID, "running-text").text.startswith(f"update {started}: 100%")
    done = daemon.wait_update(started)
    train = done["metrics"]["train"]
    assert done["status"] in ("promoted", "rejected") and train["loss_curve"] == live["loss_curve"], done
    wait_for(lambda: drawn(started, done["status"]) == expected(train["loss_curve"]),
             what=f"the loss curve of update {started}")
    assert browser.find_element(By.ID, "running-text").text.startswith(f"update {started}: {done['status']}")
    browser.refresh()  # a page that never saw it run shows the newest update's curve
    wait_for(lambda: drawn(started, done["status"]) == expected(train["loss_curve"]), what="the newest update's curve")
