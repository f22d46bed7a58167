"""The docs stay true: README's test command is what CI runs, every Python block in README.md,
CONTRIBUTING.md and docs/ runs, the config reference matches the embedded defaults, the README is a
front page, and the package keeps its layers and its fast start."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(path, code) for path in DOCUMENTS for code in re.findall(r"```python\n(.*?)```", path.read_text(), re.S)]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    bash_blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    test_command = next(b.strip() for b in bash_blocks if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 10_500
    for link in re.findall(r"\]\(((?:docs/|CONTRIBUTING)[^)]*)\)", readme):
        path, _, anchor = link.partition("#")
        assert (ROOT / path).is_file(), link
        if anchor:
            assert anchor in _github_anchors((ROOT / path).read_text()), link


def _github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings: lower case, punctuation dropped, spaces as '-'."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("path,code", BLOCKS, ids=[f"{p.name}-{i}" for i, (p, _) in enumerate(BLOCKS)])
def test_documented_example_runs(path, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(path.relative_to(ROOT)), "exec"), {"__name__": "docs"})


def test_config_reference_is_the_embedded_defaults():
    import yaml

    from lorakit.training.recipe import load_run_config

    text = (ROOT / "docs" / "training.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "training:" in b)
    documented = yaml.safe_load(block)
    defaults = load_run_config().to_dict()
    assert set(documented) == set(defaults), "every config section is documented"
    for section, values in documented.items():
        for key, value in values.items():
            assert defaults[section][key] == value, f"docs say {section}.{key}={value!r}, defaults say {defaults[section][key]!r}"


def test_import_and_help_stay_light():
    """`import lorakit` and `lorakit --help` load neither torch nor the training stack."""
    heavy = ["torch", "transformers", "datasets", "nevergrad", "matplotlib", "accelerate", "lorakit.training.trainer"]
    code = (
        "import sys, lorakit, lorakit.cli; lorakit.cli.build_parser().format_help();"
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lorakit.cli", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - started < 5  # measured ~0.1 s; a loose bound, timings are for benchmarks


def test_public_api_is_documented():
    """Every name in a public module's __all__, and every public method of its classes, has a docstring;
    functions and methods taking arguments document them (Args:)."""
    import importlib
    import inspect
    import pkgutil

    import lorakit

    missing = []
    for info in pkgutil.walk_packages(lorakit.__path__, "lorakit."):
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            value = getattr(module, name)
            if not (inspect.isfunction(value) or inspect.isclass(value)) or value.__module__ != module.__name__:
                continue
            members = [(name, value)]
            if inspect.isclass(value):
                members += [(f"{name}.{attr}", member) for attr, member in vars(value).items()
                            if not attr.startswith("_") and inspect.isfunction(member)]
            for label, member in members:
                doc = inspect.getdoc(member) or ""
                if not doc:
                    missing.append(f"{info.name}.{label}: no docstring")
                elif inspect.isfunction(member) and _documented_parameters(member) and "Args:" not in doc:
                    missing.append(f"{info.name}.{label}: no Args section")
    assert not missing, "\n".join(missing)


def _documented_parameters(function) -> list[str]:
    import inspect

    return [p for p in inspect.signature(function).parameters if p not in ("self", "cls") and not p.startswith("_")]
