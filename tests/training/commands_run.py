"""Run by multi-rank tests through `run_ranks`: the `vlm` command lines of a JSON file (a list of
argument lists), one after the other, in the same processes.

Lightning starts the other ranks at the first command, from this script with the same file, so
every rank runs the same list; later commands reuse the ranks and their process group. That saves
starting two interpreters per command, most of the time of a short 2-rank run.
"""

import json
import sys
from pathlib import Path

from vlm.cli import main


def run(commands: list[list[str]]) -> None:
    for argv in commands:
        code = main(argv)
        if code:
            raise SystemExit(f"vlm {' '.join(argv)} exited with {code}")


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))

