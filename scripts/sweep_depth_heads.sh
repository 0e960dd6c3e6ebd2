#!/usr/bin/env bash
# Sweep depth x heads (1-3 layers x 2/4/8 heads) on the quickstart task, then summarize.
#   scripts/sweep_depth_heads.sh                        # one job after another
#   scripts/sweep_depth_heads.sh local                  # 2 jobs at a time on this machine (joblib)
#   scripts/sweep_depth_heads.sh slurm hydra.launcher.partition=gpu trainer=gpu
# Extra arguments are Hydra overrides. The summary lands in the sweep directory (sweep_summary.*).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
launcher=()
case "${1:-}" in
  local) launcher=(hydra/launcher=local_parallel); export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; shift ;;
  slurm) launcher=(hydra/launcher=slurm); shift ;;
esac
exec "$PY" -m train -m experiment=depth_heads_sweep "${launcher[@]}" "$@"
