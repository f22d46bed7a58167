"""Jobs in several processes at once, each on its share of the cores.

On a 2-core CPU two one-thread processes train 1.11x the tokens/s of one two-thread process
(``benchmarks/hub_build_workers.py``, SmolLM2-135M): `lorakit hub build --workers` and the LoraHub study run their
modules and measurements this way.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from ..core.errors import LoraConfigError

__all__ = ["available_cores", "check_worker_count", "run_in_workers"]

Job = TypeVar("Job")
Result = TypeVar("Result")


def available_cores() -> int:
    """The cores this process may run on (its affinity where the OS reports it, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_worker_count(workers: object) -> None:
    """Refuse a worker count that is not a whole number of at least 1.

    Args:
        workers: the count to check.

    Raises:
        LoraConfigError: naming the value and what a count must be.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise LoraConfigError(f"workers must be a whole number of processes, at least 1; got {workers!r}.")


def _start_worker(threads: int, setup: Callable[..., None] | None, setup_args: tuple) -> None:
    """A worker's share of the cores (torch's default, all of them, in each of N processes oversubscribes) and a
    thread lock for its progress bars (tqdm's default, a process-shared semaphore, is reported leaked when a failing
    job stops the worker), then the caller's own setup."""
    import threading

    import torch
    from tqdm import tqdm

    torch.set_num_threads(threads)
    tqdm.set_lock(threading.RLock())
    if setup is not None:
        setup(*setup_args)


def run_in_workers(function: Callable[[Job], Result], jobs: Iterable[Job], workers: int,
                   setup: Callable[..., None] | None = None, setup_args: tuple[Any, ...] = ()) -> Iterator[Result]:
    """``function(job)`` for every job in `workers` fresh processes, yielding results as they finish.

    Each job runs in a process of its own (a worker is replaced after one job, so no model or thread pool leaks from
    one job into the next), started with ``spawn`` (no forked copy of the parent's threads and model) and limited to
    ``available_cores() // workers`` torch threads; the next job goes to the first free worker. The first failure is
    raised here and stops the other workers; so does closing the iterator early.

    Args:
        function: a module-level function (it is pickled by name into the workers).
        jobs: its arguments, one per call; picklable.
        workers: processes at once (at least 1).
        setup: called once in each worker after its threads are set, with `setup_args` (module-level, picklable).
        setup_args: the arguments for `setup`.

    Returns:
        An iterator over ``function(job)``'s results in the order they finish (not the jobs' order).

    Raises:
        LoraConfigError: `workers` is not a whole number of at least 1.
        Exception: whatever `function` raised in a worker.

    Example:
        >>> from lorakit.training.workers import run_in_workers
        >>> sorted(run_in_workers(abs, [-2, 1, -3], workers=2))
        [1, 2, 3]
    """
    check_worker_count(workers)
    jobs = list(jobs)
    if not jobs:
        return
    context = multiprocessing.get_context("spawn")
    threads = max(1, available_cores() // workers)
    pool = context.Pool(min(workers, len(jobs)), _start_worker, (threads, setup, setup_args), maxtasksperchild=1)
    try:
        yield from pool.imap_unordered(function, jobs)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
