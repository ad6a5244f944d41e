#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels bench/gpu_check.py needs on a GPU machine that
# has torch and the rest of pyproject.toml's dependencies but neither tyro nor an index to fetch it from.
#
#     bash bench/gpu_wheels.sh        # from the repo root: writes .whl/ (a few hundred kB), git-ignored
#
# What goes in: tyro and its runtime dependencies (tyro's Requires-Dist: docstring-parser, typeguard,
# typing-extensions; typeguard's: typing-extensions), each pinned to the version in .venv, which this
# project's tests pass with. All four are pure Python, so one wheel serves CPython 3.12 on any platform;
# the platform tags only matter if a later version ships compiled wheels. typing-extensions is shipped
# too although torch depends on it: tyro needs >= 4.13 and typeguard >= 4.14, which an older torch install
# may not have, and a newer typing-extensions shadowing an older one is safe (it only ever adds names).
# The GPU machine installs them with --no-deps into a private folder (see the top of bench/gpu_check.py).

set -euo pipefail

cd "$(dirname "$0")/.."
VENV_PYTHON=.venv/bin/python
PACKAGES=(tyro docstring-parser typeguard typing-extensions)

if [[ ! -x $VENV_PYTHON ]]; then
    echo "error: $VENV_PYTHON not found: build .venv first (make test); its versions are the pins" >&2
    exit 1
fi

mkdir -p .whl .git/info
# .whl/ is a local artefact: keep it out of `git status` without touching the shared .gitignore.
if ! grep -qxF "/.whl/" .git/info/exclude 2>/dev/null; then
    echo "/.whl/" >> .git/info/exclude
fi

for name in "${PACKAGES[@]}"; do
    version=$("$VENV_PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    echo "downloading $name==$version"
    python3 -m pip download \
        --quiet \
        --no-deps \
        --only-binary=:all: \
        --python-version 3.12 \
        --implementation cp \
        --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 \
        -d .whl \
        "$name==$version"
done

echo "in .whl/:"
ls -l .whl
du -sh .whl
