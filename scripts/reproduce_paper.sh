#!/usr/bin/env bash
# Olsson et al. (2022)'s model comparison at CPU scale, then its figures:
#   attention-only 1-3 layers, smeared key 1-2 layers, with MLPs 1-2 layers (each at the quickstart
#   settings: conf/experiment/quickstart.yaml), per-head ablations of every run, `python -m analysis figures`.
#
#   scripts/reproduce_paper.sh                     # into runs/paper/<date>_<time>/ (11 min on one CPU core)
#   scripts/reproduce_paper.sh OUT_DIR [OVERRIDES]  # e.g. OUT_DIR trainer=gpu logger=none
#   scripts/reproduce_paper.sh --text [OUT_DIR [OVERRIDES]]  # the same from real text: olsson_text_1l,
#       olsson_text, olsson_text_3l and olsson_text_smeared, ablations of the 2-layer run's checkpoints
#
# Extra arguments are Hydra overrides passed to every training run. Figures: OUT_DIR/figures/index.html.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TEXT=0
if [ "${1:-}" = "--text" ]; then TEXT=1; shift; fi
OUT=${1:-runs/paper/$(date +%Y-%m-%d_%H-%M-%S)}
shift || true
status=0

if [ $TEXT = 1 ]; then
  for name in olsson_text_1l olsson_text olsson_text_3l olsson_text_smeared; do
    "$PY" -m train experiment=$name "hydra.run.dir=$OUT/text/$name" trainer.enable_progress_bar=false "$@" || status=1
  done
  if [ -f "$OUT/text/olsson_text/summary.json" ]; then
    "$PY" -m analysis ablate "$OUT/text/olsson_text" --method zero --checkpoints all || status=1
  fi
  "$PY" -m analysis figures "$OUT/text" --out "$OUT/figures" || status=1
  echo "figures: $OUT/figures/index.html"
  exit $status
fi

sweep() {  # sweep NAME OVERRIDES...: one Hydra multirun, its jobs under $OUT/NAME/
  local name=$1
  shift
  "$PY" -m train -m "hydra.sweep.dir=$OUT/$name" trainer.enable_progress_bar=false "$@" || status=1
}

sweep attn_only model.n_layers=1,2,3 "$@"
sweep smeared model.smeared_key=true model.n_layers=1,2 "$@"
sweep with_mlp model=with_mlp model.n_layers=1,2 "$@"

for run in "$OUT"/*/*/; do
  if [ -f "$run/summary.json" ]; then
    "$PY" -m analysis ablate "$run" --method zero --checkpoints all || status=1
  fi
done

"$PY" -m analysis figures "$OUT/attn_only" "$OUT/smeared" "$OUT/with_mlp" --out "$OUT/figures" || status=1
echo "figures: $OUT/figures/index.html"
exit $status
