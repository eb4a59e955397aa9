#!/usr/bin/env bash
# Reproduce the committed study reports: each of the paper's questions through the platform's
# own entry points, one after another, all sharing one out_dir (and so one artifact cache:
# one pretrained model, one FID extractor, one feature map per augmentation setting).
# Interrupted? Run it again: a study that exists is resumed (resume=true), finished ones are
# only re-reported. Then the small report files are copied into studies/<name>/, OVERWRITING
# the committed report of that name (git diff shows what changed; git checkout restores it).
# Python: $PYTHON if set, else the repository's .venv, else `python` on PATH.
#   usage: studies/run_all.sh [OUT_DIR] [study ...]
#   default: runs/studies, every committed study (a studies/<name>/ with a conf/study/<name>.yaml),
#   in the order they were run; a tuning stage (studies/<name>-tune-*) or a confirmation stage
#   (studies/<name>-confirm) comes with its study.
#   e.g.   studies/run_all.sh runs/studies speed_tuned finetune feature_map_fidelity
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/studies}"; shift || true
names=("$@"); [ ${#names[@]} -gt 0 ] || names=(speed batch_robustness losses huber feature_map feature_map_budget
                                               speed_tuned feature_map_fidelity finetune critical_batch_sweep
                                               huber_sweep aug_sweep speed_long speed_3200)
py="${PYTHON:-}"
[ -n "$py" ] || { [ -x .venv/bin/python ] && py=.venv/bin/python; } || py=python
for name in "${names[@]}"; do
  resume=()
  [ -d "$out/$name" ] && resume=(resume=true)
  "$py" -m ayt.studies."$name" out_dir="$out" progress=false "${resume[@]}"
  # The study's report, and those of its other stages (tune_then_repeat: <name>-tune-<group>/;
  # search_then_confirm: <name>-confirm/).
  for dir in "$out/$name" "$out/$name"-tune-* "$out/$name"-confirm; do
    [ -f "$dir/report.md" ] || continue
    dest="studies/$(basename "$dir")"
    mkdir -p "$dest"
    cp "$dir"/report.md "$dir"/*.png "$dir"/*.csv "$dest/"
    cp "$dir"/*.json "$dest/" 2>/dev/null || true
  done
done
