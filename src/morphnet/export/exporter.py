"""Write ``{module name: alive output channels}`` JSON files, the learned structure."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


class StructureExporter:
    """Reads alive counts from a network regularizer and saves them as JSON.

    Keys are the conv / linear modules whose output channels are regularized; layers
    with fixed widths (for example the logits layer) are absent. Files are one flat
    JSON object, keys sorted, indent 2, integer values.
    """

    def __init__(self, network_regularizer, remove_common_prefix: bool = False):
        self.regularizer = network_regularizer
        self.remove_common_prefix = remove_common_prefix

    def get_alive_counts(self) -> dict[str, int]:
        counts = self.regularizer.alive_counts()
        if self.remove_common_prefix and counts:
            heads = {k.split(".", 1)[0] for k in counts}
            if len(heads) == 1 and all("." in k for k in counts):
                prefix = heads.pop() + "."
                counts = {k[len(prefix):]: v for k, v in counts.items()}
        return dict(sorted(counts.items()))

    def save_alive_counts(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.get_alive_counts())

    def create_file_and_save_alive_counts(self, base_dir: str | os.PathLike, global_step: int) -> Path:
        path = Path(base_dir) / "learned_structure" / f"alive_{int(global_step)}.json"
        return self.save_alive_counts(path)


def atomic_write(path: str | os.PathLike, write, *, binary: bool = False) -> Path:
    """Write a file through a temporary file in its folder, then rename: never half-written.

    The temporary file is created with mode 0666 less the user's umask, as ``open`` would create
    the file itself (``tempfile.mkstemp`` makes every file 0600, which other users and group
    members could then not read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f"{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, data) -> Path:
    """JSON with keys sorted, indent 2 and a final newline (the structure file format), atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda f: f.write(text))


def load_alive_counts(path: str | os.PathLike) -> dict[str, int]:
    """Read an exporter JSON file; clear errors for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"structure file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"structure file {path} is not valid JSON ({e}); re-export it with StructureExporter") from e
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"structure file {path} must hold one JSON object mapping module names to counts")
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"structure file {path}: the count of '{k}' must be an integer, got {v!r}")
    return data
