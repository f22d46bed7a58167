"""`lorakit hub build`: one ordinary run per task, stopped on validation loss with the best evaluation's adapter
kept, finished modules skipped and interrupted ones resumed, an index and a plot, a library folder that
`hub learn --modules` takes; bad task lists and settings refused before anything trains."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from offline_fixtures import multiple_choice_task, slowed_cli, write_fake_bigbench, write_tiny_model
from safetensors.torch import load_file
from test_train import _env

from lorakit import LoraConfigError, lorahub
from lorakit.methods.lorahub.library import library_adapters
from lorakit.training.hub_build import module_folder, read_tasks
from lorakit.training.trainer import latest_checkpoint

SMALL = ["training.steps=12", "training.batch_size=4", "training.eval_every=2", "training.save_every=2", "training.max_length=32",
         "training.eval_batch_size=8", "training.lr=0.01", "training.warmup_steps=1", "data.test_size=12", "data.validation_size=8",
         "model.name={model}", "lora.r=4", "lora.lora_alpha=8", "lora.lora_dropout=0.0"]


@pytest.fixture(scope="module")
def hub_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    write_tiny_model(root / "model")
    sibling = multiple_choice_task(60) | {"name": "oddness"}
    sibling["examples"] = [{"input": f"{i} odd?", "target_scores": {"yes": i % 2, "no": 1 - i % 2}} for i in range(60)]
    write_fake_bigbench(root / "cache", {"parity": multiple_choice_task(60), "oddness": sibling})
    return root


def _build(root: Path, out: str, *extra: str, tasks: str = "parity,oddness", flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    settings = [s.format(model=root / "model") for s in SMALL]
    return subprocess.run([sys.executable, "-m", "lorakit.cli", "hub", "build", "--tasks", tasks, "--out", str(root / out), *flags,
                           *settings, *extra], env=_env(root), capture_output=True, text=True, timeout=600)


def test_a_library_is_runs_with_their_best_adapters_an_index_and_a_plot(hub_workspace):
    result = _build(hub_workspace, "library", "training.early_stopping_patience=1", "training.early_stopping_min_delta=100",
                    flags=("--keep-checkpoints",))
    assert result.returncode == 0, result.stderr[-3000:]
    library = hub_workspace / "library"
    index = json.loads((library / "library.json").read_text())
    assert [r["task"] for r in index["modules"]] == ["bigbench:parity", "bigbench:oddness"]
    assert (library / "library.png").stat().st_size > 1000
    for record in index["modules"]:
        run = library / record["folder"]
        assert {"adapter", "summary.md", "metrics.jsonl", "checkpoints", "hub_module.json"} <= {p.name for p in run.iterdir()}
        # min_delta 100: no evaluation after the first counts as better, so patience 1 stops at the second one
        assert record["stopped_early"] and record["best_step"] == 2 and record["steps"] == 4
        evaluations = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert record["validation_loss"] == next(m["eval_loss"] for m in evaluations if m["step"] == 2)
        kept = load_file(run / "adapter" / "adapter_model.safetensors")
        best = load_file(run / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors")
        assert kept.keys() == best.keys() and all(torch.equal(kept[k], best[k]) for k in kept)
        assert f"| fine-tuned accuracy  | {record['accuracy_after']:.3f}" in (run / "summary.md").read_text()
    assert [p.parent.name for p in library_adapters(library)] == ["parity", "oddness"]

    again = _build(hub_workspace, "library", "training.early_stopping_patience=1", "training.early_stopping_min_delta=100")
    assert again.returncode == 0 and "training:" not in again.stderr  # both finished: nothing trains
    assert json.loads((library / "library.json").read_text())["modules"] == index["modules"]

    changed = _build(hub_workspace, "library", "training.early_stopping_patience=1")
    assert changed.returncode == 2 and "built with other settings" in changed.stderr

    shutil.copytree(library, hub_workspace / "moved")  # a library moved elsewhere is still finished there
    moved = _build(hub_workspace, "moved", "training.early_stopping_patience=1", "training.early_stopping_min_delta=100")
    assert moved.returncode == 0 and "training:" not in moved.stderr, moved.stderr[-3000:]


def test_hub_learn_takes_the_library_folder(hub_workspace, tmp_path):
    if not (hub_workspace / "library" / "library.json").is_file():
        assert _build(hub_workspace, "library", "training.early_stopping_patience=1", "training.early_stopping_min_delta=100").returncode == 0
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"prompt": f"{i} even?", "completion": "yes" if i % 2 == 0 else "no"}) + "\n" for i in range(5)))
    out = tmp_path / "composed"
    result = subprocess.run([sys.executable, "-m", "lorakit.cli", "hub", "learn", "--modules", str(hub_workspace / "library"),
                             "--examples", str(few), "--model", str(hub_workspace / "model"), "--budget", "6", "--out", str(out)],
                            env=_env(hub_workspace), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "lorahub.json").read_text())
    assert record["modules"] == [str(p) for p in library_adapters(hub_workspace / "library")] and len(record["weights"]) == 2
    composed = lorahub.compose(library_adapters(hub_workspace / "library"), record["weights"])
    saved = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], composed.tensors[k]) for k in composed.tensors)


def test_a_killed_build_keeps_its_finished_modules_and_resumes_the_interrupted_one(hub_workspace):
    settings = [s.format(model=hub_workspace / "model") for s in SMALL] + ["training.steps=40"]
    argv = ["hub", "build", "--tasks", "parity,oddness", "--out", str(hub_workspace / "killed"), *settings]
    process = subprocess.Popen([sys.executable, "-c", slowed_cli(argv, 0.3)], env=_env(hub_workspace), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    second = hub_workspace / "killed" / "oddness"
    deadline = time.time() + 600
    while latest_checkpoint(second) is None and time.time() < deadline and process.poll() is None:  # a complete one
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    index = json.loads((hub_workspace / "killed" / "library.json").read_text())
    assert [r["folder"] for r in index["modules"]] == ["parity"]  # the index names only finished modules
    first_adapter = (hub_workspace / "killed" / "parity" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    result = _build(hub_workspace, "killed", "training.steps=40")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no checkpoint" not in result.stderr  # it resumed from the checkpoint the kill left
    assert (hub_workspace / "killed" / "parity" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == first_adapter
    assert [r["folder"] for r in json.loads((hub_workspace / "killed" / "library.json").read_text())["modules"]] == ["parity", "oddness"]
    for module in ("parity", "oddness"):  # finished: the adapter stays, the checkpoints (only there to resume) go
        assert (hub_workspace / "killed" / module / "adapter").is_dir() and not (hub_workspace / "killed" / module / "checkpoints").exists()


def test_workers_build_the_library_one_process_builds(hub_workspace):
    stopping = ("training.early_stopping_patience=1", "training.early_stopping_min_delta=100")
    if not (hub_workspace / "library" / "library.json").is_file():
        assert _build(hub_workspace, "library", *stopping).returncode == 0
    result = _build(hub_workspace, "parallel", *stopping, flags=("--workers", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "modules (2 workers)" in result.stderr and "training:" not in result.stderr  # the bars went to each module's log
    alone = json.loads((hub_workspace / "library" / "library.json").read_text())["modules"]
    together = json.loads((hub_workspace / "parallel" / "library.json").read_text())["modules"]
    assert [r["folder"] for r in together] == ["parity", "oddness"]  # task order, whichever finished first
    for one, two in zip(alone, together):
        assert {k: v for k, v in one.items() if k != "seconds"} == {k: v for k, v in two.items() if k != "seconds"}
        first = load_file(hub_workspace / "library" / one["adapter"] / "adapter_model.safetensors")
        second = load_file(hub_workspace / "parallel" / two["adapter"] / "adapter_model.safetensors")
        assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)  # one thread vs two: float order only
        assert "training:" in (hub_workspace / "parallel" / two["folder"] / "train.log").read_text()


def test_a_failing_worker_stops_the_build_in_one_line(hub_workspace):
    missing = hub_workspace / "no-such-model"  # found only when a worker loads the model, after every check passed
    result = _build(hub_workspace, "failed", f"model.name={missing}", flags=("--workers", "2"))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith("lorakit: error: ") and str(missing) in last, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "training:" not in result.stderr
    assert not (hub_workspace / "failed" / "library.json").exists()


@pytest.mark.parametrize("tasks,extra,message", [
    (" , ", [], "names no task"),
    ("parity,parity", [], "more than once"),
    ("parity", ["training.method=ia3"], "composes LoRA modules"),
    ("parity", ["training.setps=3"], "Did you mean 'training.steps'"),
    ("parity,nosuchtask", [], "nosuchtask"),
    ("parity,oddness", ["--workers", "0"], "workers must be"),
])
def test_bad_builds_are_refused_in_one_line(hub_workspace, tasks, extra, message):
    result = _build(hub_workspace, "refused", *extra, tasks=tasks)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (hub_workspace / "refused" / "library.json").exists()


def test_task_lists_and_folders(tmp_path):
    listing = tmp_path / "tasks.txt"
    listing.write_text("navigate  # the paper's\n\nlogical_deduction/three_objects\nmine.jsonl\n")
    assert read_tasks(listing) == ["bigbench:navigate", "bigbench:logical_deduction/three_objects", "mine.jsonl"]
    assert read_tasks(["bigbench:navigate"]) == ["bigbench:navigate"]
    assert module_folder("bigbench:logical_deduction/three_objects") == "logical_deduction-three_objects"
    assert module_folder("data/my task.jsonl") == "my-task"
    with pytest.raises(LoraConfigError, match="more than once"):
        read_tasks("a, bigbench:a")
