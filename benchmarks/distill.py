"""Distillation against plain conversion and the weight-space fit, on the shipped fashion-resnet pair.

    python benchmarks/distill.py --json > benchmarks/results/distill.json

The teacher is ``models/fashion-resnet.pth``, a torchvision-layout ResNet trained as a ResNet
(experiments/train_resnet.py); the student is ``models/fashion-resnet-student.safetensors``
(``resode distill``, its command and time in its card). For per-stage depths ½×, 1× and 2× the
teacher's native ones, with euler and heun, the Fashion-MNIST test accuracy of

- plain conversion: the teacher's blocks as the knots of a piecewise-linear curve, re-solved;
- ``--interp smooth``: the weight-space least-squares fit of those knots (B-splines), re-solved;
- the distilled student.

Then onnxruntime latency (one thread, batch 1 and 256, median) of the teacher at its native depth
and of the student at half depth, both static graphs (``resode export``), and the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from resode_export.check import latency_ms
from resode_export.convert import load_model
from resode_export.data import load_data
from resode_export.evaluate import accuracy, predict, progress_bar
from resode_export.export import onnx_session
from resode_export.export.onnx_graph import static_graph
from resode_export.robust import parse_depth_choices

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "models" / "fashion-resnet.pth"
STUDENT = ROOT / "models" / "fashion-resnet-student.safetensors"


def _accuracy(model, depths, scheme, x, y) -> float:
    with model.solving_at(depths, scheme):
        return accuracy(predict(model, x), y)


def _latency(model, depths, scheme, x, repeats: int) -> dict:
    target = model.discretize(tuple(depths), scheme, grad="backprop")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.onnx"
        path.write_bytes(static_graph(target).SerializeToString())
        session = onnx_session(path)
        return {"latency_ms_b1": round(latency_ms(session, x[:1], None, repeats), 4),
                "latency_ms_b256": round(latency_ms(session, np.resize(x, (256, *x.shape[1:])), None,
                                                    max(3, repeats // 10)), 4)}


def measure(limit: int | None, repeats: int) -> dict:
    teacher, _, _ = load_model(TEACHER, input_size=(28, 28))
    smooth = teacher.discretize(interp="smooth")
    student, header, _ = load_model(STUDENT)
    data = load_data("fashion-mnist")
    x, y = data.x_test[:limit], data.y_test[:limit]
    native = list(teacher.config.depths)
    choices = parse_depth_choices("0.5x,1x,2x", tuple(native))
    rows = []
    with progress_bar() as bar:
        task = bar.add_task("measuring", total=len(choices) * 2 * 3)
        for scheme in ("euler", "heun"):
            for depths, factor in zip(choices, ("0.5x", "1x", "2x")):
                row = {"depths": depths, "factor": factor, "scheme": scheme}
                for name, model in (("conversion", teacher), ("smooth", smooth), ("student", student)):
                    row[name] = _accuracy(model, depths, scheme, x, y)
                    bar.advance(task)
                rows.append(row)
    teacher_acc = next(r["conversion"] for r in rows if r["factor"] == "1x" and r["scheme"] == "euler")
    half = choices[0]
    latency = {"teacher_native": {"depths": native, "scheme": "euler",
                                  **_latency(teacher, native, "euler", x.numpy(), repeats)},
               "student_half": {"depths": half, "scheme": "euler", **_latency(student, half, "euler", x.numpy(), repeats)}}
    ratio = latency["student_half"]["latency_ms_b1"] / latency["teacher_native"]["latency_ms_b1"]
    gaps = {f"{r['scheme']} {r['factor']}": round(100 * (teacher_acc - r["student"]), 2) for r in rows}
    training = header.get("training", {})
    targets = {
        "native_and_double_within_0.5": all(g <= 0.5 for k, g in gaps.items() if not k.endswith("0.5x")),
        "half_within_1.0": all(g <= 1.0 for k, g in gaps.items() if k.endswith("0.5x")),
        "latency_ratio_at_most_0.6": ratio <= 0.6,
    }
    return {"teacher": str(TEACHER.relative_to(ROOT)), "student": str(STUDENT.relative_to(ROOT)),
            "teacher_accuracy": teacher_acc, "test_samples": len(y), "rows": rows,
            "student_gap_points": gaps, "latency": latency, "student_over_teacher_latency_b1": round(ratio, 3),
            "distillation": {"seconds": training.get("seconds"), "device": training.get("device"),
                             "epochs": training.get("epochs"), "command": training.get("command")},
            "targets_met": targets,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N test samples only")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls at batch 1 (a tenth at batch 256)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    start = time.perf_counter()
    result = measure(args.limit, args.repeats)
    result["seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    table = Table("scheme", "per-stage depths", "plain conversion %", "--interp smooth %", "distilled student %",
                  title=f"fashion-resnet (teacher {100 * result['teacher_accuracy']:.2f} %)")
    for r in result["rows"]:
        table.add_row(r["scheme"], f"{r['factor']} {r['depths']}", f"{100 * r['conversion']:.2f}",
                      f"{100 * r['smooth']:.2f}", f"{100 * r['student']:.2f}")
    Console().print(table)
    lat = result["latency"]
    print(f"latency batch 1 / 256: teacher native {lat['teacher_native']['latency_ms_b1']} / "
          f"{lat['teacher_native']['latency_ms_b256']} ms, student half {lat['student_half']['latency_ms_b1']} / "
          f"{lat['student_half']['latency_ms_b256']} ms ({result['student_over_teacher_latency_b1']}×)")
    print(f"targets met: {result['targets_met']}")


if __name__ == "__main__":
    main()
