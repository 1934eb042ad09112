"""Train a torchvision-layout ResNet *as a ResNet*: the kind of model resode's users hold.

BatchNorm with batch statistics, PyTorch's default initialization, SGD with Nesterov momentum,
cosine learning rate, random-crop and horizontal-flip augmentation, no knowledge of ODEs. The
result is saved the way a user would save it, ``torch.save(model.state_dict())`` (tensors only,
loadable with ``weights_only=True``), with a JSON record beside it. This is how the shipped
``fashion-resnet`` teacher was made:

    python experiments/train_resnet.py --data fashion-mnist --blocks 3,9,9,3 --widths 16,32,64,64 \
        --epochs 30 --out models/fashion-resnet.pth

The network is ``torchvision.models.resnet.ResNet`` with its stem replaced by the small-image one
(3×3 conv, stride 1, no maxpool), as CIFAR-style ResNets do; torchvision is not needed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from resode_export.data import load_data  # noqa: E402


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (same module and key names)."""

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ResNet layout (conv1, bn1, layer1..N, fc) with the small-image stem."""

    def __init__(self, blocks, widths, in_channels: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths), start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(*[BasicBlock(cin if j == 0 else w, w, stride if j == 0 else 1)
                                                       for j in range(n)]))
            cin = w
        self.stages = len(blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """Random crops (zero padding of ``pad`` pixels, in the standardized space: the background value) and flips."""
    n, _, h, w = x.shape
    background = float(x.min())
    padded = F.pad(x, (pad,) * 4, value=background)
    dy, dx = (torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist())
    out = padded[:, :, dy:dy + h, dx:dx + w]
    if not flip:
        return out
    flips = torch.rand(n, generator=gen) < 0.5
    return torch.where(flips.to(x.device)[:, None, None, None], out.flip(3), out)


@torch.no_grad()
def evaluate(model, x, y, batch=1000):
    model.eval()
    right = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return right / len(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--blocks", default="3,9,9,3")
    p.add_argument("--widths", default="16,32,64,64")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips (digits)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    data = load_data(args.data)
    blocks, widths = [int(v) for v in args.blocks.split(",")], [int(v) for v in args.widths.split(",")]
    model = ResNet(blocks, widths, data.in_shape[0], data.num_classes).to(dev)
    xtr, ytr, xte, yte = (t.to(dev) for t in (data.x_train, data.y_train, data.x_test, data.y_test))
    steps = args.epochs * -(-len(xtr) // args.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(args.seed)
    start, history = time.perf_counter(), []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=gen).to(dev)
        for i in range(0, len(xtr), args.batch_size):
            idx = order[i:i + args.batch_size]
            loss = F.cross_entropy(model(augment(xtr[idx], gen, flip=not args.no_flip)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate(model, xte, yte)
        history.append({"epoch": epoch + 1, "test_accuracy": acc, "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(history[-1]), flush=True)
    out = Path(args.out)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out)
    record = {"command": "python experiments/train_resnet.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "data": data.describe(), "blocks": blocks, "widths": widths, "test_accuracy": history[-1]["test_accuracy"],
              "epochs": args.epochs, "seconds": history[-1]["seconds"],
              "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})",
              "torch": torch.__version__, "history": history}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "history"}))


if __name__ == "__main__":
    main()
