#!/usr/bin/env bash
# CI: builds the documentation site (mkdocs.yml, docs/) with warnings as errors, into a temporary folder that
# is removed afterwards. The toolchain is pyproject.toml's `docs` extra, installed into a virtual environment
# of its own (not the test environment): mkdocstrings reads the docstrings by static analysis, so the build
# needs neither torch nor the compiled kernels. DOCS_VENV=DIR uses (and, if missing, creates) that environment
# instead of a throwaway one, e.g. to build repeatedly on a workstation.
set -euo pipefail
cd "$(dirname "$0")/.."

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
venv="${DOCS_VENV:-$work/venv}"
[ -x "$venv/bin/python" ] || python -m venv "$venv"

# the `docs` extra, read from pyproject.toml (its one definition); the package itself is not installed
python - > "$work/requirements.txt" <<'PY'
import tomllib

with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["docs"]))
PY
"$venv/bin/python" -m pip install -q -r "$work/requirements.txt"

"$venv/bin/mkdocs" build --strict --site-dir "$work/site"
echo "docs: built without warnings"
