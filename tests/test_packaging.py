"""The packaging files agree with each other: pyproject.toml, pixi.toml, Makefile, Dockerfile, README, CI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

try:
    import tomllib  # the standard library's, from Python 3.11
except ModuleNotFoundError:  # 3.10, which requires-python allows: pytest itself requires tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
TASKS = ("demo", "train", "test", "export", "evaluate", "predict", "prepare-data")


def load_toml(name: str) -> dict:
    return tomllib.loads((REPO / name).read_text())


def normalize_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503: Foo_Bar and foo-bar are one package


def normalize_spec(spec: str) -> str:
    return ",".join(sorted(part.strip() for part in spec.split(",") if part.strip()))


def parse_requirements(requirements: list[str]) -> dict[str, str]:
    """`"torch>=2.5,<3"` -> {"torch": ">=2.5,<3"}; extras and markers are not used here, so refuse them."""
    parsed = {}
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*([<>=!~].*)?", requirement)
        assert match, f"unexpected requirement syntax (extras? markers?): {requirement!r}"
        parsed[normalize_name(match[1])] = normalize_spec(match[2] or "")
    return parsed


def parse_pixi(table: dict) -> dict[str, str]:
    parsed = {}
    for name, spec in table.items():
        assert isinstance(spec, str), f"pixi.toml {name}: expected a version string, got {spec!r}"
        parsed[normalize_name(name)] = normalize_spec("" if spec == "*" else spec)
    return parsed


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    # `target: deps` lines; not variable assignments (`X := y`, `X ?= y`) or recipe lines (tab-indented).
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.MULTILINE))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with backslash continuations joined and comments dropped."""
    lines = [ln for ln in (REPO / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\s*\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in joined.splitlines() if ln.strip()]


# --- pixi.toml mirrors pyproject.toml ---------------------------------------------------------------


def test_pixi_pypi_dependencies_match_pyproject_exactly() -> None:
    pyproject, pixi = load_toml("pyproject.toml"), load_toml("pixi.toml")
    pixi_deps = dict(pixi["pypi-dependencies"])
    project = pixi_deps.pop(pyproject["project"]["name"])
    assert project == {"path": ".", "editable": True}
    assert parse_pixi(pixi_deps) == parse_requirements(pyproject["project"]["dependencies"])


def test_pixi_features_match_pyproject_extras() -> None:
    """Every extra (dev, wandb, mlflow) is a pixi feature with the same requirements and an environment."""
    pyproject, pixi = load_toml("pyproject.toml"), load_toml("pixi.toml")
    extras = pyproject["project"]["optional-dependencies"]
    assert {"dev", "wandb", "mlflow"} <= set(extras)
    assert set(pixi["feature"]) == set(extras)
    for name, requirements in extras.items():
        in_pixi = parse_pixi(pixi["feature"][name]["pypi-dependencies"])
        assert in_pixi == parse_requirements(requirements), name
        assert any(name in env.get("features", []) for env in pixi["environments"].values()), name


def test_pixi_python_is_allowed_by_requires_python() -> None:
    pixi_python = load_toml("pixi.toml")["dependencies"]["python"]  # e.g. "3.11.*"
    minimum = load_toml("pyproject.toml")["project"]["requires-python"]  # e.g. ">=3.10"
    pixi_version = tuple(int(n) for n in re.findall(r"\d+", pixi_python)[:2])
    assert minimum.startswith(">=")
    assert pixi_version >= tuple(int(n) for n in minimum[2:].split(".")[:2])


def test_pixi_has_the_tasks() -> None:
    pixi = load_toml("pixi.toml")
    tasks = dict(pixi.get("tasks", {}))
    for feature in pixi.get("feature", {}).values():
        tasks.update(feature.get("tasks", {}))
    assert set(TASKS) <= set(tasks), f"missing pixi tasks: {set(TASKS) - set(tasks)}"


# --- the scripts and targets that the files name exist ---------------------------------------------------


def test_makefile_has_the_targets() -> None:
    assert {"venv", "data", "demo", "test", "lint"} <= makefile_targets()


def test_referenced_scripts_exist() -> None:
    """Every `python something.py` / `python -m classifier.x` in pixi tasks, the Makefile and the
    Dockerfile."""
    pixi = load_toml("pixi.toml")
    commands = [t if isinstance(t, str) else t["cmd"] for t in pixi["tasks"].values()]
    commands += [(REPO / "Makefile").read_text()]
    commands += [" ".join(json.loads(args)) for op, args in dockerfile_instructions() if op == "ENTRYPOINT"]
    scripts = {s for c in commands for s in re.findall(r"\b([\w/]+\.py)\b", c)}
    modules = {m for c in commands for m in re.findall(r"-m (classifier\.\w+)", c)}
    assert "train.py" in scripts
    missing = [s for s in scripts if not (REPO / s).is_file()]
    missing += [m for m in modules if not (REPO / (m.replace(".", "/") + ".py")).is_file()]
    assert not missing, f"named by pixi.toml/Makefile/Dockerfile but absent: {missing}"


# --- Dockerfile ---------------------------------------------------------------------------------------------


def test_dockerfile_installs_the_project_and_runs_train() -> None:
    instructions = dockerfile_instructions()
    ops = [op for op, _ in instructions]
    base = next(args for op, args in instructions if op == "ARG" and "BASE_IMAGE" in args) + " "
    base += next(args for op, args in instructions if op == "FROM")
    assert "cuda" in base.lower(), f"not a CUDA base image: {base}"
    assert ("WORKDIR", "/app") in instructions
    assert "COPY" in ops
    runs = [args for op, args in instructions if op == "RUN"]
    assert any(re.search(r"pip install (-e )?\.(\s|$)", run) for run in runs), runs
    entry = [json.loads(args) for op, args in instructions if op in ("ENTRYPOINT", "CMD")]
    assert entry and entry[0][:2] == ["python", "train.py"], entry  # exec form, so signals reach python


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", ".git", "data", "runs"} <= ignored


# --- README and CI ----------------------------------------------------------------------------------------


def test_readme_starts_with_make_targets() -> None:
    blocks = re.findall(r"```[a-z]*\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    # a trailing "# comment" explains the command; it is not part of it
    lines = [ln.split(" #")[0].strip().removeprefix("$ ") for block in blocks for ln in block.splitlines()]
    commands = [ln for ln in lines if ln and not ln.startswith("#")][:2]
    assert len(commands) == 2, f"README has fewer than two commands: {commands}"
    targets = makefile_targets()
    for command in commands:
        words = command.split()
        assert words[0] == "make" and len(words) >= 2, f"README command is not `make <target>`: {command!r}"
        assert set(words[1:]) <= targets, f"{command!r}: no such Makefile target"


def test_ci_script_is_valid_bash_and_runs_the_tests() -> None:
    script = REPO / ".ci" / "run"
    text = script.read_text()
    assert "set -euo pipefail" in text and "make test" in text
    bash = shutil.which("bash")
    if bash:
        check = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
