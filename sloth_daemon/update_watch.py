"""`sloth-daemon train-now --wait`: follow one update to its verdict, as a progress bar or as JSON events.

Contract: `watch(call, update_id, json_events=..., console=...)` polls `GET /sloth/status` (the running update's
`step`, `steps`, `loss`, `tokens_per_s`, `eta_s`) every `poll_s` seconds and shows a rich progress bar (or prints
one JSON object per line: `{"event": "progress", ...}` for each new step), then reads `GET /sloth/updates/{id}` and
shows the gate's verdict with its measurements and checks (`{"event": "finished", ...}`). Returns the finished
update. A KeyboardInterrupt (Ctrl-C) is left to the caller, which says that the update goes on in the daemon.
`checks_table(update)` is the gate's checks as a table (`sloth-daemon status` shows it too).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from .progress import train_tokens_per_s


def emit(console: Console, event: dict) -> None:
    console.print(json.dumps(event), markup=False, highlight=False, soft_wrap=True)


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-:--"
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def _fields(p: dict) -> dict:
    loss = p.get("loss")
    tps = p.get("tokens_per_s")
    return {"step_text": f"{p.get('step', 0)}/{p.get('steps', '?')}",
            "loss_text": "-" if loss is None else f"{loss:.4f}",
            "tps_text": "-" if tps is None else f"{tps:,.0f}",
            "eta_text": _fmt_eta(p.get("eta_s"))}


def watch(call: Callable[..., Any], update_id: int, *, json_events: bool, console: Console,
          poll_s: float = 1.0) -> dict:
    last_step = -1
    columns = (TextColumn("update {task.fields[update_id]}"), BarColumn(), TextColumn("step {task.fields[step_text]}"),
               TextColumn("loss {task.fields[loss_text]}"), TextColumn("{task.fields[tps_text]} tok/s"),
               TextColumn("ETA {task.fields[eta_text]}"))
    with Progress(*columns, console=console, disable=json_events) as bar:
        task = bar.add_task("train", total=None, update_id=update_id, **_fields({}))
        while True:
            running = call("GET", "/sloth/status").get("update")
            if not running or running.get("update_id") != update_id:
                break
            step = running.get("step")
            if step is not None and step != last_step:
                last_step = step
                if json_events:
                    emit(console, {"event": "progress", "update_id": update_id,
                                   **{k: running.get(k) for k in ("step", "steps", "loss", "tokens_per_s", "eta_s")}})
                bar.update(task, total=running.get("steps"), completed=step, **_fields(running))
            elif step is None:
                bar.update(task, **_fields(running))
            time.sleep(poll_s)
        u = call("GET", f"/sloth/updates/{update_id}")
        train = (u.get("metrics") or {}).get("train") or {}
        if train.get("steps"):  # the bar ends where training ended, also when its last steps fell between polls
            bar.update(task, total=train["steps"], completed=train["steps"], **_fields(
                {"step": train["steps"], "steps": train["steps"], "loss": train.get("last_loss"),
                 "tokens_per_s": train_tokens_per_s(train), "eta_s": 0}))
    if json_events:
        emit(console, {"event": "finished", "update_id": update_id, "status": u["status"],
                       "adapter_version": u.get("adapter_version"), "reason": u.get("reason"),
                       "metrics": u.get("metrics") or {}})
    else:
        show_verdict(console, u)
    return u


def checks_table(update: dict) -> Table | None:
    """The gate's checks of one update: what was measured, the bound, the result; None if it was not judged."""
    gate = (update.get("metrics") or {}).get("gate")
    if not gate:
        return None
    t = Table(title=f"gate of update {update['id']}: {'promoted' if gate['promote'] else 'refused'}")
    for col in ("check", "measured", "bound", "result", "detail"):
        t.add_column(col)

    def num(x: Any) -> str:
        return "" if x is None else f"{x:.4g}"

    for c in gate["checks"]:
        t.add_row(c["name"], num(c.get("measured")), num(c.get("bound")),
                  "[green]pass[/]" if c["passed"] else "[red]FAIL[/]", c["detail"])  # wrapped, never cut: the
        # end of a detail is often the part that says what to change
    return t


def show_verdict(console: Console, u: dict) -> None:
    """The update's outcome, the gate's measurements (loss before and after, per eval set) and its checks (each
    measurement against its bound)."""
    colour = {"promoted": "green", "rejected": "yellow", "failed": "red"}.get(u["status"], "white")
    console.print(f"update {u['id']}: [bold {colour}]{u['status']}[/] {u.get('adapter_version') or ''}",
                  highlight=False)
    if u.get("reason"):
        console.print(f"  {u['reason']}", highlight=False, markup=False)
    metrics = u.get("metrics") or {}
    evals = metrics.get("eval") or {}
    if evals:
        t = Table(title="gate measurements (mean answer-token loss)")
        for col in ("eval set", "examples", "before", "after", "change"):
            t.add_column(col, justify="right" if col != "eval set" else "left")
        for name, sc in evals.items():
            before, after = sc.get("parent"), sc.get("candidate")
            change = f"{(after - before) / before:+.1%}" if before and after is not None else "-"
            t.add_row(name, str(sc.get("examples", "")), "-" if before is None else f"{before:.4f}",
                      "-" if after is None else f"{after:.4f}", change)
        console.print(t)
    checks = checks_table(u)
    if checks is not None:
        console.print(checks)
    train = metrics.get("train") or {}
    if train:
        tps = train_tokens_per_s(train) or 0

        def loss(x: Any) -> str:
            return "nan" if x is None else f"{x:.4f}"

        console.print(f"  trained {train.get('steps')} steps, loss {loss(train.get('first_loss'))} -> "
                      f"{loss(train.get('last_loss'))}, {tps:,.0f} tokens/s", highlight=False)
