"""What every benchmark script shares: the record of where a figure was measured, devices,
robust timing statistics and result files (JSON plus a CSV of the rows)."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

import torch

from morphnet.costs.measured import device_name

RESULTS = Path(__file__).resolve().parent / "results"


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def setup_cpu(threads: int) -> None:
    """Pin PyTorch's intra-op threads. On a shared, busy machine 1 thread is faster and steadier
    than 2: the workers of a multi-threaded op spin-wait on each other when a core is taken."""
    torch.set_num_threads(threads)


def _git_commit(root: Path) -> str | None:
    """The commit of the checkout that holds ``root``, flagged when its sources differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
        return commit + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device, library versions, date, CPU threads and machine load at the time of measuring."""
    import morphnet

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "morphnet": morphnet.__version__,
        "morphnet_path": str(Path(morphnet.__file__).parent),
        "commit": _git_commit(Path(morphnet.__file__).parent),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values) -> float:
    return float(statistics.median(values))


def quartiles(values) -> tuple[float, float]:
    """First and third quartile (the interquartile range is our spread for timings)."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return float(q[0]), float(q[2])


def write_results(path: str | Path, payload: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> Path:
    """Write ``payload`` as JSON to ``path`` and, with ``rows``, the same rows as CSV beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    if rows:
        keys = list(dict.fromkeys(k for row in rows for k in row))
        with path.with_suffix(".csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, keys)
            writer.writeheader()
            writer.writerows({k: _flat(v) for k, v in row.items()} for row in rows)
    return path


def _flat(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
