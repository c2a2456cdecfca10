"""Progress of a stage: a tqdm bar when stderr is a terminal, plain lines in logs and CI."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator


class LineProgress:
    """Progress as plain lines on stdout (every tenth of the total), for output that is not a
    terminal: logs and CI keep readable lines instead of carriage-return animations."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.postfix = total, desc, 0, ""
        self.every = max(1, total // 10)

    def update(self, count: int = 1) -> None:
        before, self.n = self.n, self.n + count
        if self.n // self.every > before // self.every or (self.n == self.total and before < self.total):
            print(f"{self.desc}: {self.n}/{self.total} steps{self.postfix}", flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = "".join(f", {key} {value}" for key, value in values.items())

    def close(self) -> None:
        pass



@contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True) -> Iterator[Any]:
    """A tqdm bar when stderr is a terminal, plain lines otherwise; None when not ``enabled``."""
    if not enabled:
        bar: Any = None
    elif sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
    else:
        bar = LineProgress(total, desc)
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()
