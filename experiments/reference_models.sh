#!/usr/bin/env bash
# The Fashion-MNIST reference models, as trained for the shipped files (one GPU; every step resumable):
#   fashion-resnet.pth          a torchvision-layout ResNet trained as a ResNet (experiments/train_resnet.py)
#   fashion-resnet-student      its distilled student (resode distill)
#   fashion-conv                an ODENet trained depth-robust (resode train --depths --schemes)
# The teacher, then its student, run beside fashion-conv. OUT_DIR receives the files and logs.
# Usage: OUT_DIR=/tmp/ref experiments/reference_models.sh   (EPOCHS_SCALE=0.1 and DATA=… for a smoke test)
set -uo pipefail
cd "$(dirname "$0")/.."
final="${OUT_DIR:?set OUT_DIR}"
out="${WORK_DIR:-/tmp/reference-models}"  # files land here, then two archives go to OUT_DIR
data="${DATA:-fashion-mnist}"
scale="${EPOCHS_SCALE:-1}"
budget="${BUDGET_S:-520}"  # seconds for the whole script: each job is stopped (and resumable) by then
epochs() { python3 -c "print(max(2, round($1 * $scale)))"; }
mkdir -p "$out" "$final"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }

(
  python3 experiments/train_resnet.py --data "$data" --blocks 3,9,9,3 --widths 16,32,64,64 --epochs "$(epochs 30)" \
    --batch-size 256 --lr 0.2 --out "$out/fashion-resnet.pth" > "$out/teacher.log" 2>&1 || exit 1
  timeout --signal=TERM "$(left)" python3 -m resode_export distill "$out/fashion-resnet.pth" --data "$data" \
    --input-size 28 --epochs "$(epochs 15)" --batch-size 256 --lr 2e-3 --augment --out "$out/fashion-resnet-student.safetensors" \
    --json > "$out/student.json" 2> "$out/student.log"
) &
teacher=$!

timeout --signal=TERM "$budget" python3 -m resode_export train --arch conv --data "$data" --width 32,64 --stem-stride 1 \
  --depth 16 --depths 4,8,16 --schemes euler,heun --knots 4 --activation relu --augment --epochs "$(epochs 20)" \
  --batch-size 256 --lr 4e-3 --out "$out/fashion-conv.safetensors" --json > "$out/conv.json" 2> "$out/conv.log"
echo "fashion-conv exit $? after $(( $(date +%s) - start )) s" >> "$out/times.txt"
wait "$teacher"
echo "teacher and student exit $? after $(( $(date +%s) - start )) s" >> "$out/times.txt"
tar czf "$final/teacher-student.tgz" -C "$out" $(cd "$out" && ls | grep -E '^(fashion-resnet|teacher|student)')
tar czf "$final/conv.tgz" -C "$out" $(cd "$out" && ls | grep -E '^(fashion-conv|conv|times)')
