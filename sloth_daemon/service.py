"""The daemon: builds the parts from the config, starts them in order, serves HTTP, stops them in reverse.

Start-up order (each step needs the one before): state dir → replay store (an update left `running` by a crash is
marked failed) → adapter registry (half-written adapters removed) → model folder (the built-in tiny model is built
on first use) → engine → the promoted adapter from CURRENT is loaded → scheduler → ZeroMQ sockets (`zmq`; they
stop first). Anchors are made in the background; updates wait for them. A served version that is tainted (a
forget request's rebuild did not finish) gets its rebuild started (`forgetting.py`). `GET /health` answers once all this is done
(uvicorn accepts connections only after the lifespan start-up returns).

Process life (what systemd sees; `notify.py` speaks the protocol): READY=1 once the HTTP socket listens, STATUS=
lines saying what is served and done, WATCHDOG=1 from the event loop. SIGTERM/SIGINT: STOPPING=1, no new
connections, a running update stopped at once (recorded as failed, "daemon stopping"; its examples pending again),
requests in flight get `shutdown_grace_s` to finish, then the parts stop in reverse order and the process exits 0.
SIGHUP: the config is read again and the settings in `LIVE_SETTINGS` apply at once; changes to the others are
reported (log and STATUS) as needing a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import uvicorn

from sloth_replay import ReplayStore
from sloth_replay.forgetting import tainted_adapters

from . import __version__
from .adapters import AdapterRegistry
from .admission import Admission
from .anchors import ensure_anchors
from .api.auth import SecretRedactor
from .api.edge import SlowHeadProtocol
from .api.http import create_app
from .api.zmq import ZmqBindError, ZmqServer
from .api.zmq_protocol import resolve_addresses
from .config import ConfigError, DaemonConfig
from .engine.base import AdapterLoadError, Engine
from .forgetting import mark_tainted
from .housekeeping import prune
from .idempotency import IdempotencyCache
from .logs import configure_logging
from .metrics import DaemonMetrics
from .notify import Notifier
from .operations import Operations
from .scheduler import UpdateScheduler
from .state_lock import StateDirLock, StateDirLocked
from .store_worker import StoreBusy, StoreWorker
from .turns import TurnService
from .updater import Updater

log = logging.getLogger("sloth_daemon")

# Settings a SIGHUP applies while serving (the parts read them per request or per update); any other changed
# setting (host, port, zmq, model, engine, device, state_dir, ...) needs a restart.
LIVE_SETTINGS = ("log_level", "api_key", "shutdown_grace_s", "train", "mix", "gate", "schedule", "generation",
                 "anchors", "limits", "retention", "metrics_open_on_loopback")
STATUS_REFRESH_S = 2.0  # how often STATUS= is refreshed (pending counts change without an event)
STARTUP_PATIENCE_S = 60.0  # start-up store writes wait this long for a lock another process holds
JOURNAL_FILE = "turn-journal.jsonl"
EXIT_STATE_DIR_LOCKED = 4  # `serve` exit status when another daemon holds the state dir


def _recover_interrupted_update(store: ReplayStore) -> dict | None:
    """At start, a `running` update means the last run stopped during it: mark it failed (its examples are pending
    again) and return it."""
    interrupted = store.running_update()
    store.fail_running_updates("the daemon stopped while the update ran")
    return interrupted


def make_engine(cfg: DaemonConfig, model_path: Path, model_name: str) -> Engine:
    if cfg.engine == "embedded":
        from .engine.embedded import EmbeddedEngine

        return EmbeddedEngine(model_path, model_name=model_name, device=cfg.device, chat_template=cfg.chat_template,
                              quantization=cfg.embedded.quantization)
    if cfg.engine == "vllm":
        from .engine.vllm import VllmEngine

        return VllmEngine(model_path, model_name=model_name, cfg=cfg.vllm, lora_rank=cfg.train.lora_r,
                          chat_template=cfg.chat_template, device=cfg.device)
    raise NotImplementedError(f"engine {cfg.engine!r} is not available in this build")


def check_gpus(cfg: DaemonConfig) -> None:
    """Refuse to start when `device` or `train.devices` names a GPU this machine lacks (`ConfigError`)."""
    import torch

    from .placement import check_available

    if cfg.device.startswith("cuda") or any(d.startswith("cuda") for d in cfg.train.devices):
        tp = cfg.vllm.tensor_parallel_size if cfg.engine == "vllm" else 1
        try:
            check_available(cfg.train.devices, cfg.device, tp, torch.cuda.device_count())
        except ValueError as e:
            raise ConfigError(f"invalid configuration:\n  {e}") from None


def resolve_model(cfg: DaemonConfig) -> tuple[Path, str]:
    """The model folder to serve and its served name."""
    if cfg.model:
        path = Path(cfg.model).expanduser().resolve()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"--model {cfg.model}: no Hugging Face model folder there (config.json missing)")
        return path, cfg.served_model_name or path.name
    from .default_model import DEFAULT_MODEL_NAME, check_problem, ensure_default_model, read_build_info

    path = ensure_default_model(cfg.models_dir, progress=lambda m: log.info("default model: %s", m))
    if problem := check_problem(read_build_info(path)):
        log.warning("%s", problem)
    return path, cfg.served_model_name or DEFAULT_MODEL_NAME


class Daemon:
    def __init__(self, cfg: DaemonConfig, notifier: Notifier | None = None):
        self.cfg = cfg
        self.notifier = notifier or Notifier(None)
        self.stopping = False
        self.restart_needed: list[str] = []  # changed settings a reload could not apply
        self.reload_problem: str | None = None
        self.started_at = int(time.time())
        self.store: StoreWorker
        self._pending = 0  # last known count of pending examples (the STATUS= line must not wait on the store)
        self.registry: AdapterRegistry
        self.engine: Engine
        self.turns: TurnService
        self.updater: Updater
        self.scheduler: UpdateScheduler
        self.model_name = ""
        self.zmq: ZmqServer | None = None
        self._background: set[asyncio.Task] = set()
        self.metrics = DaemonMetrics(self)  # read at scrape time; front ends report requests through ops
        self.state_lock = StateDirLock(cfg.state_dir)
        self.admission = Admission(cfg.max_queued_requests)  # one engine: one bound for HTTP and ZeroMQ together
        self.idempotency = IdempotencyCache(cfg.idempotency_window_s)
        self.ops = Operations(self)  # what the front ends see of the daemon

    async def start(self) -> None:
        cfg = self.cfg
        await asyncio.to_thread(self._prepare_state_dir)
        self.notifier.status("starting: opening the replay store")
        self.store = await asyncio.to_thread(StoreWorker, cfg.replay_db, cfg.state_dir / JOURNAL_FILE,
                                             busy_timeout_s=cfg.store_busy_timeout_s)
        # Start-up bookkeeping may wait for a lock another process holds: no client waits yet.
        interrupted = await self.store.write(_recover_interrupted_update, patience_s=STARTUP_PATIENCE_S)
        if interrupted is not None:
            log.warning("marked interrupted update %d as failed; its examples are pending again", interrupted["id"])
        if n := await self.store.retry_journal(patience_s=STARTUP_PATIENCE_S):
            log.info("logged %d journaled turn(s) from the last run", n)
        await self.refresh_pending()
        self.registry = AdapterRegistry(cfg.adapters_dir)
        if removed := await asyncio.to_thread(self.registry.cleanup_staging):
            log.warning("removed half-written adapter folder(s): %s", ", ".join(removed))
        if interrupted is not None:
            await asyncio.to_thread(self._disown_unserved_adapters, interrupted["id"])
        await mark_tainted(self.store, self.registry)  # a crash right after a forget request left the registry behind
        await asyncio.to_thread(prune, cfg.runs_dir, self.registry, cfg.retention.keep_last)
        check_gpus(cfg)
        self.notifier.status("starting: loading the model")
        model_path, self.model_name = await asyncio.to_thread(resolve_model, cfg)
        self.engine = make_engine(cfg, model_path, self.model_name)
        await self.engine.start()
        current = await asyncio.to_thread(self.registry.current)
        if current:
            try:
                await self.engine.swap_adapter(current, self.registry.path(current))
            except AdapterLoadError as e:
                log.error("could not load the current adapter %s, serving the base model: %s", current, e)
        self.turns = TurnService(self.engine, self.store, self.model_name)
        self.updater = Updater(cfg, self.store, self.registry, self.engine, model_path, on_change=self.refresh_status)
        self.scheduler = UpdateScheduler(cfg.schedule, self.updater)
        self.scheduler.start()
        self._spawn(self.updater.preload())  # on CUDA: the warm trainer loads the base while anchors are made
        self._spawn(self._make_anchors())
        self._spawn(self._resume_rebuild())
        self._spawn(self.store.run_journal_retry())
        await self._start_zmq()
        # Everything made so far (the model, torch's and transformers' module state) lives as long as the daemon: out
        # of the collector's way, a full collection no longer walks millions of objects and stalls the event loop
        # (and the watchdog) for seconds on a busy machine.
        gc.freeze()
        log.info("serving %s (%s engine) with adapter %s; state in %s", self.model_name, self.engine.name,
                 current or "none (base model)", cfg.state_dir)

    async def _start_zmq(self) -> None:
        cfg = self.cfg
        addresses = resolve_addresses(cfg.zmq, cfg.state_dir)
        if not addresses:
            return
        server = ZmqServer(self.ops, addresses, max_message_bytes=cfg.zmq_max_message_bytes,
                           max_inflight=cfg.zmq_max_inflight, api_key=cfg.api_key)
        try:
            await server.start()
        except ZmqBindError as e:
            if cfg.zmq != "auto":
                raise
            # The default socket must not keep the HTTP API from serving; an explicit address must.
            log.error("%s; serving without ZeroMQ (set zmq to an address, or 'off')", e)
            return
        self.zmq = server

    def _prepare_state_dir(self) -> None:
        """Take the state dir (one daemon per dir), create its folders, and tighten it and the store's files to the
        umask (a state dir made by an older version, or by hand, may be world-readable)."""
        cfg = self.cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_lock.acquire()
        for d in (cfg.adapters_dir, cfg.runs_dir, cfg.models_dir):
            d.mkdir(parents=True, exist_ok=True)
        mask = int(cfg.umask, 8)
        for path in (cfg.state_dir, cfg.replay_db, cfg.replay_db.with_name(cfg.replay_db.name + "-wal"),
                     cfg.replay_db.with_name(cfg.replay_db.name + "-shm"), cfg.state_dir / JOURNAL_FILE):
            with contextlib.suppress(FileNotFoundError, PermissionError):
                mode = path.stat().st_mode & 0o7777
                if mode & mask:
                    path.chmod(mode & ~mask)

    def _disown_unserved_adapters(self, update_id: int) -> None:
        """A crash after an update committed its adapter but before CURRENT named it (mid-swap) leaves a complete
        version that was never served for good: mark it rejected so it is never taken for a promoted one (the update
        is recorded as failed and runs again)."""
        current = self.registry.current()
        for info in self.registry.list():
            if info.update_id != update_id or info.status == "rejected":
                continue
            if info.version == current:
                log.warning("update %d was interrupted after %s became current; it stays served", update_id,
                            info.version)
                continue
            self.registry.update_meta(info.version, status="rejected",
                                      reason=f"update {update_id} was interrupted before this version was served")
            log.warning("%s (update %d) was never served: marked rejected", info.version, update_id)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _make_anchors(self) -> None:
        try:
            if self.cfg.anchors.enabled:
                await ensure_anchors(self.store, self.engine, self.cfg.anchors.max_tokens, self.updater.base_model)
        except Exception:
            log.exception("anchor generation failed; updates run without anchors")
        finally:
            self.updater.ready.set()

    async def _resume_rebuild(self) -> None:
        """A forget request whose rebuild did not finish (crash, restart) leaves the served version tainted."""
        try:
            await self.updater.rebuild_if_needed("rebuild")
        except Exception:
            log.exception("could not start the rebuild of a tainted adapter; the next update rebuilds it")

    async def stop(self) -> None:
        """Stop what was started, in reverse order (also after a start that failed half-way: the store's threads
        must end, or the process could not exit)."""
        if self.zmq is not None:
            await self.zmq.stop()
        if hasattr(self, "scheduler"):
            self.scheduler.shutdown()
        if hasattr(self, "updater"):
            await self.updater.stop()
            await self.updater.close()
        for task in list(self._background):
            task.cancel()
        if hasattr(self, "engine"):
            await self.engine.stop()
        if hasattr(self, "store"):
            await asyncio.to_thread(self.store.close)
        self.state_lock.release()

    # -- what systemd is told -------------------------------------------------------------------------------------
    def status_line(self) -> str:
        """One line for `systemctl status`: what is served and what the daemon is doing."""
        line = f"serving {self.engine.current_adapter or 'base model'}; "
        if self.stopping:
            line += "stopping"
        elif (p := self.updater.progress) is not None:
            line += f"training update {p['update_id']} {p['progress']:.0%}"
        else:
            n = self._pending
            line += f"idle, {n} example{'' if n == 1 else 's'} pending"
        if self.restart_needed:
            line += "; restart to apply " + ", ".join(self.restart_needed)
        if self.reload_problem:
            line += "; " + self.reload_problem
        return line

    def refresh_status(self) -> None:
        if not self.stopping:
            self.notifier.status(self.status_line())

    async def refresh_pending(self) -> None:
        """Re-count the pending examples for the STATUS= line (a busy store keeps the last count)."""
        with contextlib.suppress(StoreBusy):
            self._pending = await self.store.read(lambda s: s.count_pending())

    def begin_stop(self) -> None:
        """SIGTERM: tell systemd, start no more updates, and stop a running one now (while HTTP drains)."""
        if self.stopping:
            return
        self.stopping = True
        busy = sum(self.engine.in_flight().values())
        update = self.updater.progress
        self.notifier.stopping(f"stopping: finishing {busy} request(s) in flight"
                               + (f", stopping update {update['update_id']}" if update else ""))
        self.scheduler.shutdown()
        self._spawn(self.updater.stop("daemon stopping"))

    def reload(self, new: DaemonConfig) -> tuple[list[str], list[str]]:
        """SIGHUP: apply the changed settings that can change live; returns (applied, needing a restart)."""
        changed = [k for k in DaemonConfig.model_fields if getattr(new, k) != getattr(self.cfg, k)]
        applied = [k for k in changed if k in LIVE_SETTINGS]
        for key in applied:  # the parts hold this same config object and read it per request or per update
            setattr(self.cfg, key, getattr(new, key))
        if "schedule" in applied:
            self.scheduler.reconfigure(self.cfg.schedule)
        if "log_level" in applied:
            set_log_level(self.cfg.log_level)
        if "api_key" in applied and self.zmq is not None:
            self.zmq.api_key = self.cfg.api_key
        self.restart_needed = [k for k in changed if k not in LIVE_SETTINGS]
        self.reload_problem = None
        log.info("config reloaded: %s", ("applied " + ", ".join(applied)) if applied else "no live setting changed")
        if self.restart_needed:
            log.warning("config reload: %s changed and need(s) a restart to apply", ", ".join(self.restart_needed))
        return applied, self.restart_needed

    async def status(self) -> dict:
        counts = await self.store.read(lambda s: (s.count_pending(), s.count_anchors(), s.count_interactions(),
                                                  s.list_updates(limit=5), s.count_set_aside(),
                                                  s.set_aside_examples(limit=10), tainted_adapters(s)))
        self._pending = counts[0]
        return {
            "version": __version__,
            "model": self.model_name,
            "engine": self.engine.name,
            "chat_template": fmt.describe() if (fmt := getattr(self.engine, "chat_format", None)) else None,
            "adapter": self.engine.current_adapter,
            "pending_examples": counts[0],
            "set_aside_examples": counts[4],
            "set_aside": counts[5],
            "tainted_adapters": counts[6],
            "adapter_tainted": counts[6].get(self.engine.current_adapter or ""),
            "anchors": counts[1],
            "interactions": counts[2],
            "journaled_turns": len(self.store.journal.pending_ids),
            "update": self.updater.progress,
            "recent_updates": counts[3],
            "scheduler": self.scheduler.next_runs(),
            "in_flight": {str(k): v for k, v in self.engine.in_flight().items()},
            "admission": self.admission.snapshot(),
            "state_dir": str(self.cfg.state_dir),
            "restart_needed": self.restart_needed,
            "zmq": [ep.address for ep in self.zmq.endpoints] if self.zmq else [],
            **({"vllm": self.engine.describe()} if self.engine.name == "vllm" else {}),
        }


def set_log_level(level: str) -> None:
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(level.upper())


def build_app(cfg: DaemonConfig, notifier: Notifier | None = None) -> tuple[Daemon, Any]:
    daemon = Daemon(cfg, notifier)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any):
        try:
            await daemon.start()
        except BaseException:
            await daemon.stop()
            raise
        try:
            yield
        finally:
            await daemon.stop()

    return daemon, create_app(daemon.ops, lifespan=lifespan)


class _Server(uvicorn.Server):
    """uvicorn with the daemon's process life: the notify protocol, SIGHUP reloads, a SIGTERM that stops a running
    update at once rather than after the drain, and exit status 0 after a graceful SIGTERM/SIGINT (uvicorn would
    re-raise the signal: status -15), which is what systemd and scripts expect."""

    def __init__(self, config: uvicorn.Config, daemon: Daemon,
                 reload_config: Callable[[], DaemonConfig] | None = None):
        super().__init__(config)
        self.daemon = daemon
        self.notifier = daemon.notifier
        self.reload_config = reload_config
        self._tasks: set[asyncio.Task] = set()
        self._reload_lock = asyncio.Lock()

    def _task(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @contextlib.contextmanager
    def capture_signals(self):
        loop = asyncio.get_running_loop()  # called inside uvicorn's serve(), on the daemon's loop
        handlers = {signal.SIGINT: self.handle_exit, signal.SIGTERM: self.handle_exit,
                    signal.SIGHUP: lambda *_: loop.call_soon_threadsafe(self._on_hup)}
        original = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list | None = None) -> None:
        # Pings start at once: start-up work (model loading) runs in threads, so the loop stays responsive.
        self._task(self.notifier.run_watchdog())
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            # The socket listens now: requests are answered from this moment, and /health says 200.
            self.notifier.ready(self.daemon.status_line())
            self._status_task = self._task(self._refresh_status())

    async def _refresh_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_REFRESH_S)
            await self.daemon.refresh_pending()
            self.daemon.refresh_status()

    def _on_hup(self) -> None:
        if not self.started or self.should_exit:
            log.warning("SIGHUP ignored: the daemon is %s", "stopping" if self.should_exit else "starting")
            return
        self._task(self._reload())

    async def _reload(self) -> None:
        async with self._reload_lock:
            if self.reload_config is None:
                log.warning("SIGHUP: no configuration source to reload from")
                return
            self.notifier.reloading()
            try:
                new = await asyncio.to_thread(self.reload_config)
                check_gpus(new)  # train.devices is live: a GPU this machine lacks is refused like a bad file
            except ConfigError as e:
                log.error("SIGHUP: the configuration is invalid; the running one stays:\n%s", e)
                self.daemon.reload_problem = "config reload failed (see the log)"
            else:
                self.daemon.reload(new)
            self.notifier.ready(self.daemon.status_line())

    async def shutdown(self, sockets: list | None = None) -> None:
        self.config.timeout_graceful_shutdown = self.daemon.cfg.shutdown_grace_s
        self.daemon.begin_stop()
        if getattr(self, "_status_task", None) is not None:
            self._status_task.cancel()
        try:
            await super().shutdown(sockets=sockets)  # stop accepting, drain, then the lifespan stops the daemon
        finally:
            for task in list(self._tasks):
                task.cancel()
            self.notifier.close()


def serve(cfg: DaemonConfig, reload_config: Callable[[], DaemonConfig] | None = None) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT. `reload_config` re-reads the configuration on SIGHUP
    (the CLI passes one that reads the same file, environment and flags)."""
    os.umask(int(cfg.umask, 8))  # before anything is created: state dir 0700, files 0600 by default
    notifier = Notifier.from_environment()
    log_config = configure_logging(cfg.log_level, cfg.log_format)
    daemon, app = build_app(cfg, notifier)
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        daemon.state_lock.acquire()  # before the port is bound: a second daemon says why and exits at once
    except StateDirLocked as e:
        log.error("%s", e)
        notifier.status(str(e))
        raise SystemExit(EXIT_STATE_DIR_LOCKED) from None
    protocol = type("HttpProtocol", (SlowHeadProtocol,), {"header_timeout_s": cfg.http_header_timeout_s})
    server = _Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, http=protocol,
                                    log_config=log_config, timeout_keep_alive=cfg.http_keep_alive_s,
                                    timeout_graceful_shutdown=cfg.shutdown_grace_s), daemon, reload_config)
    # After uvicorn configured its loggers: request lines lose keys sent in query strings (and the key anywhere).
    logging.getLogger("uvicorn.access").addFilter(SecretRedactor(lambda: daemon.cfg.api_key))
    server.run()
