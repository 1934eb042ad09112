#!/usr/bin/env bash
# The Fashion-MNIST reference models as they were trained for the shipped files, on one GPU (an H200, two
# leases of the device machine; each command is resumable with --resume where resode runs it):
#   fashion-resnet.pth              a torchvision-layout ResNet trained as a ResNet (experiments/train_resnet.py)
#   fashion-resnet-student          its distilled student (resode distill)
#   fashion-conv                    an ODENet trained depth-robust (resode train --depths --schemes), then
#                                   fine-tuned the same way at a lower learning rate
# Usage: OUT_DIR=/tmp/ref experiments/reference_models.sh   (DATA=some.npz EPOCHS_SCALE=0.01 for a smoke test)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT_DIR:?set OUT_DIR}"
data="${DATA:-fashion-mnist}"
scale="${EPOCHS_SCALE:-1}"
epochs() { python3 -c "print(max(2, round($1 * $scale)))"; }
mkdir -p "$out"

# the teacher, and beside it (the GPU is mostly idle with one small network) fashion-conv's first 20 epochs
python3 experiments/train_resnet.py --data "$data" --blocks 3,9,9,3 --widths 16,32,64,64 --epochs "$(epochs 30)" \
  --batch-size 256 --lr 0.2 --out "$out/fashion-resnet.pth" > "$out/teacher.log" 2>&1 &
python3 -m resode_export train --arch conv --data "$data" --width 32,64 --stem-stride 1 --depth 16 --depths 4,8,16 \
  --schemes euler,heun --knots 4 --activation relu --augment --epochs "$(epochs 20)" --batch-size 256 --lr 4e-3 \
  --out "$out/fashion-conv-20.safetensors" --json > "$out/conv-20.json"
wait

# the student (gradient clipping at norm 1, distill's default, keeps the end-to-end phase from diverging), and
# fashion-conv fine-tuned 11 more epochs
python3 -m resode_export distill "$out/fashion-resnet.pth" --data "$data" --input-size 28 --epochs "$(epochs 7)" \
  --batch-size 256 --lr 1e-3 --augment --out "$out/fashion-resnet-student.safetensors" --json > "$out/student.json" &
python3 -m resode_export train "$out/fashion-conv-20.safetensors" --depths 4,8,16 --schemes euler,heun --augment \
  --epochs "$(epochs 11)" --batch-size 256 --lr 1e-3 --out "$out/fashion-conv.safetensors" --json > "$out/conv.json"
wait
