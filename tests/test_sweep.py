"""`lorakit sweep`: trials are training runs, the study lives in SQLite, a killed sweep resumes (its running
trial failed and retried), two processes share one study without running a trial twice, the report (table,
best/, plots) is rebuilt from the study, and bad sweeps are refused before anything trains."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from offline_fixtures import slowed_cli
from safetensors.torch import load_file
from test_train import _env

from lorakit import LoraConfigError
from lorakit.training.search_space import SearchSpaceError
from lorakit.training.sweep import load_sweep


def _sweep_file(workspace: Path, name: str, **settings) -> Path:
    sweep = {
        "base": {"model": {"name": str(workspace / "model")}, "data": {"source": "bigbench:parity", "test_size": 16, "validation_size": 8},
                 "lora": {"target_modules": ["q_proj", "v_proj"]},
                 "training": {"steps": 6, "batch_size": 4, "eval_every": 2, "save_every": 2, "max_length": 32, "warmup_steps": 1}},
        "output_dir": str(workspace / name), "sampler": "random", "trials": 3, "heartbeat_seconds": 1,
        "space": {"lora.r": {"choices": [2, 4]}, "training.lr": {"low": 1e-3, "high": 5e-2, "log": True},
                  "lora.target_modules": {"choices": [["q_proj", "v_proj"], "all-linear"]}},
    } | settings
    path = workspace / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def _sweep_cli(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit.cli", "sweep", *map(str, args)], env=_env(workspace), capture_output=True,
                          text=True, timeout=900)


def _study(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder / 'study.db'}")


def _states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.trials]


def test_trials_are_runs_and_the_report_ranks_them(workspace):
    result = _sweep_cli(workspace, _sweep_file(workspace, "basic", pruner="none"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = workspace / "basic"
    study = _study(out)
    assert _states(study) == ["COMPLETE"] * 3
    for trial in study.trials:  # every trial an ordinary run with its own settings
        run = Path(trial.user_attrs["folder"])
        assert {"summary.md", "metrics.jsonl", "adapter", "config.yaml"} <= {p.name for p in run.iterdir()}
        recorded = yaml.safe_load((run / "config.yaml").read_text())
        assert recorded["lora"]["r"] == trial.params["lora.r"] and recorded["training"]["lr"] == pytest.approx(trial.params["training.lr"])
        assert trial.value == trial.user_attrs["validation_accuracy"]
    best = max(study.trials, key=lambda t: (t.value, -t.number))
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(row.split("|")[1]) for row in rows][0] == best.number and len(rows) == 3
    values = [float(row.split("|")[3]) for row in rows]
    assert values == sorted(values, reverse=True)  # best first
    best_run = Path(best.user_attrs["folder"]) / "adapter" / "adapter_model.safetensors"
    assert load_file(out / "best" / "adapter_model.safetensors").keys() == load_file(best_run).keys()
    assert (out / "best" / "adapter_model.safetensors").read_bytes() == best_run.read_bytes()
    assert all((out / name).stat().st_size > 1000 for name in ("history.png", "slices.png"))
    (out / "results.md").unlink()
    (out / "history.png").unlink()
    rebuilt = _sweep_cli(workspace, "--report", out)
    assert rebuilt.returncode == 0 and (out / "results.md").read_text() == table and (out / "history.png").is_file()
    again = _sweep_cli(workspace, _sweep_file(workspace, "basic", pruner="none"))  # the study has its trials: nothing runs
    assert again.returncode == 0 and len(_study(out).trials) == 3


def test_the_median_pruner_stops_trials_that_trail(workspace):
    sweep = _sweep_file(workspace, "pruned", sampler="grid", pruner="median", pruner_startup_trials=1, trials=4,
                        space={"training.lr": {"choices": [3e-2, 1e-7, 2e-7, 3e-7]}})
    result = _sweep_cli(workspace, sweep)
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(workspace / "pruned")
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned and len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]) == 4
    for trial in pruned:  # stopped at a validation step, before the run's end, with the loss it was judged on
        steps = [line for line in (Path(trial.user_attrs["folder"]) / "metrics.jsonl").read_text().splitlines()]
        assert len(steps) < 6 and len(steps) == max(trial.intermediate_values)
        assert not (Path(trial.user_attrs["folder"]) / "adapter").exists()


def test_a_killed_sweep_resumes_and_retries_the_trial_it_was_running(workspace):
    sweep = _sweep_file(workspace, "killed", pruner="none")
    process = subprocess.Popen([sys.executable, "-c", slowed_cli(["sweep", str(sweep)], 0.3)], env=_env(workspace), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = workspace / "killed" / "trials" / "trial-0001" / "metrics.jsonl"
    deadline = time.time() + 300
    while not second.exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    study = _study(workspace / "killed")
    assert _states(study) == ["COMPLETE", "RUNNING"]
    killed_params = study.trials[1].params
    time.sleep(2.5)  # past the grace period (twice the 1 s heartbeat)
    result = _sweep_cli(workspace, sweep)
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(workspace / "killed")
    states = _states(study)
    assert states[:2] == ["COMPLETE", "FAIL"] and states.count("COMPLETE") == 3
    retried = [t for t in study.trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 1]
    assert len(retried) == 1 and retried[0].params == killed_params and retried[0].state.name == "COMPLETE"


def test_two_processes_share_one_study_and_finish_its_trials_together(workspace):
    sweep = _sweep_file(workspace, "shared", pruner="none", trials=4)
    processes = [subprocess.Popen([sys.executable, "-m", "lorakit.cli", "sweep", str(sweep)], env=_env(workspace),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for process in processes:
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-3000:]
    study = _study(workspace / "shared")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4  # together, exactly the study's trials
    folders = [t.user_attrs["folder"] for t in complete]
    assert len(set(folders)) == 4 and all((Path(f) / "adapter").is_dir() for f in folders)  # no trial run twice
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # both processes took trials
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4  # the processes' samplers do not repeat each other


@pytest.mark.parametrize("settings,error,message", [
    ({"objectve": "validation_loss"}, LoraConfigError, "unknown sweep key 'objectve'. Did you mean 'objective'"),
    ({"objective": "accuracy"}, LoraConfigError, "sweep objective='accuracy': use one of"),
    ({"sampler": "bayes"}, LoraConfigError, "sweep sampler='bayes'"),
    ({"trials": 0}, LoraConfigError, "sweep trials=0: use a positive integer"),
    ({"space": {"lora.rank": {"choices": [2]}}}, SearchSpaceError, "Did you mean 'lora.r'"),
    ({"space": {"lora.r": {"choices": []}}}, SearchSpaceError, "non-empty list"),
    ({"space": {"training.lr": {"low": 0.1, "high": 0.01}}}, SearchSpaceError, "low=0.1 > high=0.01"),
    ({"sampler": "grid"}, LoraConfigError, "grid needs finitely many values, but training.lr is a continuous range"),
])
def test_bad_sweeps_are_refused_before_anything_trains(workspace, settings, error, message):
    sweep = _sweep_file(workspace, "bad", **settings)
    with pytest.raises(error, match=message):
        load_sweep(sweep)
    result = _sweep_cli(workspace, sweep)
    assert result.returncode == 2 and "Traceback" not in result.stderr and not (workspace / "bad").exists()


def test_a_base_without_a_validation_split_is_refused(workspace):
    sweep = _sweep_file(workspace, "novalidation")
    raw = yaml.safe_load(sweep.read_text())
    raw["base"]["data"]["validation_size"] = 0
    sweep.write_text(yaml.safe_dump(raw))
    with pytest.raises(LoraConfigError, match="selects on the validation split"):
        load_sweep(sweep)


def test_a_study_made_by_other_settings_is_refused(workspace):
    assert _sweep_cli(workspace, _sweep_file(workspace, "changed", pruner="none", trials=1)).returncode == 0
    result = _sweep_cli(workspace, _sweep_file(workspace, "changed", pruner="none", trials=2, seed=5))
    assert result.returncode == 2 and "made by a sweep with other settings" in result.stderr


def test_a_second_study_in_the_same_folder_is_refused_not_mixed_into_the_first_ones_trials(workspace):
    sweep = _sweep_file(workspace, "shared_folder", pruner="none", trials=1)
    assert _sweep_cli(workspace, sweep).returncode == 0
    before = sorted(p.name for p in (workspace / "shared_folder" / "trials" / "trial-0000").iterdir())
    result = _sweep_cli(workspace, sweep, "--study", "another")
    assert result.returncode == 2 and "holds files study 'another' did not write" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert sorted(p.name for p in (workspace / "shared_folder" / "trials" / "trial-0000").iterdir()) == before
    assert optuna.get_all_study_names(f"sqlite:///{workspace / 'shared_folder' / 'study.db'}") == ["shared_folder"]


def test_diverging_trials_fail_and_the_sweep_goes_on_until_that_is_all_it_does(workspace):
    sweep = _sweep_file(workspace, "diverging", pruner="none", trials=2, space={"training.lr": {"choices": [3e37]}})  # B steps to ~3e38: overflow
    result = _sweep_cli(workspace, sweep)
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(workspace / "diverging")
    diverged = [t for t in study.trials if "diverged" in t.user_attrs]
    assert len(diverged) == 2 and all(t.state.name == "FAIL" for t in diverged)  # then it stopped instead of looping
    assert "0 complete" in (workspace / "diverging" / "results.md").read_text()
