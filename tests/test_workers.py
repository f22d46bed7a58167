"""`run_in_workers`: every job's result, each job in a fresh process on its share of the cores, the caller's setup
in each worker, the first failure raised in the caller, bad worker counts refused."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lorakit import LoraConfigError
from lorakit.training.workers import available_cores, run_in_workers

_SETUP: list[str] = []


def _remember(word: str) -> None:
    _SETUP.append(word)


def _describe(number: int) -> tuple[int, int, int, list[str]]:
    """What a worker saw: the job's square, its process, its torch threads, what its setup left."""
    return number * number, os.getpid(), torch.get_num_threads(), list(_SETUP)


def _fail_on_two(number: int) -> int:
    if number == 2:
        raise ArithmeticError(f"job {number} failed")
    return number


def test_every_job_runs_once_in_its_own_process_with_its_share_of_the_cores():
    results = list(run_in_workers(_describe, [1, 2, 3], workers=2, setup=_remember, setup_args=("ready",)))
    assert sorted(square for square, _, _, _ in results) == [1, 4, 9]
    assert len({pid for _, pid, _, _ in results} | {os.getpid()}) == 4  # a fresh process per job, none of them this one
    assert {threads for _, _, threads, _ in results} == {max(1, available_cores() // 2)}
    assert all(setup == ["ready"] for _, _, _, setup in results)  # the setup ran once in each worker
    assert _SETUP == []  # and not here


def test_a_failing_job_is_raised_in_the_caller():
    with pytest.raises(ArithmeticError, match="job 2 failed"):
        list(run_in_workers(_fail_on_two, [1, 2, 3], workers=2))


def test_no_jobs_start_no_workers():
    assert list(run_in_workers(_describe, [], workers=2)) == []


@given(st.one_of(st.integers(max_value=0), st.floats(), st.booleans(), st.text(), st.none()))
def test_bad_worker_counts_are_refused(workers):
    with pytest.raises(LoraConfigError, match="workers must be a whole number"):
        list(run_in_workers(_describe, [1], workers=workers))
