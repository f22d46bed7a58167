"""Shared by the benchmark scripts: peak resident memory, table cells, finished results kept on disk."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lorakit.core.atomic import atomic_write_text


def _rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """``with PeakRSS() as peak: ...`` then ``peak.mib``: the peak RSS above the level at entry,
    sampled every millisecond (``ru_maxrss`` would report whatever came before, e.g. model loading)."""

    def __enter__(self) -> PeakRSS:
        self.start, self.peak, self._done = _rss(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def peak_of_steps(run_step: Callable[[], None], steps: int = 3) -> float:
    """Peak RSS (MiB) above the current level while `run_step` runs `steps` times (a training-memory measure)."""
    with PeakRSS() as peak:
        for _ in range(steps):
            run_step()
    return peak.mib


def in_fresh_process(module: str, function: str, *args) -> float:
    """``module.function(*args)`` (a float, e.g. a peak memory) computed in a new Python process, so that the
    allocators start clean; `module` is a benchmark script's name (benchmarks/ is put on the path)."""
    import subprocess
    import sys

    code = f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import {module} as m; print(m.{function}(*{args!r}))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def mean_sd(values: list[float], digits: int) -> str:
    """``mean ± sd`` of a table cell (the value alone for a single run)."""
    import statistics

    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def kept_json(path: Path, settings: dict) -> dict | None:
    """The result `cached_json` kept in `path` for these `settings`, or None when there is none yet."""
    if path.is_file() and (kept := json.loads(path.read_text())).get("settings") == settings:
        return kept
    return None


def cached_json(path: Path, settings: dict, compute: Callable[[], dict]) -> dict:
    """`compute()`'s result, kept as JSON in `path` (written atomically) and reused while `settings` are unchanged."""
    if (kept := kept_json(path, settings)) is not None:
        return kept
    result = compute() | {"settings": settings}
    atomic_write_text(path, json.dumps(result, indent=1))
    return result


def read_summary(run_dir: Path) -> dict[str, str]:
    """The `| what | value |` rows of a `lorakit train` run's summary.md, as {what: value}."""
    rows = [line.split("|") for line in (Path(run_dir) / "summary.md").read_text().splitlines()[2:]]
    return {cells[1].strip(): cells[2].strip() for cells in rows if len(cells) >= 4}
