"""Readability figures for the project's source, measured the way review aesthetics-2026-12 measured them.

    python bench/readability.py                       # the working tree
    python bench/readability.py --ref 0680a93         # the same files as committed at 0680a93
    python bench/readability.py --ref 07b49b2 train.py --loop-function train

Figures, as the review defines them: code lines are non-blank lines holding a code token; code tokens are
NAME/OP/NUMBER/STRING tokens (an f-string is one STRING, as before Python 3.12); both leave docstrings out.
Line lengths are over non-blank lines; p95 is statistics.quantiles(n=20, method="inclusive") (numpy's
linear interpolation) put through round(), which reproduces the review (nearest-rank is up to 6 off).
Comments are full-line plus inline `#`, per 100 code lines. Docstring % is the lines module, class,
function and attribute docstrings (a bare string right after an annotated assignment in a class body)
span, over non-blank lines; blank lines inside a docstring count, as in the review. A function runs from
its `def` line to its last; a def's width is its parameters (no self/cls, *args and **kw count 1), a
call's its positional plus keyword arguments. For the loop function: the local names symtable reports,
its `if` statements (ast.If only, not `x if c else y`) and the set-up lines from the `def` to the epoch
loop (the first `for` holding another `for`, else the first top-level `for`). Paths are relative to the
repository root; with --ref, files are read with `git show REF:path` and those absent at REF skipped.
"""

from __future__ import annotations

import argparse
import ast
import io
import statistics
import subprocess
import symtable
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TARGETS = ["train.py", "export.py", "evaluate.py", "classifier", "configs"]
CODE_TOKENS = {tokenize.NAME, tokenize.OP, tokenize.NUMBER, tokenize.STRING}
# Python 3.12 splits an f-string into pieces; gluing them back keeps counts equal across versions.
FSTRING_START = getattr(tokenize, "FSTRING_START", None)
FSTRING_END = getattr(tokenize, "FSTRING_END", None)
Function = ast.FunctionDef | ast.AsyncFunctionDef
FOR = (ast.For, ast.AsyncFor)


@dataclass
class FileStats:
    path: str
    lines: list[str]  # every physical line
    code_lines: int
    tokens: int
    comments: int
    doc_lines: int  # lines docstrings span, blank ones inside included
    functions: list[tuple[str, int, int]] = field(default_factory=list)  # (qualname, def line, length)
    defs: list[tuple[int, str, int]] = field(default_factory=list)  # (width, qualname, line)
    calls: list[tuple[int, str, int]] = field(default_factory=list)  # (width, callee, line)
    imports: tuple[int, int] = (0, 0)  # statements, names


def list_files(targets: list[str], ref: str | None) -> list[str]:
    """.py paths (relative to the repository root) under `targets`, in the targets' order."""
    paths: list[str] = []
    for t in targets:
        if ref is not None:  # the files under t in ref's tree, whether or not they exist today
            listing = ["git", "ls-tree", "-r", "--name-only", ref, "--", t]
            paths += subprocess.check_output(listing, cwd=REPO, text=True).split()
        else:
            p = REPO / t
            found = sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.exists() else []
            paths += [str(f.relative_to(REPO)) for f in found]
    return [p for p in paths if p.endswith(".py")]


def read_source(path: str, ref: str | None) -> str | None:
    if ref is None:
        return (REPO / path).read_text(encoding="utf-8")
    r = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=REPO, capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def docstring_nodes(tree: ast.Module) -> list[ast.Constant]:
    """The string constants that are docstrings, tyro-style attribute docstrings included."""
    found: list[ast.Constant] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for i, stmt in enumerate(node.body):
            is_doc = i == 0 or (
                isinstance(node, ast.ClassDef) and isinstance(node.body[i - 1], ast.AnnAssign)
            )
            if is_doc and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                if isinstance(stmt.value.value, str):
                    found.append(stmt.value)
    return found


def def_width(fn: Function) -> int:
    a = fn.args
    named = [p.arg for p in a.posonlyargs + a.args]
    if named and named[0] in ("self", "cls"):
        named = named[1:]
    return len(named) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)


def walk_functions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, Function]]:
    """(qualname, node) for every def, nested ones named Outer.inner like the review does."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + child.name, child
            yield from walk_functions(child, prefix + child.name + ".")
        elif isinstance(child, ast.ClassDef):
            yield from walk_functions(child, prefix + child.name + ".")
        else:
            yield from walk_functions(child, prefix)


def span(node: ast.stmt) -> int:
    """Lines from the first (the `def` or `for` line, decorators aside) to the last."""
    return node.end_lineno - node.lineno + 1  # type: ignore[operator]


def measure(path: str, src: str) -> tuple[FileStats, ast.Module]:
    tree = ast.parse(src)
    docs = docstring_nodes(tree)
    doc_lines = {n for d in docs for n in range(d.lineno, d.end_lineno + 1)}  # type: ignore[operator]
    doc_starts = {(d.lineno, d.col_offset) for d in docs}
    lines = src.splitlines()
    code_rows: set[int] = set()
    tokens = comments = depth = 0
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == FSTRING_START:  # one STRING token for the whole f-string
            depth += 1
            tokens += depth == 1
            code_rows.add(tok.start[0])
        elif tok.type == FSTRING_END:
            depth -= 1
        elif tok.type == tokenize.COMMENT:
            comments += 1
        elif depth == 0 and tok.type in CODE_TOKENS and tok.start not in doc_starts:
            tokens += 1
            code_rows.add(tok.start[0])
    stats = FileStats(path, lines, len(code_rows), tokens, comments, len(doc_lines))
    for name, fn in walk_functions(tree):
        stats.functions.append((name, fn.lineno, span(fn)))
        stats.defs.append((def_width(fn), name, fn.lineno))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            stats.calls.append((len(node.args) + len(node.keywords), ast.unparse(node.func), node.lineno))
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    stats.imports = (len(imports), sum(len(n.names) for n in imports))
    return stats, tree


def p95(values: list[int]) -> int:
    """Interpolated 95th percentile, rounded as the review rounded it (round half to even)."""
    if len(values) < 2:  # quantiles() needs two points
        return values[0]
    return round(statistics.quantiles(values, n=20, method="inclusive")[18])


def row(label: str, files: list[FileStats]) -> str:
    """One table row; several files are pooled (lines together, not an average of file figures)."""
    widths = [len(line) for f in files for line in f.lines if line.strip()]
    nonblank = max(1, len(widths))  # an empty file divides by 1, not 0
    code, tokens = sum(f.code_lines for f in files), sum(f.tokens for f in files)
    size = f"{tokens:,} ({tokens / max(1, code):.1f})"
    lengths = ["—"] * 3
    if widths:
        lengths = [f"{statistics.median(widths):g}", str(p95(widths)), str(max(widths))]
    shares = [f"{100 * sum(w > limit for w in widths) / nonblank:.1f}%" for limit in (100, 110, 120)]
    comments = 100 * sum(f.comments for f in files) / max(1, code)
    docs = 100 * sum(f.doc_lines for f in files) / nonblank
    funcs = [fn for f in files for fn in f.functions]
    longest = max(funcs, key=lambda fn: fn[2], default=None)
    cells = [label, f"{sum(len(f.lines) for f in files):,}", f"{code:,}", size, *lengths, *shares]
    cells += [f"{comments:.1f}", f"{docs:.1f}%", str(len(funcs))]
    cells.append(f"`{longest[0]}` {longest[2]}" if longest else "—")
    return "| " + " | ".join(cells) + " |"


def comprehension_only(fn: Function) -> set[str]:
    """Names bound only as list/set/dict comprehension targets. Python 3.12 inlines those comprehensions
    (PEP 709) and symtable then lists their variables among the function's locals; 3.11 did not."""
    comp: set[str] = set()
    other = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
    scopes = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.GeneratorExp)

    def visit(node: ast.AST, in_target: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, scopes):  # scopes of their own on every Python version
                continue
            target = in_target or (isinstance(node, ast.comprehension) and child is node.target)
            if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                (comp if target else other).add(child.id)
            elif isinstance(child, ast.alias):
                other.add((child.asname or child.name).split(".")[0])
            visit(child, target)

    visit(fn, False)
    return comp - other


def loop_figures(stats: FileStats, tree: ast.Module, src: str, name: str) -> str | None:
    """The review's figures for the function holding the training loop; None if there is no `name`."""
    fn = next((f for q, f in walk_functions(tree) if q == name), None)
    if fn is None:
        return None
    table = symtable.symtable(src, stats.path, "exec")
    todo, scope = [table], None
    while todo and scope is None:  # the function's own table, found breadth-first by name
        t = todo.pop(0)
        scope = t if t.get_type() == "function" and t.get_name() == fn.name else None
        todo += t.get_children()
    local_names = len(set(scope.get_locals()) - comprehension_only(fn)) if scope else 0  # type: ignore
    ifs = sum(isinstance(n, ast.If) for n in ast.walk(fn))
    fors = [n for n in ast.walk(fn) if isinstance(n, FOR)]
    nested = [f for f in fors if any(isinstance(n, FOR) for s in f.body for n in ast.walk(s))]
    top_level = [s for s in fn.body if isinstance(s, FOR)]
    epoch = min(nested or top_level, key=lambda n: n.lineno, default=None)
    if epoch is None:
        setup = "— (no for loop)"
    else:  # the loop's length is the review's "training loop lines"
        setup = f"{epoch.lineno - fn.lineno} (loop at line {epoch.lineno}, {span(epoch)} lines)"
    return (
        f"`{stats.path}:{fn.lineno}` `{name}`: {span(fn)} lines, {local_names} local names (symtable), "
        f"{ifs} `if` statements, set-up lines before the training loop: {setup}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("targets", nargs="*", default=DEFAULT_TARGETS, help="files or directories")
    parser.add_argument("--ref", help="measure the files as committed at this git ref")
    parser.add_argument("--loop-function", default="train", help="function holding train.py's loop")
    args = parser.parse_args()

    measured: list[tuple[FileStats, ast.Module, str]] = []
    for path in list_files(args.targets, args.ref):
        src = read_source(path, args.ref)
        if src is not None:
            measured.append((*measure(path, src), src))
    files = [m[0] for m in measured]
    where = f"at {args.ref}" if args.ref else "in the working tree"
    print(f"## Readability {where}\n")
    print(
        "| file | lines | code lines | code tokens (per line) | median | p95 | max | >100 | >110 | >120 "
        "| comments /100 code | docstring % | functions | longest function |"
    )
    print("|---|" + "---:|" * 12 + "---|")
    for f in files:
        if any(line.strip() for line in f.lines):  # an empty __init__.py has no figures to show
            print(row(f.path, [f]))
    package = [f for f in files if f.path.startswith("classifier/")]
    if package:  # the review's a1 row: the package as one body of code
        print(row(f"**classifier/ ({len(package)} files)**", package))

    print("\n### Loop function\n")
    for stats, tree, src in measured:
        # The loop function lives in train.py unless the only file given is another one.
        if Path(stats.path).name == "train.py" or len(measured) == 1:
            figures = loop_figures(stats, tree, src, args.loop_function)
            print(figures or f"no `{args.loop_function}` in {stats.path}")
    for title, key in (("widest defs (parameters)", "defs"), ("widest calls (arguments)", "calls")):
        print(f"\n### The 10 {title}\n")
        ranked = sorted(
            ((w, n, f.path, line) for f in files for w, n, line in getattr(f, key)),
            key=lambda r: (-r[0], r[2], r[3]),
        )
        for i, (width, name, path, line) in enumerate(ranked[:10], 1):
            print(f"{i}. {path}:{line} `{name}` {width}")
    print("\n### Imports (statements / names)\n")
    for f in files:
        print(f"- {f.path}: {f.imports[0]} / {f.imports[1]}")
    over = sum(len(line) > 110 for f in files for line in f.lines)
    print(f"\nLines over 110 characters, all files: {over}")


if __name__ == "__main__":
    main()
