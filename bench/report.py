"""The end of every bench script: where the numbers come from (machine, load) and the output rule of
``bench/``: one JSON line on stdout and ``bench/results/<name>.json`` (or ``--out``) written atomically."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from utils.io import write_json


def add_data_dir(parser) -> None:
    """``--data-dir``: the folder holding ``CHAOST2/`` (and ``SABS/``); default ``$QAMP_DATA_ROOT``,
    required when that is not set (no development path is a default)."""
    default = os.environ.get("QAMP_DATA_ROOT") or None
    parser.add_argument("--data-dir", default=default, required=default is None,
                        help="folder holding CHAOST2/ (default: $QAMP_DATA_ROOT)")


def machine() -> dict[str, Any]:
    """The machine line and the 1-minute load average (wall times are noisy on a shared CPU)."""
    torch = sys.modules.get("torch")
    software = f"torch {torch.__version__}" if torch is not None else f"python {platform.python_version()}"
    return {"machine": f"{platform.machine()} {os.cpu_count()} cpu, {software}",
            "load_average_1min": round(os.getloadavg()[0], 2)}


def emit(result: dict[str, Any], out: str | os.PathLike) -> dict[str, Any]:
    """Write ``result`` to ``out`` (folders created) and print it as one JSON line; returns it."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(json.dumps(result))
    return result
