#!/usr/bin/env bash
# The embedded default, offline on CPU: build the tiny stack, SFT the tiny teacher (cached), then train the tiny
# student with SFT, KD and EA-KD (token and sequence level) for the same number of steps, and print each run's
# held-out loss and EA statistics. Usage: bash scripts/tiny_pipeline.sh [RUNS_DIR]   (default runs/tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/tiny}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ ! -f "$RUNS/student/config.json" ]; then
  echo "== [1/6] writing the tiny stack to $RUNS"
  eakd-llm prepare-tiny --output-dir "$RUNS"
fi
paths=(--model_name_or_path "$RUNS/student" --dataset_name "$RUNS/data")
if [ ! -f "$RUNS/teacher-sft/model.safetensors" ]; then
  echo "== [2/6] SFT of the tiny teacher (cached in $RUNS/teacher-sft)"
  eakd-llm train recipes/tiny/sft_teacher.yaml --model_name_or_path "$RUNS/teacher" --dataset_name "$RUNS/data" \
    --output_dir "$RUNS/teacher-sft"
else
  echo "== [2/6] reusing the trained teacher in $RUNS/teacher-sft"
fi
step=3
for recipe in sft_student kd eakd_token eakd_sequence; do
  echo "== [$step/6] student: recipes/tiny/$recipe.yaml"
  out="$RUNS/student-${recipe//_/-}"
  extra=()
  [ "$recipe" != sft_student ] && extra=(--teacher_model_name_or_path "$RUNS/teacher-sft")
  eakd-llm train "recipes/tiny/$recipe.yaml" "${paths[@]}" "${extra[@]}" --output_dir "$out"
  step=$((step + 1))
done

echo
echo "== held-out (validation) cross-entropy of each run, lower is better"
python - "$RUNS" <<'PY'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
print(f"| run | eval CE loss | train time (s) | mean EA weight (last log) |")
print("|---|---|---|---|")
for name in ["teacher-sft", "student-sft-student", "student-kd", "student-eakd-token", "student-eakd-sequence"]:
    folder = runs / name
    state = json.loads((folder / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_ce_loss" in e]
    logs = [e for e in state["log_history"] if "loss" in e]
    train = json.loads((folder / "train_results.json").read_text())
    weight = logs[-1].get("ea_weight_mean", float("nan"))
    print(f"| {name} | {evals[-1]['eval_ce_loss']:.3f} | {train['train_runtime']:.0f} | {weight:.3f} |")
PY
