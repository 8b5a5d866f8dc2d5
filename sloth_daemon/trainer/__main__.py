"""Child-process entry point: `python -m sloth_daemon.trainer JOB.json` runs the recipe and prints JSON lines."""

import json
import sys

from .job import TrainJob
from .recipe import run


def main() -> int:
    job = TrainJob.model_validate_json(open(sys.argv[1]).read())

    def emit(event: dict) -> None:
        print(json.dumps(event), flush=True)

    result = run(job, emit)
    emit({"event": "result", **result.model_dump()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
