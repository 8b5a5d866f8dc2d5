"""The daemon: builds the parts from the config, starts them in order, serves HTTP, stops them in reverse.

Start-up order (each step needs the one before): state dir → replay store (an update left `running` by a crash is
marked failed) → adapter registry (half-written adapters removed) → model folder (the built-in tiny model is built
on first use) → engine → the promoted adapter from CURRENT is loaded → scheduler → ZeroMQ sockets (`zmq`; they
stop first). Anchors are made in the background; updates wait for them. `GET /health` answers once all this is done
(uvicorn accepts connections only after the lifespan start-up returns).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any

import uvicorn

from sloth_replay import ReplayStore

from . import __version__
from .adapters import AdapterRegistry
from .anchors import ensure_anchors
from .api.http import create_app
from .api.zmq import ZmqBindError, ZmqServer
from .api.zmq_protocol import resolve_addresses
from .config import DaemonConfig
from .engine.base import AdapterLoadError, Engine
from .scheduler import UpdateScheduler
from .turns import TurnService
from .updater import Updater

log = logging.getLogger("sloth_daemon")


def make_engine(cfg: DaemonConfig, model_path: Path, model_name: str) -> Engine:
    if cfg.engine == "embedded":
        from .engine.embedded import EmbeddedEngine

        return EmbeddedEngine(model_path, model_name=model_name, device=cfg.device)
    raise NotImplementedError(f"engine {cfg.engine!r} is not available in this build")


def resolve_model(cfg: DaemonConfig) -> tuple[Path, str]:
    """The model folder to serve and its served name."""
    if cfg.model:
        path = Path(cfg.model).expanduser().resolve()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"--model {cfg.model}: no Hugging Face model folder there (config.json missing)")
        return path, cfg.served_model_name or path.name
    from .default_model import DEFAULT_MODEL_NAME, ensure_default_model

    path = ensure_default_model(cfg.models_dir, progress=lambda m: log.info("default model: %s", m))
    return path, cfg.served_model_name or DEFAULT_MODEL_NAME


class Daemon:
    def __init__(self, cfg: DaemonConfig):
        self.cfg = cfg
        self.started_at = int(time.time())
        self.store: ReplayStore
        self.registry: AdapterRegistry
        self.engine: Engine
        self.turns: TurnService
        self.updater: Updater
        self.scheduler: UpdateScheduler
        self.model_name = ""
        self.zmq: ZmqServer | None = None
        self._background: set[asyncio.Task] = set()

    async def start(self) -> None:
        cfg = self.cfg
        for d in (cfg.state_dir, cfg.adapters_dir, cfg.runs_dir, cfg.models_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.store = ReplayStore(cfg.replay_db)
        if n := self.store.fail_running_updates("the daemon stopped while the update ran"):
            log.warning("marked %d interrupted update(s) as failed; their examples are pending again", n)
        self.registry = AdapterRegistry(cfg.adapters_dir)
        if removed := self.registry.cleanup_staging():
            log.warning("removed half-written adapter folder(s): %s", ", ".join(removed))
        model_path, self.model_name = await asyncio.to_thread(resolve_model, cfg)
        self.engine = make_engine(cfg, model_path, self.model_name)
        await self.engine.start()
        current = self.registry.current()
        if current:
            try:
                await self.engine.swap_adapter(current, self.registry.path(current))
            except AdapterLoadError as e:
                log.error("could not load the current adapter %s, serving the base model: %s", current, e)
        self.turns = TurnService(self.engine, self.store, self.model_name)
        self.updater = Updater(cfg, self.store, self.registry, self.engine, model_path)
        self.scheduler = UpdateScheduler(cfg.schedule, self.updater)
        self.scheduler.start()
        self._spawn(self._make_anchors())
        await self._start_zmq()
        log.info("serving %s (%s engine) with adapter %s; state in %s", self.model_name, self.engine.name,
                 current or "none (base model)", cfg.state_dir)

    async def _start_zmq(self) -> None:
        cfg = self.cfg
        addresses = resolve_addresses(cfg.zmq, cfg.state_dir)
        if not addresses:
            return
        server = ZmqServer(self, addresses, max_message_bytes=cfg.zmq_max_message_bytes,
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

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _make_anchors(self) -> None:
        try:
            if self.cfg.anchors.enabled:
                await ensure_anchors(self.store, self.engine, self.cfg.anchors.max_tokens)
        except Exception:
            log.exception("anchor generation failed; updates run without anchors")
        finally:
            self.updater.ready.set()

    async def stop(self) -> None:
        if self.zmq is not None:
            await self.zmq.stop()
        self.scheduler.shutdown()
        await self.updater.stop()
        for task in list(self._background):
            task.cancel()
        await self.engine.stop()
        self.store.close()

    def status(self) -> dict:
        return {
            "version": __version__,
            "model": self.model_name,
            "engine": self.engine.name,
            "adapter": self.engine.current_adapter,
            "pending_examples": self.store.count_pending(),
            "anchors": self.store.count_anchors(),
            "interactions": self.store.count_interactions(),
            "update": self.updater.progress,
            "recent_updates": self.store.list_updates(limit=5),
            "scheduler": self.scheduler.next_runs(),
            "in_flight": {str(k): v for k, v in self.engine.in_flight().items()},
            "state_dir": str(self.cfg.state_dir),
            "zmq": [ep.address for ep in self.zmq.endpoints] if self.zmq else [],
        }


def build_app(cfg: DaemonConfig) -> tuple[Daemon, Any]:
    daemon = Daemon(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any):
        await daemon.start()
        try:
            yield
        finally:
            await daemon.stop()

    return daemon, create_app(daemon, lifespan=lifespan)


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT after a graceful shutdown (exit status -15); a daemon that stopped
    cleanly on request exits 0 instead, which is what systemd and scripts expect."""

    @contextlib.contextmanager
    def capture_signals(self):
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(cfg: DaemonConfig) -> None:
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _daemon, app = build_app(cfg)
    server = _Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                                    timeout_graceful_shutdown=30))
    server.run()
