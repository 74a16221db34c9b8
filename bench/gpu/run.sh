#!/usr/bin/env bash
# The GPU benchmark in one call (bench/gpu/gpubench.py all): at most ~8 minutes on one GPU, results written
# after every configuration to ${OUT:-bench/gpu/out}/results.json.  Run from the repository root.
#   bash bench/gpu/run.sh             # on the GPU machine
#   bash bench/gpu/run.sh --dry-run   # tiny models on the CPU, about a minute: OUT/dryrun.json
# Environment: PYTHON (default: .venv/bin/python if present, else python3), BUDGET_S (default 450 on a
# GPU, 180 for --dry-run), OUT.  Wheels in bench/gpu/wheels/ (trl, liger-kernel, ...: see README.md) are
# installed first, offline, into a folder of the run's own.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-bench/gpu/out}"
mkdir -p "$OUT"
DRY=""
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then DRY="--dry-run"; else echo "run.sh takes only --dry-run, not '$arg'." >&2; exit 2; fi
done
if [[ -n "${PYTHON:-}" ]]; then :; elif [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sftgo-gpubench.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
if [[ -d bench/gpu/wheels ]] && compgen -G "bench/gpu/wheels/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-deps --no-index --find-links bench/gpu/wheels --target "$WORK/site" bench/gpu/wheels/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PYTHON" -c "import sftgo.trainer" 2>/dev/null; then
  # not installed: the package layout of pyproject.toml (sftgo.trainer = trainer/, ...) as links
  mkdir -p "$WORK/pkg/sftgo"
  ln -s "$PWD/sftgo/__init__.py" "$PWD/sftgo/core" "$WORK/pkg/sftgo/"
  for p in trainer pipeline grouping; do ln -s "$PWD/$p" "$WORK/pkg/sftgo/$p"; done
  export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c "import sys, torch; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}')"
BUDGET="${BUDGET_S:-$([[ -n "$DRY" ]] && echo 180 || echo 450)}"
"$PYTHON" bench/gpu/gpubench.py all --out "$OUT" --work "$WORK/run" --budget "$BUDGET" $DRY  # its exit status is ours
