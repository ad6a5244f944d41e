"""What a newcomer reads first must match the code: train.py's docstring and the README's reading guide
name the function that holds the training loop, and the line the README says to break on exists there.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def holds_a_nested_loop(func: ast.FunctionDef) -> bool:
    """An epoch loop with a batch loop inside it: a `for` whose body holds another `for`."""
    for node in ast.walk(func):
        if isinstance(node, ast.For) and any(
            isinstance(inner, ast.For) for inner in ast.walk(node) if inner is not node
        ):
            return True
    return False


def loop_function(tree: ast.Module) -> ast.FunctionDef:
    holders = [node for node in tree.body if isinstance(node, ast.FunctionDef) and holds_a_nested_loop(node)]
    assert len(holders) == 1, [node.name for node in holders]
    return holders[0]


def reading_guide() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## Reading the code\n(.*?)(?=^## )", readme, flags=re.M | re.S)
    assert match, "README.md has no '## Reading the code' section"
    return match.group(1)


def test_train_docstring_names_the_loop_function():
    tree = ast.parse((ROOT / "train.py").read_text())
    name = loop_function(tree).name
    assert f"The loop is in {name}()" in ast.get_docstring(tree)


def test_reading_guide_names_the_loop_function():
    name = loop_function(ast.parse((ROOT / "train.py").read_text())).name
    guide = reading_guide()
    assert f"`{name}()` holds the loop" in guide


def test_the_breakpoint_line_of_the_reading_guide_is_in_the_loop():
    source = (ROOT / "train.py").read_text()
    func = loop_function(ast.parse(source))
    quoted = re.search(r"breakpoint on the line\s+`([^`]+)`", reading_guide())
    assert quoted, "the reading guide names no line to break on"
    body = source.splitlines()[func.lineno - 1 : func.end_lineno]
    assert any(line.strip().startswith(quoted.group(1)) for line in body), quoted.group(1)


def test_every_module_the_guide_names_exists():
    named = set(re.findall(r"`((?:classifier|configs)/\w+\.py|\w+\.py)`", reading_guide()))
    assert named, "the reading guide names no file"
    # A bare name is a script at the top or, in running text, a module of the package.
    missing = sorted(
        path for path in named if not ((ROOT / path).is_file() or (ROOT / "classifier" / path).is_file())
    )
    assert missing == []
