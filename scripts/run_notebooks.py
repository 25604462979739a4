"""Execute the notebooks and save them with their outputs (`make notebooks`), so that a reader sees
the pictures and numbers of a real run on a code-hosting page without running anything.

    python scripts/run_notebooks.py                       # every notebooks/*.ipynb, in place
    python scripts/run_notebooks.py notebooks/03_few_shot.ipynb --out /tmp/executed

The notebooks read their sizes from the environment (VLM_NB_STEPS, VLM_NB_DATA, VLM_NB_OUT,
VLM_NB_SMALL_DATA; the defaults are the real settings); the test suite runs this script with small
ones on copies. A cell that fails stops the notebook: the script names it and exits 1, and the
notebook is not written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]


def execute(path: Path, out: Path, *, timeout: int = 3600) -> None:
    """Run every cell of the notebook at `path` (in its folder) and write it, outputs included, to
    `out`; CellExecutionError when a cell fails (nothing is written then)."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.resolve().parent)}})
    client.execute()
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--out", type=Path, default=None, help="folder for the executed copies (default: in place)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        if not path.is_file():
            print(f"run_notebooks: no notebook at {path}", file=sys.stderr)
            return 2
    for path in paths:
        start = time.perf_counter()
        try:
            execute(path, (args.out / path.name) if args.out else path, timeout=args.timeout)
        except CellExecutionError as error:
            print(f"run_notebooks: {path} failed: {str(error).strip().splitlines()[-1]}", file=sys.stderr)
            return 1
        print(f"{path}: executed in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
