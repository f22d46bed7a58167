"""README stays true: its test command is what CI runs, and its Python examples run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_ci_runs_the_readme_test_command():
    bash_blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    test_command = next(b.strip() for b in bash_blocks if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=[f"example{i}" for i in range(len(PYTHON_BLOCKS))])
def test_readme_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


def test_readme_config_block_is_the_embedded_defaults():
    import yaml

    from lorakit.recipe import load_run_config

    block = next(b for b in re.findall(r"```yaml\n(.*?)```", README, re.S) if "training:" in b)
    documented = yaml.safe_load(block)
    defaults = load_run_config().to_dict()
    for section, values in documented.items():
        for key, value in values.items():
            assert defaults[section][key] == value, f"README says {section}.{key}={value!r}, defaults say {defaults[section][key]!r}"
