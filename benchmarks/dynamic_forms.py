"""Where the dynamic-depth ONNX graph's batch-1 latency goes: the shipped form against five others.

    python benchmarks/dynamic_forms.py --json > benchmarks/results/dynamic_forms.json

The workload of ``benchmarks/export.py`` (residual MLP, width 64, hidden 64, 16 knots, linear
interpolation, Euler), onnxruntime on one thread. A dynamic-depth graph must form every step's
weights from the curve on each call (ONNX keeps no state between calls); a static graph reads
them ready-made. Forms, each timed at batch 1 and 256 against the static graph at the same depth:

- ``shipped``: :func:`resode_export.export.onnx_graph.dynamic_graph`: a ``Loop`` over chunks of
  ``CHUNK`` (16) steps; each iteration forms its steps' weights from the coefficient tables (Gather,
  Mul, Gather, Add per parameter), then a ``Scan`` runs the steps over them (Scan hands the slices in
  without copying them).
- ``unrolled_loop``: the form shipped before: a ``Loop`` of 8-step bodies, each forming its 8 steps'
  weights the same way and splitting them per step (a Split copies), plus a one-step ``Loop`` for
  the remainder.
- ``unrolled_loop_matmul``: the same, with all parameters in one flat coefficient table formed by one
  Gather, one batched MatMul with (1, s) and one Split per 8 steps (4 operations instead of 21).
- ``precompute_scan``: every step's weights formed at once before one ``Scan`` over them.
- ``loop_no_formation`` (not a model): a ``Loop`` of 8-step bodies with every step using the first
  knot's weights: the cost of the loop machinery and the steps alone, with the weights hot in cache.
- ``scan_given_weights`` (not dynamic): a ``Scan`` over the static graph's own per-step weights,
  stored in the file: the loop machinery with the weights read as a static graph reads them.

- ``one_pass_formation``: the shipped graph of the same weights on a piecewise-constant curve, against
  that model's own static graph: each step's weights are then formed by one Gather (one copy), the
  least that any form that materializes them can do.

The two bounds show that the loop machinery is not the main cost (both run within 1.25× of the
static graph at depth 16 and faster than it from depth 64); forming the weights is. Only linear
interpolation and Euler are built by the alternative forms (the export benchmark's workload). The deviation column
is against the PyTorch model at that depth (``None`` for the two bounds, which are not the model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from resode_export.export import onnx_graph as og
from resode_export.network import ODENet, ODENetConfig

sys.path.insert(0, os.path.dirname(__file__))
from export import nontrivial  # noqa: E402  (the export benchmark's workload)

UNROLL = 8  # steps per Loop body in the unrolled forms


def _coefficients(block):
    """(S, degree, pieces, {name: [C_0 .. C_d] each (P, *shape)}) of the block's curve, as the shipped graph has them."""
    scale, degree, coeffs = og.curve_coefficients(block.field, block.curve)
    return scale, degree, next(iter(coeffs.values()))[0].shape[0], coeffs


def _pieces(g, n, scale, pieces):
    """Each Euler step's piece and offset ((N,) int64 and float32), as the shipped graph computes them."""
    steps = g.op("Range", [g.scalar(0, np.int64), n, g.scalar(1, np.int64)])
    return og.stage_pieces(g, steps, 0, 1, n, g.op("Cast", [n], to=TensorProto.DOUBLE), scale, pieces)


def _form(b, g, coeffs, degree, piece, s):
    """Weights of the steps ``piece``/``s`` select, {name: (k, *shape)}, formed as the shipped graph forms them."""
    tables = {name: [g.const(c, f"{name}_c{m}") for m, c in enumerate(cs)] for name, cs in coeffs.items()}
    return og.form_weights(b, g, tables, {name: cs[0].ndim - 1 for name, cs in coeffs.items()}, degree, piece, s)


def _step_body(g, field, tag, names, rank, h):
    """A Scan body: one Euler step on state x with this step's weights handed in as scan inputs."""
    b = og.GraphBuilder(prefix=f"{tag}/")
    b._scalars = g._scalars
    theta = {name: f"{tag}/{name}" for name in names}
    out = b.op("Identity", [og.emit_rk_step(b, field, og.get_scheme("euler"), f"{tag}/x", [theta], lambda c: h)])
    g.initializers.extend(b.initializers)
    inputs = [helper.make_tensor_value_info(f"{tag}/x", TensorProto.FLOAT, None)]
    inputs += [helper.make_tensor_value_info(theta[n], TensorProto.FLOAT, None) for n in names]
    dims = [f"{tag}_d{i}" for i in range(rank)]  # a Scan nested in a Loop needs its outputs' ranks
    return helper.make_graph(b.nodes, tag, inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, dims)])


def _wrap(model, emit_block, name):
    g = og.GraphBuilder()
    x = og.emit_stem(g, model, "input")
    x = emit_block(g, model.blocks[0], x)
    g.nodes.append(helper.make_node("Identity", [og.emit_head(g, model, x)], ["logits"]))
    inp, out = og._io(model)
    return og._finish(g, [inp, helper.make_tensor_value_info("depth", TensorProto.INT64, [])], [out], name, name, {})


def precompute_scan(model):
    def emit(g, block, x):
        scale, degree, pieces, coeffs = _coefficients(block)
        n = g.op("Max", ["depth", g.scalar(1, np.int64)])
        piece, s = _pieces(g, n, scale, pieces)
        weights = _form(g, g, coeffs, degree, piece, s)
        h = g.op("Reciprocal", [g.op("Cast", [n], to=TensorProto.FLOAT)])
        body = _step_body(g, block.field, "step", list(weights), 2, h)
        return g.op("Scan", [x, *weights.values()], body=body, num_scan_inputs=len(weights))
    return _wrap(model, emit, "precompute_scan")


def unrolled_loop(model, formation: str = "elementwise"):
    """The form shipped before the chunked one: a Loop of UNROLL-step bodies (and a one-step Loop for the
    remainder), each body forming its steps' weights and splitting them per step. ``formation``:
    ``elementwise`` (Gather, Mul, Gather, Add per parameter, then Split: what was shipped) or ``matmul``
    (all parameters in one flat table: one Gather, one batched MatMul with (1, s), one Split)."""
    original = og.emit_dynamic_block

    def emit(g, block, x, depth, stage):
        scale, degree, pieces, coeffs = _coefficients(block)
        assert degree == 1, "linear interpolation only"
        names = list(coeffs)
        shapes = {k: coeffs[k][0].shape[1:] for k in names}
        sizes = [int(np.prod(shapes[k])) for k in names]
        flat = g.const(np.stack([np.concatenate([coeffs[k][m].reshape(pieces, -1) for k in names], axis=1)
                                 for m in range(2)], axis=1), "flat")  # (P, 2, Ptot)
        n = g.op("Max", [depth, g.scalar(1, np.int64)])
        piece, s = _pieces(g, n, scale, pieces)
        h = g.op("Reciprocal", [g.op("Cast", [n], to=TensorProto.FLOAT)])

        def loop(rows, trips, count, tag, x):
            b = og.GraphBuilder(prefix=f"{tag}/")
            b._scalars = g._scalars
            it = f"{tag}/it"
            p, s_u = (b.op("Gather", [r, it], axis=0) for r in rows)  # (count,) or scalars
            if formation == "matmul":
                s3 = b.op("Reshape", [s_u, g.ints([count, 1, 1])])
                pw = b.op("Concat", [b.op("Expand", [g.scalar(1.0), b.op("Shape", [s3])]), s3], axis=2)
                w = b.op("MatMul", [pw, b.op("Reshape", [b.op("Gather", [flat, p], axis=0), g.ints([count, 2, -1])])])
                parts = b.op("Split", [b.op("Reshape", [w, g.ints([-1])]), g.ints(sizes * count)],
                             n_out=len(sizes) * count, axis=0)
                parts = [parts] if isinstance(parts, str) else parts
                thetas = [{k: b.op("Reshape", [parts[u * len(names) + j], g.ints(list(shapes[k]))])
                           for j, k in enumerate(names)} for u in range(count)]
            else:
                thetas = [{} for _ in range(count)]
                for k in names:
                    c0, c1 = (g.const(coeffs[k][m], f"{k}_c{m}") for m in range(2))
                    s_b = b.op("Reshape", [s_u, g.ints([-1] + [1] * len(shapes[k]))]) if count > 1 else s_u
                    acc = b.op("Add", [b.op("Mul", [b.op("Gather", [c1, p], axis=0), s_b]), b.op("Gather", [c0, p], axis=0)])
                    if count == 1:
                        thetas[0][k] = acc
                        continue
                    rows_k = b.op("Reshape", [acc, g.ints([count * shapes[k][0], *shapes[k][1:]])])
                    for u, part in enumerate(b.op("Split", [rows_k], n_out=count, axis=0)):
                        thetas[u][k] = part
            cur = f"{tag}/x"
            for u in range(count):
                cur = og.emit_rk_step(b, block.field, og.get_scheme("euler"), cur, [thetas[u]], lambda c: h)
            outs = [b.op("Identity", [f"{tag}/cond"]), b.op("Identity", [cur])]
            g.initializers.extend(b.initializers)
            body = helper.make_graph(b.nodes, tag, [
                helper.make_tensor_value_info(it, TensorProto.INT64, []),
                helper.make_tensor_value_info(f"{tag}/cond", TensorProto.BOOL, []),
                helper.make_tensor_value_info(f"{tag}/x", TensorProto.FLOAT, None)],
                [helper.make_tensor_value_info(outs[0], TensorProto.BOOL, []),
                 helper.make_tensor_value_info(outs[1], TensorProto.FLOAT, None)])
            return g.op("Loop", [trips, "", x], body=body)

        done = g.op("Mul", [g.op("Div", [g.op("Reshape", [n, g.ints([1])]), g.ints([UNROLL])]), g.ints([UNROLL])])
        zero, end = g.ints([0]), g.ints([np.iinfo(np.int64).max])
        main = [g.op("Reshape", [g.op("Slice", [t, zero, done, zero]), g.ints([-1, UNROLL])]) for t in (piece, s)]
        rest = [g.op("Slice", [t, done, end, zero]) for t in (piece, s)]
        x = loop(main, g.op("Div", [n, g.scalar(UNROLL, np.int64)]), UNROLL, "main", x)
        return loop(rest, g.op("Sub", [n, g.op("Reshape", [done, g.ints(np.zeros(0, np.int64))])]), 1, "rest", x)

    og.emit_dynamic_block = emit
    try:
        return og.dynamic_graph(model)
    finally:
        og.emit_dynamic_block = original


def loop_no_formation(model):
    """Not a model: a Loop of 8-step bodies with the first knot's weights at every step."""
    def emit(g, block, x):
        theta = {k: g.const(v[0].detach().float().numpy(), k) for k, v in block.curve.knots.items()}
        n = g.op("Max", ["depth", g.scalar(1, np.int64)])
        h = g.op("Reciprocal", [g.op("Cast", [n], to=TensorProto.FLOAT)])
        b = og.GraphBuilder(prefix="body/")
        b._scalars = g._scalars
        cur = "body/x"
        for _ in range(UNROLL):
            cur = og.emit_rk_step(b, block.field, og.get_scheme("euler"), cur, [theta], lambda c: h)
        outs = [b.op("Identity", ["body/cond"]), b.op("Identity", [cur])]
        g.initializers.extend(b.initializers)
        body = helper.make_graph(b.nodes, "body", [
            helper.make_tensor_value_info("body/it", TensorProto.INT64, []),
            helper.make_tensor_value_info("body/cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("body/x", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info(outs[0], TensorProto.BOOL, []),
             helper.make_tensor_value_info(outs[1], TensorProto.FLOAT, None)])
        return g.op("Loop", [g.op("Div", [n, g.scalar(UNROLL, np.int64)]), "", x], body=body)
    return _wrap(model, emit, "loop_no_formation")


def scan_given_weights(model, depth):
    """Not dynamic: a Scan over the per-step weights of the static graph at ``depth``, stored in the file."""
    def emit(g, block, x):
        times, _ = og.stage_grid("euler", depth)
        with torch.no_grad():
            params = {k: v.detach().float().numpy() for k, v in block.curve.sample(times).items()}
        h = g.scalar(1.0 / depth)
        body = _step_body(g, block.field, "step", list(params), 2, h)
        return g.op("Scan", [x, *(g.const(v, k) for k, v in params.items())], body=body, num_scan_inputs=len(params))
    return _wrap(model, emit, "scan_given_weights")


FORMS = {"shipped": og.dynamic_graph, "unrolled_loop": unrolled_loop,
         "unrolled_loop_matmul": lambda m: unrolled_loop(m, "matmul"), "precompute_scan": precompute_scan,
         "loop_no_formation": loop_no_formation, "scan_given_weights": scan_given_weights}
BOUNDS = ("loop_no_formation", "scan_given_weights")


def session(proto: onnx.ModelProto):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def median_ms(run, repeats: int, budget: float) -> float:
    run()
    run()
    start = time.perf_counter()
    run()
    n = min(repeats, max(5, int(budget / max(time.perf_counter() - start, 1e-9))))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="16,64,256,1024")
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--budget", type=float, default=1.5, help="seconds per measurement, about")
    parser.add_argument("--no-one-pass", dest="one_pass", action="store_false",
                        help="skip the piecewise-constant model (one-copy formation) and its static graph")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = ODENetConfig(arch="mlp", in_shape=(64,), num_classes=10, widths=(64,), depths=(16,), knots=(16,),
                       hidden=64, scheme="euler")
    base = nontrivial(ODENet(cfg, init="iid", seed=0)).float().eval()
    # the same weights on a piecewise-constant curve: the shipped graph then forms each step's weights with
    # one Gather per parameter (one copy), the least any graph that materializes them can do
    constant = nontrivial(ODENet(replace(cfg, interp="constant"), init="iid", seed=0)).float().eval()
    forms = args.forms.split(",")
    dynamic = {f: session(FORMS[f](base)) for f in forms if f != "scan_given_weights"}
    one_pass = session(og.dynamic_graph(constant)) if args.one_pass else None
    rows = []
    for depth in (int(d) for d in args.depths.split(",")):
        model = base.discretize(depth=depth).eval()
        static = session(og.static_graph(model))
        given = session(scan_given_weights(base, depth)) if "scan_given_weights" in forms else None
        for batch in (int(b) for b in args.batches.split(",")):
            x = np.random.default_rng(depth).standard_normal((batch, 64)).astype(np.float32)
            with torch.no_grad():
                ref = model(torch.from_numpy(x)).numpy()
            row = {"depth": depth, "batch": batch,
                   "static_ms": median_ms(lambda s=static, x=x: s.run(None, {"input": x}), args.repeats, args.budget)}
            for f in forms:
                s = dynamic.get(f) or given
                feed = {"input": x, "depth": np.array(depth, np.int64)}
                ms = median_ms(lambda s=s, feed=feed: s.run(None, feed), args.repeats, args.budget)
                out = s.run(None, feed)[0]
                dev = None if f in BOUNDS else float(np.abs(out - ref).max() / np.abs(ref).max())
                row[f] = {"ms": ms, "ratio_to_static": round(ms / row["static_ms"], 3), "max_rel_deviation": dev}
            if one_pass is not None:  # its own reference: the static graph of the piecewise-constant model
                model_c = constant.discretize(depth=depth).eval()
                static_c = session(og.static_graph(model_c))
                with torch.no_grad():
                    ref_c = model_c(torch.from_numpy(x)).numpy()
                feed = {"input": x, "depth": np.array(depth, np.int64)}
                ms_s = median_ms(lambda s=static_c, x=x: s.run(None, {"input": x}), args.repeats, args.budget)
                ms = median_ms(lambda feed=feed: one_pass.run(None, feed), args.repeats, args.budget)
                row["one_pass_formation"] = {
                    "ms": ms, "static_ms": ms_s, "ratio_to_static": round(ms / ms_s, 3),
                    "max_rel_deviation": float(np.abs(one_pass.run(None, feed)[0] - ref_c).max() / np.abs(ref_c).max())}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    result = {"machine": {"machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                          "onnxruntime": ort.__version__, "ort_intra_op_threads": 1},
              "command": "python benchmarks/dynamic_forms.py " + " ".join(sys.argv[1:]),
              "workload": "benchmarks/export.py's: residual MLP width 64, hidden 64, 16 knots, linear, Euler",
              "unroll": UNROLL, "chunk": og.CHUNK, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for r in rows:
        cells = "  ".join(f"{f} {r[f]['ratio_to_static']:.2f}" for f in forms + ["one_pass_formation"] if f in r)
        print(f"depth {r['depth']:5d} batch {r['batch']:3d}: static {r['static_ms']:.3f} ms; ÷ static: {cells}")


if __name__ == "__main__":
    main()
