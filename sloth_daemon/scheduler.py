"""When updates start on their own: APScheduler jobs on the daemon's event loop.

Contract:
- Every `schedule.check_seconds` the `threshold` job starts an update when `schedule.min_new_examples` or more new
  examples wait; every `schedule.interval_minutes` (when > 0) the `interval` job starts one when any wait.
- Jobs never overlap (`max_instances=1`, missed runs coalesced) and the updater's store-backed slot refuses a second
  update, so neither a slow check nor a restart can start two; an update interrupted by a crash was marked failed
  at start-up and its examples are pending again, so the next check retries it.
- Periodic checks log at DEBUG only (APScheduler's own "Running job ..." lines too): an idle daemon's log stays
  quiet at INFO; starting an update logs at INFO.
"""

from __future__ import annotations

import logging

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from sloth_replay import UpdateAlreadyRunning

from .config import ScheduleConfig
from .store_worker import StoreBusy
from .updater import NothingToTrain, Updater

log = logging.getLogger(__name__)


class _RoutineAtDebug(logging.Filter):
    """Demote APScheduler's per-run INFO records ("Running job", "executed successfully") to DEBUG: they come
    every `check_seconds`. Kept only when the daemon logs at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


_executor_log = logging.getLogger("apscheduler.executors.default")
if not any(isinstance(f, _RoutineAtDebug) for f in _executor_log.filters):
    _executor_log.addFilter(_RoutineAtDebug())


class UpdateScheduler:
    def __init__(self, cfg: ScheduleConfig, updater: Updater):
        self.cfg = cfg
        self.updater = updater
        self._scheduler = AsyncIOScheduler()

    def start(self) -> None:
        if not self.cfg.enabled:
            log.info("scheduler: disabled (manual updates only)")
            return
        self._add_jobs()
        self._scheduler.start()

    def _add_jobs(self) -> None:
        opts = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        self._scheduler.add_job(self._check_threshold, "interval", seconds=self.cfg.check_seconds, id="threshold", **opts)
        if self.cfg.interval_minutes > 0:
            self._scheduler.add_job(self._check_interval, "interval", minutes=self.cfg.interval_minutes, id="interval", **opts)

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def reconfigure(self, cfg: ScheduleConfig) -> None:
        """Apply new schedule settings live (a config reload): the jobs are replaced, a running update is untouched."""
        self.cfg = cfg
        if self._scheduler.running:
            self._scheduler.remove_all_jobs()
            if cfg.enabled:
                self._add_jobs()
            else:
                log.info("scheduler: disabled (manual updates only)")
        else:
            self.start()

    def next_runs(self) -> dict[str, str | None]:
        return {j.id: j.next_run_time.isoformat() if j.next_run_time else None for j in self._scheduler.get_jobs()}

    async def _try_start(self, trigger: str) -> int | None:
        if self.updater.running:
            return None
        try:
            update_id = await self.updater.start(trigger)
        except (NothingToTrain, UpdateAlreadyRunning, StoreBusy):
            return None
        log.info("scheduler: started update %d (%s)", update_id, trigger)
        return update_id

    async def _check_threshold(self) -> None:
        try:
            pending = await self.updater.store.read(lambda s: s.count_pending())
        except StoreBusy:
            return  # checked again at the next interval
        log.debug("scheduler: %d example(s) pending, threshold %d", pending, self.cfg.min_new_examples)
        if pending >= self.cfg.min_new_examples:
            await self._try_start("threshold")

    async def _check_interval(self) -> None:
        await self._try_start("interval")
