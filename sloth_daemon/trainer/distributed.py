"""`python -m sloth_daemon.trainer.distributed --nproc-per-node N JOB.json`: torchrun for one distributed update.

Runs `torch.distributed.run` (torchrun) in this process, single node (`--standalone`: a rendezvous on a free
loopback port), N workers each running `python -m sloth_daemon.trainer JOB.json` (which sees WORLD_SIZE > 1 and runs
`trainer.fsdp`). Why not `python -m torch.distributed.run` directly: this process first asks the kernel to kill it
when the daemon dies (`__main__.die_with_parent`), and each worker does the same with this process as its parent, so
a daemon killed with SIGKILL leaves no trainer behind; and it gives each worker its share of the CPU cores
(OMP_NUM_THREADS, when the daemon's environment does not set it; torchrun's own default is 1). Exit status:
torchrun's (non-zero when a worker failed; workers' tracebacks are in the job's trainer.log).
"""

from __future__ import annotations

import argparse
import os
import sys

from .__main__ import die_with_parent


def worker_threads(processes: int, cores: int | None = None) -> int:
    """CPU threads per worker: this process's cores shared evenly (torchrun alone gives each worker 1 when
    OMP_NUM_THREADS is unset, which left the host-side loading of the base single-threaded); `cores` defaults to
    the CPUs this process may run on."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // max(1, processes))


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    parser = argparse.ArgumentParser(prog="python -m sloth_daemon.trainer.distributed")
    parser.add_argument("--nproc-per-node", type=int, required=True)
    parser.add_argument("job")
    args = parser.parse_args(argv)
    from torch.distributed.run import main as torchrun

    os.environ.setdefault("OMP_NUM_THREADS", str(worker_threads(args.nproc_per_node)))
    torchrun(["--standalone", f"--nproc-per-node={args.nproc_per_node}", "-m", "sloth_daemon.trainer", args.job])
    return 0


if __name__ == "__main__":
    sys.exit(main())
