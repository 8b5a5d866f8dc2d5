"""The `sloth-daemon` command.

    sloth-daemon serve [--config FILE] [--model PATH] [--host H] [--port P] [--zmq ADDR] [--state-dir DIR]
    sloth-daemon status                       # what the running daemon serves, pending examples, recent updates
    sloth-daemon train-now [--wait] [--json]  # start an update now (and follow it to its verdict)
    sloth-daemon adapters list | rollback VERSION|latest|previous|base | remove VERSION
    sloth-daemon examples set-aside | requeue [EXAMPLE_ID ...]   # examples kept out of training; make them pending
    sloth-daemon forget [--example ID] [--feedback ID] [--turn ID] [--conversation TURN_ID] [--since T] [--until T]
    sloth-daemon replay stats [--state-dir DIR]   # reads replay.db directly; works with the daemon stopped
    sloth-daemon replay export FILE [--pending]   # the learnt examples as OpenAI-chat JSONL (what import reads)
    sloth-daemon import FILE [--format F] [--skip-invalid]   # a dataset into the running daemon
    sloth-daemon export VERSION DIR [--adapter-only]   # PEFT adapter, merged 16-bit model, Ollama Modelfile
    sloth-daemon install-service [--user NAME] [--prefix DIR] [--dry-run]   # install the systemd service
    sloth-daemon chat [--zmq ADDR]            # interactive chat over ZeroMQ with /up /down /fix /teach /status

Client commands talk to the running daemon over HTTP at `--url` (default: http://<host>:<port> from the config);
`chat` over ZeroMQ at `--zmq` (default: the address the daemon at `--url` reports binding, so it finds the daemon
exactly as `status` does, from any directory).
Exit codes: 0 success, 1 the daemon refused or failed the request (message printed), 2 bad usage or configuration,
3 the daemon is not reachable, 130 Ctrl-C while `train-now --wait` waits (the update goes on).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

import httpx
from rich.console import Console
from rich.table import Table

from .config import ConfigError, DaemonConfig, load_config

console = Console()
err_console = Console(stderr=True)

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
EXIT_INTERRUPTED = 130  # Ctrl-C while waiting (128 + SIGINT, the shell's convention)


def _die(code: int, message: str) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(code)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": getattr(args, "model", None),
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "zmq": getattr(args, "zmq", None),
        "state_dir": getattr(args, "state_dir", None),
        "engine": getattr(args, "engine", None),
    }


def _config(args: argparse.Namespace) -> DaemonConfig:
    try:
        return load_config(args.config, overrides=_overrides(args))
    except ConfigError as e:
        _die(EXIT_USAGE, str(e))


class Client:
    """A small HTTP client for the daemon's own endpoints; maps failures to exit codes."""

    def __init__(self, cfg: DaemonConfig, url: str | None):
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
        self.url = (url or f"http://{host}:{cfg.port}").rstrip("/")
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            _die(EXIT_UNREACHABLE, f"the daemon is not reachable at {self.url} ({e.__class__.__name__}); "
                                   "start it with `sloth-daemon serve` or pass --url")
        if r.status_code >= 400:
            try:
                msg = r.json()["error"]["message"]
            except Exception:
                msg = r.text
            _die(EXIT_FAILED, f"{r.status_code}: {msg}")
        return r.json()


def cmd_serve(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .service import serve

    cfg = _config(args)
    if cfg.model and not (Path(cfg.model).expanduser() / "config.json").exists():
        _die(EXIT_USAGE, f"model: {cfg.model} is not a Hugging Face model folder (no config.json there)")
    # SIGHUP re-reads the same sources: the file, the environment and these flags.
    serve(cfg, reload_config=lambda: load_config(args.config, overrides=_overrides(args)))


def cmd_install_service(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .install import InstallError, install_service

    try:
        install_service(user=args.user, prefix=Path(args.prefix), start=not args.no_start, dry_run=args.dry_run,
                        executable=Path(args.exec) if args.exec else None,
                        echo=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True))
    except InstallError as e:
        _die(EXIT_FAILED, str(e))


def cmd_status(args: argparse.Namespace) -> None:
    s = Client(_config(args), args.url).call("GET", "/sloth/status")
    if args.json:
        console.print_json(json.dumps(s))
        return
    console.print(f"[bold]{s['model']}[/] on the {s['engine']} engine, serving adapter "
                  f"[bold]{s['adapter'] or 'none (base model)'}[/]")
    console.print(f"pending examples: {s['pending_examples']}   anchors: {s['anchors']}   "
                  f"logged turns: {s['interactions']}")
    if s["update"]:
        u = s["update"]
        console.print(f"update {u['update_id']} running: {u['progress']:.0%} {u['message']}")
    _updates_table(s["recent_updates"])
    judged = next((u for u in s["recent_updates"] if (u.get("metrics") or {}).get("gate")), None)
    if judged is not None:
        from .update_watch import checks_table

        console.print(checks_table(judged))
    if s.get("adapter_tainted"):
        console.print(f"[yellow]the served adapter was trained on forgotten data[/] ({s['adapter_tainted']}); "
                      "a rebuild replaces it once promoted", highlight=False)
    if s.get("set_aside_examples"):
        console.print(f"[yellow]{s['set_aside_examples']} example(s) set aside, not trained[/] (newest first):")
        for row in s.get("set_aside") or []:
            console.print(f"  {row['example_id']}: {row['reason'][:160]}", highlight=False)


def _updates_table(rows: list[dict]) -> None:
    if not rows:
        console.print("no updates yet")
        return
    t = Table(title="recent updates")
    for col in ("id", "trigger", "status", "adapter", "started", "reason"):
        t.add_column(col)
    for u in rows:
        t.add_row(str(u["id"]), u.get("trigger") or "", u["status"], u.get("adapter_version") or "",
                  (u.get("started_at") or "")[:19], (u.get("reason") or "")[:80])
    console.print(t)


def cmd_train_now(args: argparse.Namespace) -> None:
    from .update_watch import emit, watch

    client = Client(_config(args), args.url)
    out = client.call("POST", "/sloth/updates")
    update_id = out["update_id"]
    if args.json:
        emit(console, {"event": "started", "update_id": update_id})
    else:
        console.print(f"update {update_id} started")
    if not args.wait:
        return
    try:
        u = watch(client.call, update_id, json_events=args.json, console=console)
    except KeyboardInterrupt:
        if args.json:
            emit(console, {"event": "detached", "update_id": update_id})
        err_console.print(f"stopped waiting; update {update_id} goes on in the daemon "
                          "(follow it with `sloth-daemon status`)", highlight=False)
        sys.exit(EXIT_INTERRUPTED)
    if u["status"] in ("failed", "rejected"):  # a script waiting on an update learns that nothing new is served
        sys.exit(EXIT_FAILED)


def _resolve_version(client: Client, version: str) -> str:
    """`latest`: the newest promoted version; `previous`: the promoted version before the one served."""
    if version not in ("latest", "previous"):
        return version
    out = client.call("GET", "/sloth/adapters")
    promoted = [a["version"] for a in out["data"] if a["status"] == "promoted"]
    if version == "previous":
        promoted = [v for v in promoted if out["current"] is None or v < out["current"]]
    if not promoted:
        _die(EXIT_FAILED, f"no promoted adapter is {'older than the one served' if version == 'previous' else 'there'}"
                          "; `adapters list` shows them")
    return promoted[-1]


def cmd_adapters(args: argparse.Namespace) -> None:
    client = Client(_config(args), args.url)
    if args.action == "remove":
        if not args.version:
            _die(EXIT_USAGE, "adapters remove needs a VERSION (a tainted or rejected one)")
        out = client.call("DELETE", f"/sloth/adapters/{args.version}")
        console.print(f"removed {out['removed']}")
        return
    if args.action == "rollback":
        if not args.version:
            _die(EXIT_USAGE, "adapters rollback needs a VERSION (e.g. v000002), 'latest', 'previous' or 'base'")
        out = client.call("POST", "/sloth/adapters/rollback", json={"version": _resolve_version(client, args.version)})
        console.print(f"now serving {out['current'] or 'the base model'}")
        return
    out = client.call("GET", "/sloth/adapters")
    t = Table(title=f"adapters (serving {out['current'] or 'base model'})")
    for col in ("version", "status", "parent", "created", "reason"):
        t.add_column(col)
    for a in out["data"]:
        name = f"* {a['version']}" if a["current"] else a["version"]
        status = a["status"] + (" (tainted)" if a.get("tainted") else "")
        reason = a.get("tainted") or a.get("reason") or ""
        t.add_row(name, status, a.get("parent") or "", a["created_at"][:19], reason[:80])
    console.print(t)


def cmd_forget(args: argparse.Namespace) -> None:
    body = {"example_ids": args.example, "feedback_ids": args.feedback, "interaction_ids": args.turn,
            "conversation": args.conversation, "since": args.since, "until": args.until}
    body = {k: v for k, v in body.items() if v}
    if not body:
        _die(EXIT_USAGE, "forget needs something to forget: --example, --feedback, --turn, --conversation, "
                         "--since/--until")
    client = Client(_config(args), args.url)
    client.http.timeout = httpx.Timeout(300)  # a running update is stopped first
    out = client.call("POST", "/sloth/forget", json=body)
    if args.json:
        console.print_json(json.dumps(out))
        return
    console.print(f"forgot {out['examples']} example(s), {out['feedback']} feedback, {out['interactions']} "
                  f"turn(s)", highlight=False)
    if out["stopped_update"] is not None:
        console.print(f"stopped the running update {out['stopped_update']} first")
    if out["tainted"]:
        console.print(f"[yellow]trained on forgotten data (tainted, never served again):[/] {', '.join(out['tainted'])}")
    rebuild = out["rebuild"]
    if rebuild and rebuild["status"] == "running":
        console.print(f"rebuild update {rebuild['update_id']} started; the tainted adapter is served until it is "
                      "promoted (`sloth-daemon status`)")
    elif rebuild:
        console.print("nothing is left to learn: serving the base model")
    if out["requeued"]:
        console.print(f"{len(out['requeued'])} set-aside example(s) that contradicted what was forgotten are pending")


def _zmq_address(cfg: DaemonConfig, args: argparse.Namespace) -> str:
    """The daemon's ZeroMQ address: `--zmq`, else what the running daemon says it binds (found over HTTP the way
    `status` finds it, so the current directory does not matter), else the config's."""
    if args.zmq:
        return args.zmq.split(",")[0].strip()
    addresses = Client(cfg, args.url).call("GET", "/sloth/status").get("zmq") or []
    if not addresses:
        _die(EXIT_USAGE, "the daemon serves no ZeroMQ (zmq = 'off' in its configuration); pass --zmq ADDRESS")
    return next((a for a in addresses if a.startswith("ipc://")), addresses[0])


def cmd_examples(args: argparse.Namespace) -> None:
    client = Client(_config(args), args.url)
    if args.action == "requeue":
        body = {"example_ids": args.ids} if args.ids else {}
        out = client.call("POST", "/sloth/examples/requeue", json=body)
        console.print(f"{out['requeued']} example(s) pending again; {out['pending_examples']} pending")
        return
    if args.ids:
        _die(EXIT_USAGE, "examples set-aside takes no ids")
    out = client.call("GET", "/sloth/examples/set-aside")
    t = Table(title=f"{out['total']} example(s) set aside")
    for col in ("example", "update", "since", "reason"):
        t.add_column(col)
    for row in out["data"]:
        t.add_row(row["example_id"], str(row["update_id"] or ""), row["set_aside_at"][:19], row["reason"][:120])
    console.print(t)


def cmd_chat(args: argparse.Namespace) -> None:
    from .chat import run_chat
    from .client import SlothClient

    cfg = _config(args)
    with SlothClient(_zmq_address(cfg, args), timeout=args.timeout, api_key=cfg.api_key) as client:
        code = run_chat(client, system=args.system, max_tokens=args.max_tokens, temperature=args.temperature,
                        connect_timeout=min(args.timeout, 10))
    sys.exit(code)


def cmd_replay(args: argparse.Namespace) -> None:
    from sloth_replay import ReplayStore

    cfg = _config(args)
    if not cfg.replay_db.exists():
        _die(EXIT_FAILED, f"no replay store at {cfg.replay_db} (wrong --state-dir?)")
    store = ReplayStore.open_readonly(cfg.replay_db)
    try:
        if args.action == "export":
            return _replay_export(store, args)
        stats = store.stats()
    finally:
        store.close()
    if args.json:
        console.print_json(json.dumps(stats))
        return
    t = Table(title=f"replay store {cfg.replay_db}")
    t.add_column("what")
    t.add_column("count", justify="right")
    for k, v in _flatten(stats):
        t.add_row(k, str(v))
    console.print(t)


def _replay_export(store: Any, args: argparse.Namespace) -> None:
    from .dataio.exporter import export_examples

    if not args.file:
        _die(EXIT_USAGE, "replay export needs a FILE ('-' for standard output)")
    examples = store.replay_pool() + (store.pending_examples() if args.pending else [])
    if args.file == "-":
        n = export_examples(examples, sys.stdout)
    else:
        with open(args.file, "w", encoding="utf-8") as fp:
            n = export_examples(examples, fp)
        err_console.print(f"wrote {n} example(s) to {args.file}", highlight=False)


def cmd_import(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .cli_data import DataCommandError, run_import

    client = Client(_config(args), args.url)
    client.http.timeout = httpx.Timeout(600, connect=10)  # a batch is tokenized and stored in one call: allow time
    try:
        out = run_import(Path(args.file), client.call, fmt=args.format, skip_invalid=args.skip_invalid,
                         console=err_console)
    except DataCommandError as e:
        _die(EXIT_FAILED, str(e))
    if args.json:
        console.print_json(json.dumps(out))
        return
    console.print(f"imported {out['rows']} row(s) from {args.file}: {out['added']} new example(s), "
                  f"{out['duplicates']} duplicate(s)" + (f", {out['document_chunks']} document chunk(s)"
                                                         if out["document_chunks"] else ""), highlight=False)
    for e in out["skipped"]:
        err_console.print(f"skipped line {e['line']}" + (f", field {e['field']}" if e["field"] else "")
                          + f": {e['message']}", highlight=False, markup=False)
    if "pending_examples" in out:
        console.print(f"pending examples: {out['pending_examples']}")


def cmd_export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .adapters import AdapterNotFound, AdapterRegistry
    from .dataio.exporter import ExportError, export_version

    cfg = _config(args)
    registry = AdapterRegistry(cfg.adapters_dir) if cfg.adapters_dir.exists() else None
    if registry is None:
        _die(EXIT_FAILED, f"no adapters at {cfg.adapters_dir} (wrong --state-dir?)")
    version = args.version
    if version in ("current", "latest"):
        promoted = [a.version for a in registry.list() if a.status == "promoted"]
        version = registry.current() if version == "current" else (promoted[-1] if promoted else None)
        if version is None:
            _die(EXIT_FAILED, f"no {args.version} adapter version (the base model is served)")
    try:
        adapter_dir = registry.path(version)
    except AdapterNotFound as e:
        _die(EXIT_FAILED, str(e))
    if cfg.model:
        base = Path(cfg.model).expanduser().resolve()
    else:
        from .default_model import DEFAULT_MODEL_NAME

        base = cfg.models_dir / DEFAULT_MODEL_NAME
    try:
        with err_console.status(f"exporting {version}" + ("" if args.adapter_only else " and merging it")):
            export_version(adapter_dir, base, base_model_name(base), Path(args.dir), merge=not args.adapter_only,
                           dtype=args.dtype, temperature=cfg.generation.temperature, top_p=cfg.generation.top_p)
    except ExportError as e:
        _die(EXIT_FAILED, str(e))
    console.print(f"exported {version} to {args.dir}: adapter/" + ("" if args.adapter_only else
                                                                   ", merged/ (" + args.dtype + "), Modelfile"))


def base_model_name(base: Any) -> str:
    """The base model's hub id when its config records one (`_name_or_path` like `org/name`), else its folder."""
    try:
        name = json.loads((base / "config.json").read_text()).get("_name_or_path") or ""
    except (OSError, ValueError):
        name = ""
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name
    return str(base)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.extend(_flatten(v, f"{prefix}{k}."))
        else:
            out.append((prefix + k, v))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sloth-daemon", description="Continuous online LoRA fine-tuning daemon.")
    p.add_argument("--config", help="TOML config file (env SLOTH_CONFIG)")
    sub = p.add_subparsers(dest="command", required=True)

    def client_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--url", help="daemon URL (default from the config's host and port)")

    s = sub.add_parser("serve", help="run the daemon in the foreground")
    s.add_argument("--model", help="local Hugging Face model folder (default: built-in tiny model)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--zmq", help="ZeroMQ address, e.g. ipc:///run/sloth-daemon/api.sock")
    s.add_argument("--state-dir")
    s.add_argument("--engine", choices=["embedded", "vllm"])
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("status", help="show what the running daemon is doing")
    client_args(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("train-now", help="start an update now")
    client_args(s)
    s.add_argument("--wait", action="store_true", help="show its progress and wait for the verdict (Ctrl-C: stop "
                   "waiting, the update goes on)")
    s.add_argument("--json", action="store_true", help="print events as JSON lines")
    s.set_defaults(fn=cmd_train_now)

    s = sub.add_parser("adapters", help="list adapter versions or roll back")
    client_args(s)
    s.add_argument("action", choices=["list", "rollback", "remove"])
    s.add_argument("version", nargs="?")
    s.set_defaults(fn=cmd_adapters)

    s = sub.add_parser("forget", help="delete examples, feedback, turns, a conversation or a time range; adapters "
                       "trained on them are rebuilt without them")
    client_args(s)
    s.add_argument("--example", action="append", default=[], metavar="ID", help="a training example (repeatable)")
    s.add_argument("--feedback", action="append", default=[], type=int, metavar="ID", help="a feedback (repeatable)")
    s.add_argument("--turn", action="append", default=[], metavar="ID", help="a logged turn (repeatable)")
    s.add_argument("--conversation", metavar="TURN_ID", help="every turn of this turn's conversation")
    s.add_argument("--since", metavar="TIME", help="ISO-8601: what was created at or after it")
    s.add_argument("--until", metavar="TIME", help="ISO-8601: what was created before it")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_forget)

    s = sub.add_parser("examples", help="examples set aside from training (with reasons); make them pending again")
    client_args(s)
    s.add_argument("action", choices=["set-aside", "requeue"])
    s.add_argument("ids", nargs="*", help="example ids to requeue (default: all set-aside examples)")
    s.set_defaults(fn=cmd_examples)

    s = sub.add_parser("chat", help="interactive chat over ZeroMQ, with /up /down /fix /teach (see /help)")
    client_args(s)
    s.add_argument("--zmq", help="daemon ZeroMQ address (default: the one the daemon at --url reports)")
    s.add_argument("--system", help="a system message for the conversation")
    s.add_argument("--max-tokens", type=int)
    s.add_argument("--temperature", type=float)
    s.add_argument("--timeout", type=float, default=120, help="seconds to wait for each answer (default 120)")
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("install-service", help="install, enable and start the systemd service (needs root)")
    s.add_argument("--user", default="sloth", help="service user, created when missing (default: sloth)")
    s.add_argument("--prefix", default="/", help="install root; other than / only writes the files (packaging)")
    s.add_argument("--no-start", action="store_true", help="enable at boot but do not start now")
    s.add_argument("--exec", help="the sloth-daemon executable the unit runs (default: this installation's)")
    s.add_argument("--dry-run", action="store_true", help="print the steps, change nothing")
    s.set_defaults(fn=cmd_install_service)

    s = sub.add_parser("replay", help="replay store statistics, or export the learnt examples")
    s.add_argument("action", choices=["stats", "export"])
    s.add_argument("file", nargs="?", help="export: the JSONL file to write ('-' = standard output)")
    s.add_argument("--state-dir")
    s.add_argument("--json", action="store_true")
    s.add_argument("--pending", action="store_true", help="export: also the examples not yet trained on")
    s.set_defaults(fn=cmd_replay)

    s = sub.add_parser("import", help="import a dataset (OpenAI chat, ShareGPT, Alpaca JSONL, or a text document)")
    client_args(s)
    s.add_argument("file")
    s.add_argument("--format", default="auto", choices=["auto", "openai", "sharegpt", "alpaca", "completion", "text"])
    s.add_argument("--skip-invalid", action="store_true", help="import the valid rows of a file with bad ones")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_import)

    s = sub.add_parser("export", help="export an adapter version: PEFT folder, merged model, Ollama Modelfile")
    s.add_argument("version", help="vNNNNNN, 'current' or 'latest'")
    s.add_argument("dir", help="a new (or empty) folder")
    s.add_argument("--state-dir")
    s.add_argument("--model", help="the base model folder (default: the config's, else the built-in model)")
    s.add_argument("--adapter-only", action="store_true", help="only the PEFT adapter folder (no merge)")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="merged weights' dtype")
    s.set_defaults(fn=cmd_export)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
