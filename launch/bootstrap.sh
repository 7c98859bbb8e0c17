#!/usr/bin/env bash
# Set up (or reuse) .venv at the repository root, then run the demo or the tests.
#
#   bash launch/bootstrap.sh demo [demo args]    # synthesize -> build -> stream -> summary
#   bash launch/bootstrap.sh test [pytest args]  # the default test suite (slow tests excluded)
#   bash launch/bootstrap.sh bench [args]        # VAE vs scvi-tools benchmark, in .venv-bench
#
# torch is installed FIRST (default torch==2.13.0, the CPU wheel on this project's machines;
# GPU users set LATENTCELL_TORCH_SPEC, e.g. "torch==2.13.0", and LATENTCELL_TORCH_INDEX_URL),
# then the project with a constraints file pinning the installed torch, so no dependency can
# replace it with another build. Re-runs skip installation when nothing changed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
mode="${1:-}"
[ $# -gt 0 ] && shift
# The benchmark gets its own environment: scvi-tools brings jax, lightning and pyro.
if [ "$mode" = "bench" ]; then venv="$root/.venv-bench"; extra="bench"; else venv="$root/.venv"; extra="test"; fi
torch_spec="${LATENTCELL_TORCH_SPEC:-torch==2.13.0}"
python_bin="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[bootstrap] creating $venv"
  "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.latentcell-install-stamp"
want="$(cat pyproject.toml | sha256sum | cut -c1-16) $torch_spec ${LATENTCELL_TORCH_INDEX_URL:-} $extra"

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bootstrap] installing torch ($torch_spec) and latentcell into $venv"
  "$py" -m pip install -q --upgrade pip setuptools wheel
  if [ -n "${LATENTCELL_TORCH_INDEX_URL:-}" ]; then
    "$py" -m pip install -q "$torch_spec" --index-url "$LATENTCELL_TORCH_INDEX_URL"
  else
    "$py" -m pip install -q "$torch_spec"
  fi
  constraints="$venv/latentcell-constraints.txt"
  "$py" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > "$constraints"
  DS_BUILD_OPS=0 "$py" -m pip install -q -c "$constraints" -e ".[$extra]"
  echo "$want" > "$stamp"
fi

case "$mode" in
  demo) exec "$venv/bin/latentcell" demo "$@" ;;
  test) exec "$py" -m pytest -q "$@" ;;
  bench) exec "$py" -m latentcell.benchmarks.vae_vs_scvi "$@" ;;
  *) echo "usage: bash launch/bootstrap.sh demo|test|bench [args]" >&2; exit 2 ;;
esac
