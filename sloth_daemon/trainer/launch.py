"""How the trainer child is started: one process, or one per device under torchrun.

Contract: `Launch(processes, env)`; `command(*args)` is the child's argv: `python -P -m sloth_daemon.trainer ARGS`
for one process, `python -P -m sloth_daemon.trainer.distributed --nproc-per-node N ARGS` for several (torchrun,
`torch.distributed.run`, started in-process by `trainer.distributed` so that it dies with the daemon; each worker
runs `python -m sloth_daemon.trainer ARGS` with torchrun's RANK/WORLD_SIZE/LOCAL_RANK). `env` is added to the
trainer's environment (`placement.TrainPlacement.env`: CUDA_VISIBLE_DEVICES). `warm` says whether a warm trainer
(`trainer.warm`, a stdin protocol) can run this launch: only a single process can.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..placement import TrainPlacement


@dataclass(frozen=True)
class Launch:
    processes: int = 1
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_placement(cls, placement: TrainPlacement) -> "Launch":
        return cls(processes=placement.processes, env=dict(placement.env))

    @property
    def warm(self) -> bool:
        return self.processes == 1

    def command(self, *args: str) -> list[str]:
        if self.processes == 1:
            return [sys.executable, "-P", "-m", "sloth_daemon.trainer", *args]
        return [sys.executable, "-P", "-m", "sloth_daemon.trainer.distributed", "--nproc-per-node",
                str(self.processes), *args]
