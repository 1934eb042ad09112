"""torchvision-style ResNets imported: round-trip errors per layout, export parity, and inspect's verdicts.

    python benchmarks/import_resnet.py --json > benchmarks/results/import_resnet.json

1. Round trip: each torchvision architecture at full width (random weights, random BatchNorm
   statistics; the definitions of ``tests/tv_models.py``, key for key torchvision's) is saved as a
   ``.pth``, imported (BatchNorm folded and frozen) and run at its native depth against the
   original network: max relative deviation of the logits in float32 and float64, and of the
   ONNX graph (onnxruntime) for the float32 import.
2. Verdicts: a small ResNet trained as a ResNet (BatchNorm, batch statistics) on Fashion-MNIST,
   imported; ``resode inspect`` on it at random initialization, after training, after fine-tuning
   the import with the adjoint (``resode train MODEL --adjoint``, BatchNorm frozen: compare with the
   trained model inspected with ``--bn frozen``, since smoothness is measured on the parameters) and
   after the smoothing path (``resode convert --interp smooth`` + fine-tuning with the symplectic
   adjoint). ``--smoke`` shrinks everything (tests).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from resode_export.cli import main as resode  # noqa: E402
from resode_export.data import load_data  # noqa: E402
from resode_export.importers.torchvision import detect_layout, import_resnet, reference_forward  # noqa: E402
from tests.tv_models import BasicBlock, Bottleneck, ResNet, randomize_bn  # noqa: E402

ARCHS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], {}),
    "resnet34": (BasicBlock, [3, 4, 6, 3], {}),
    "resnet50": (Bottleneck, [3, 4, 6, 3], {}),
    "resnet101": (Bottleneck, [3, 4, 23, 3], {}),
    "wide_resnet50_2": (Bottleneck, [3, 4, 6, 3], {"width_per_group": 128}),
    "resnext50_32x4d": (Bottleneck, [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}),
}


def cli(*args) -> dict:
    """``resode ARGS --json`` in-process → its JSON object."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        resode([str(a) for a in args] + ["--json"])
    return json.loads(out.getvalue())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def round_trips(names, size: int, width: int, folder: Path) -> list[dict]:
    rows = []
    for name in names:
        block, layers, kw = ARCHS[name]
        torch.manual_seed(0)
        net = randomize_bn(ResNet(block, layers, num_classes=1000, width=width, **kw))
        sd = net.state_dict()
        path = folder / f"{name}.pth"
        torch.save(sd, path)
        x = torch.randn(2, 3, size, size)
        row = {"arch": name, "parameters": sum(v.numel() for v in sd.values()), "blocks": layers,
               "ode_depths": [n - 1 for n in layers], "input": [2, 3, size, size]}
        with torch.no_grad():
            want32, want64 = net(x), net.double()(x.double())
            assert rel(reference_forward(sd, detect_layout(sd), x.double()), want64) < 1e-12
            for bn in ("fold", "frozen"):
                row[f"rel_dev_float32_{bn}"] = rel(import_resnet(sd, input_size=(size, size), bn=bn)(x), want32)
                row[f"rel_dev_float64_{bn}"] = rel(
                    import_resnet(sd, input_size=(size, size), bn=bn, dtype=torch.float64)(x.double()), want64)
        onnx_path = folder / f"{name}.onnx"
        cli("export", path, "--input-size", size, "--format", "onnx", "--out", onnx_path)
        import onnxruntime as ort

        got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
            ["logits"], {"input": x.numpy()})[0]
        row["rel_dev_onnx_fold"] = rel(torch.from_numpy(got), want32)
        rows.append(row)
        print(f"{name}: {row}", file=sys.stderr)
    return rows


def train_resnet(net, data, epochs: int, batch: int, lr: float) -> float:
    """Plain ResNet training (BatchNorm with batch statistics): the weights a user brings."""
    x, y = data.x_train, data.y_train
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return float((net(data.x_test).argmax(1) == data.y_test).double().mean())


def verdicts(args, folder: Path) -> dict:
    data = load_data(args.data)
    if args.limit:  # every step (training, fine-tuning, inspect) on the same subset
        subset = folder / "subset.npz"
        np.savez(subset, x_train=data.x_train[:args.limit].numpy(), y_train=data.y_train[:args.limit].numpy(),
                 x_test=data.x_test[:args.limit].numpy(), y_test=data.y_test[:args.limit].numpy())
        args.data, data = str(subset), load_data(str(subset))
    channels = data.in_shape[0]
    torch.manual_seed(0)
    net = ResNet(Bottleneck, args.blocks, num_classes=10, width=args.width, in_channels=channels)
    out = {"architecture": f"Bottleneck ResNet, blocks {args.blocks}, stem width {args.width}, "
                           f"{channels}×{data.in_shape[1]}×{data.in_shape[2]} inputs",
           "data": f"{data.name}: {len(data.y_train)} train, {len(data.y_test)} test samples"}

    def inspect(path, extra=()) -> dict:
        r = cli("inspect", path, "--data", args.data, "--limit", args.inspect_limit, *extra)
        return {k: r[k] for k in ("ode_like", "verdict", "min_depth", "convergence_order",
                                  "native_deviation_from_limit")} | {
            "max_relative_jump": [s["max_relative_jump"] for s in r["stages"]],
            "distance_to_limit_ode": [s["distance_to_limit_ode"] for s in r["stages"]]}

    random_path = folder / "random.pth"
    torch.save(net.state_dict(), random_path)
    out["random_init"] = inspect(random_path)
    start = time.perf_counter()
    out["resnet_test_accuracy"] = train_resnet(net, data, args.epochs, 128, 2e-3)
    out["resnet_training_seconds"] = round(time.perf_counter() - start, 1)
    trained = folder / "trained.pth"
    torch.save(net.state_dict(), trained)
    out["trained"] = inspect(trained)  # BatchNorm folded, as deployed
    out["trained_frozen_bn"] = inspect(trained, ["--bn", "frozen"])  # the parametrization fine-tuning uses
    tuned = folder / "tuned.safetensors"
    t = cli("train", trained, "--data", args.data, "--adjoint", "--epochs", args.tune_epochs, "--lr", "5e-4",
            "--batch-size", 128, "--out", tuned)
    log = [json.loads(line) for line in tuned.with_name("tuned.log.jsonl").read_text().splitlines()]
    out["fine_tuned_adjoint"] = {"test_accuracy": t["test_accuracy"], "seconds": t["seconds"],
                                 "reconstruction_error": [r["reconstruction_error"] for r in log],
                                 **inspect(tuned)}
    smooth = folder / "smooth.safetensors"
    c = cli("convert", trained, "--interp", "smooth", "--data", args.data, "--out", smooth)
    smoothed_tuned = folder / "smooth-tuned.safetensors"
    t = cli("train", smooth, "--data", args.data, "--grad", "symplectic", "--epochs", args.tune_epochs, "--lr", "5e-4",
            "--batch-size", 128, "--out", smoothed_tuned)
    out["smoothed"] = {"accuracy_after_smoothing": c["accuracy"], "accuracy_before": c["source_accuracy"],
                       "test_accuracy_after_fine_tuning": t["test_accuracy"], **inspect(smoothed_tuned)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--size", type=int, default=64, help="input height and width of the round trips")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--blocks", default="4,4,4")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--tune-epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="train and test on the first N samples only")
    parser.add_argument("--inspect-limit", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (for the tests)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.blocks = [int(b) for b in args.blocks.split(",")]
    width = 64
    if args.smoke:
        args.archs, args.size, width, args.blocks, args.width = "resnet18,resnet50", 32, 8, [3, 3], 8
        args.epochs, args.limit, args.inspect_limit = 1, 256, 16
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"python": platform.python_version(), "torch": torch.__version__, "command": " ".join(sys.argv),
                  "round_trip": round_trips(args.archs.split(","), args.size, width, Path(tmp)),
                  "verdicts": verdicts(args, Path(tmp))}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for r in result["round_trip"]:
            print(f"{r['arch']:>16}: float32 {r['rel_dev_float32_fold']:.1e} (fold) {r['rel_dev_float32_frozen']:.1e} "
                  f"(frozen), float64 {r['rel_dev_float64_fold']:.1e} / {r['rel_dev_float64_frozen']:.1e}, "
                  f"ONNX {r['rel_dev_onnx_fold']:.1e}")
        for k, v in result["verdicts"].items():
            print(k, v)


if __name__ == "__main__":
    main()
