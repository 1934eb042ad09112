"""ONNX graphs of an ODENet, built node by node from the known structure.

The stock ``torch.onnx.export`` traces the Python stepping loop: minutes for a 1024-step solve.
The network's structure is known here (stem → [ODE block → transition] → head, a field, a
Butcher tableau), so the graph is written directly with ``onnx.helper``: a second or less at
any depth. Two forms:

- **static**: the solve unrolled at one depth and scheme; each stage time's weights are sampled
  from the curve exactly as the PyTorch model samples them, and stored as initializers.
- **dynamic depth**: inputs ``input`` and ``depth`` (int64 scalar). The curves are stored as
  piecewise polynomials in t (their exact form: every interpolation here is piecewise cubic or
  lower on a uniform grid), so the file size does not depend on depth. Before the loop the graph
  computes, for every step's stages, the piece and the offset in it (exact integer arithmetic, as
  the PyTorch side snaps t·K). A ``Loop`` over chunks of ``CHUNK`` steps then forms each chunk's
  weights from the coefficient tables (a few operations per parameter for the whole chunk, on data
  that stays in cache) and runs a ``Scan`` over them, which hands each step its slice without a copy.
  The last chunk is simply shorter. ``benchmarks/dynamic_forms.py`` times this form against the
  others tried: 8-step unrolled bodies that split their weights (the form shipped before, 5–15 %
  slower at batch 1), all weights formed before one ``Scan`` (a (depth, …) tensor per call: slower
  than the solve), a flat-table MatMul formation, and two bounds without formation, which show
  that the loop machinery costs little next to forming the weights.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..curves import Curve, default_num_basis
from ..errors import ResodeError
from ..fields import ConvField, Field, LinearField, MLPField, ResBlockField
from ..network import ODEBlock, ODENet, normalization
from ..resnet import ConvAffine
from ..schemes import ButcherTableau, ReversibleHeun, get_scheme, stage_grid

OPSET = 17
CHUNK = 16  # steps whose weights the dynamic-depth graph forms at a time (benchmarks/dynamic_forms.py)
GN_EPS = 1e-5  # torch.nn.functional.group_norm's default


class GraphBuilder:
    """Nodes and initializers with unique names; ``op`` returns the output name(s)."""

    def __init__(self, prefix: str = ""):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.prefix = prefix
        self._count = 0
        self._scalars: dict[tuple, str] = {}

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{self.prefix}{base}_{self._count}"

    def const(self, array: np.ndarray, base: str = "c") -> str:
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))  # keeps 0-d arrays 0-d
        return name

    def scalar(self, value: float, dtype=np.float32) -> str:
        key = (float(value), np.dtype(dtype).str)
        if key not in self._scalars:
            self._scalars[key] = self.const(np.array(value, dtype=dtype), "s")
        return self._scalars[key]

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64), "i")

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs


# --- layers ---------------------------------------------------------------------------------


def _act(g: GraphBuilder, x: str, name: str) -> str:
    if name == "relu":
        return g.op("Relu", [x])
    if name == "tanh":
        return g.op("Tanh", [x])
    if name == "gelu":  # exact (erf) GELU, as torch's default; Gelu is an op only from opset 20
        erf = g.op("Erf", [g.op("Mul", [x, g.scalar(1 / math.sqrt(2))])])
        return g.op("Mul", [g.op("Mul", [x, g.scalar(0.5)]), g.op("Add", [erf, g.scalar(1.0)])])
    raise ResodeError(f"no ONNX form for activation {name!r}")


def _group_norm(g: GraphBuilder, x: str, groups: int, gamma: str, beta: str) -> str:
    """GroupNorm on (B, C, H, W); gamma and beta already shaped (C, 1, 1)."""
    grouped = g.op("Reshape", [x, g.ints([0, groups, -1])])
    mean = g.op("ReduceMean", [grouped], axes=[2], keepdims=1)
    centred = g.op("Sub", [grouped, mean])
    var = g.op("ReduceMean", [g.op("Mul", [centred, centred])], axes=[2], keepdims=1)
    normed = g.op("Div", [centred, g.op("Sqrt", [g.op("Add", [var, g.scalar(GN_EPS)])])])
    normed = g.op("Reshape", [normed, g.op("Shape", [x])])
    return g.op("Add", [g.op("Mul", [normed, gamma]), beta])


def _conv(g: GraphBuilder, x: str, w: str, b: str | None, stride: int = 1, kernel: int = 3, pad: int = 1,
          groups: int = 1) -> str:
    return g.op("Conv", [x, w] + ([b] if b is not None else []), kernel_shape=[kernel, kernel], pads=[pad] * 4,
                strides=[stride, stride], group=groups)


def field_layout(field: Field, name: str, array: np.ndarray) -> np.ndarray:
    """A parameter (with any leading axes) in the layout the ONNX field takes: per-channel affines as (C, 1, 1)."""
    if (isinstance(field, ConvField) and name in ("gamma", "beta")) or (
            isinstance(field, ResBlockField) and name[0] in "st"):
        return array.reshape(*array.shape, 1, 1)
    return array


def _project(g: GraphBuilder, field: Field, x: str) -> str:
    """The field's step projection (ReLU for torchvision blocks)."""
    if field.projection is None:
        return x
    if field.projection == "relu":
        return g.op("Relu", [x])
    raise ResodeError(f"no ONNX form for projection {field.projection!r}")


def emit_field(g: GraphBuilder, field: Field, x: str, theta: dict[str, str]) -> str:
    if isinstance(field, MLPField):
        z = g.op("Gemm", [x, theta["W"], theta["b"]], transB=1)
        return g.op("Gemm", [_act(g, z, field.activation), theta["V"]], transB=1)
    if isinstance(field, LinearField):
        return g.op("Gemm", [x, theta["A"]], transB=1)
    if isinstance(field, ConvField):
        z = _conv(g, x, theta["w1"], theta["b1"])
        z = _group_norm(g, z, field.groups, theta["gamma"], theta["beta"])
        return _conv(g, _act(g, z, field.activation), theta["w2"], theta["b2"])
    if isinstance(field, ResBlockField):
        convs = field.convs()
        for i, (shape, pad, groups) in enumerate(convs, start=1):
            if field.bn == "fold":
                x = _conv(g, x, theta[f"w{i}"], theta[f"b{i}"], 1, shape[2], pad, groups)
            else:
                x = _conv(g, x, theta[f"w{i}"], None, 1, shape[2], pad, groups)
                x = g.op("Add", [g.op("Mul", [x, theta[f"s{i}"]]), theta[f"t{i}"]])
            if i < len(convs):
                x = g.op("Relu", [x])
        return x
    raise ResodeError(f"no ONNX form for field {field.name!r}")


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def _linear(g: GraphBuilder, x: str, layer: torch.nn.Linear) -> str:
    return g.op("Gemm", [x, g.const(_array(layer.weight), "W"), g.const(_array(layer.bias), "b")], transB=1)


def _conv_layer(g: GraphBuilder, x: str, layer: torch.nn.Conv2d) -> str:
    return _conv(g, x, g.const(_array(layer.weight), "w"), g.const(_array(layer.bias), "b"), layer.stride[0])


def _conv_affine(g: GraphBuilder, x: str, layer: ConvAffine) -> str:
    conv = layer.conv
    bias = g.const(_array(conv.bias), "b") if conv.bias is not None else None
    x = _conv(g, x, g.const(_array(conv.weight), "w"), bias, conv.stride[0], conv.kernel_size[0], conv.padding[0],
              conv.groups)
    if layer.bn == "frozen":
        x = g.op("Add", [g.op("Mul", [x, g.const(_array(layer.scale).reshape(-1, 1, 1), "scale")]),
                         g.const(_array(layer.shift).reshape(-1, 1, 1), "shift")])
    return x


def emit_stem(g: GraphBuilder, model: ODENet, x: str) -> str:
    norm = normalization(model.config)
    if norm is not None:  # the recorded input normalization, as a prefix of the graph
        x = g.op("Div", [g.op("Sub", [x, g.const(norm[0].numpy().astype(np.float32), "mean")]),
                         g.const(norm[1].numpy().astype(np.float32), "std")])
    if model.config.arch == "resnet":
        x = g.op("Relu", [_conv_affine(g, x, model.stem.conv)])
        if model.stem.kernel == 3:  # the small-image stem: no maxpool
            return x
        return g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    if model.config.arch == "mlp":
        if len(model.config.in_shape) > 1:
            x = g.op("Flatten", [x], axis=1)
        return _linear(g, x, model.stem)
    return _act(g, _conv_layer(g, x, model.stem[0]), model.config.activation)


def emit_transition(g: GraphBuilder, model: ODENet, i: int, x: str) -> str:
    layer = model.transitions[i]
    if model.config.arch == "resnet":  # a torchvision block: relu(F(x) + x or downsample(x))
        out = x
        for j, conv in enumerate(layer.convs):
            out = _conv_affine(g, out, conv)
            if j < len(layer.convs) - 1:
                out = g.op("Relu", [out])
        identity = x if layer.downsample is None else _conv_affine(g, x, layer.downsample)
        return g.op("Relu", [g.op("Add", [out, identity])])
    return _linear(g, x, layer) if model.config.arch == "mlp" else _conv_layer(g, x, layer)


def emit_head(g: GraphBuilder, model: ODENet, x: str) -> str:
    if model.config.arch == "mlp":
        return _linear(g, x, model.head)
    if model.config.arch == "resnet":
        return _linear(g, g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1), model.head.fc)
    norm, linear = model.head[0], model.head[4]
    gamma = g.const(_array(norm.weight).reshape(-1, 1, 1), "gamma")
    beta = g.const(_array(norm.bias).reshape(-1, 1, 1), "beta")
    x = _act(g, _group_norm(g, x, norm.num_groups, gamma, beta), model.config.activation)
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    return _linear(g, x, linear)


# --- one step of a scheme -------------------------------------------------------------------


def emit_rk_step(g: GraphBuilder, field: Field, tableau: ButcherTableau, x: str, thetas: list[dict[str, str]],
                 h_times) -> str:
    """x + h Σ b_i k_i as :func:`schemes.rk_step` computes it; ``h_times(c)`` names the constant h·c."""
    ks: list[str] = []
    for i, theta in enumerate(thetas):
        xi = x
        for j, aij in enumerate(tableau.a[i][:i]):
            if aij:
                xi = g.op("Add", [xi, g.op("Mul", [h_times(aij), ks[j]])])
        ks.append(emit_field(g, field, xi, theta))
    if tableau.stages == 1:
        return _project(g, field, g.op("Add", [x, g.op("Mul", [h_times(1.0), ks[0]])]))
    update = None
    for bi, k in zip(tableau.b, ks):
        if bi:
            term = g.op("Mul", [g.scalar(bi), k])
            update = term if update is None else g.op("Add", [update, term])
    return _project(g, field, g.op("Add", [x, g.op("Mul", [h_times(1.0), update])]))


def emit_reversible_step(g: GraphBuilder, field: Field, state: tuple[str, str, str], theta_next: dict[str, str],
                         h_times) -> tuple[str, str, str]:
    x, z, fz = state
    z_next = g.op("Add", [g.op("Sub", [g.op("Mul", [g.scalar(2.0), x]), z]), g.op("Mul", [h_times(1.0), fz])])
    f_next = emit_field(g, field, z_next, theta_next)
    x_next = g.op("Add", [x, g.op("Mul", [h_times(0.5), g.op("Add", [fz, f_next])])])
    return x_next, z_next, f_next


# --- static graph ---------------------------------------------------------------------------


def emit_static_block(g: GraphBuilder, block: ODEBlock, x: str) -> str:
    times, index = stage_grid(block.scheme, block.depth)
    with torch.no_grad():
        params = {k: _array(v) for k, v in block.curve.sample(times).items()}
    names = [{k: g.const(field_layout(block.field, k, v[u]), k) for k, v in params.items()} for u in range(len(times))]
    h = 1.0 / block.depth

    def h_times(c):
        return g.scalar(h * c)

    tableau = get_scheme(block.scheme)
    if isinstance(tableau, ReversibleHeun):
        state = (x, x, emit_field(g, block.field, x, names[index[0][0]]))
        for n in range(block.depth):
            state = emit_reversible_step(g, block.field, state, names[index[n][1]], h_times)
        return state[0]
    for n in range(block.depth):
        x = emit_rk_step(g, block.field, tableau, x, [names[u] for u in index[n]], h_times)
    return x


def _io(model: ODENet, batch: str = "batch"):
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *model.config.in_shape])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, model.config.num_classes])
    return inp, out


def _finish(g: GraphBuilder, inputs, outputs, name: str, doc: str, metadata: dict[str, str]) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="resode",
                              doc_string=doc)
    model.ir_version = 8  # onnxruntime ≥ 1.14 reads it
    for k, v in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    return model


def static_graph(model: ODENet, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """The model unrolled at its own depths and scheme."""
    g = GraphBuilder()
    x = emit_stem(g, model, "input")
    for kind, i in model.order():
        x = emit_static_block(g, model.blocks[i], x) if kind == "block" else emit_transition(g, model, i, x)
    g.nodes.append(helper.make_node("Identity", [emit_head(g, model, x)], ["logits"]))
    inp, out = _io(model)
    return _finish(g, [inp], [out], "resode_static", f"resode ODENet, depths {list(model.config.depths)}, "
                   f"scheme {model.config.scheme}", metadata or {})


# --- dynamic-depth graph --------------------------------------------------------------------


def piecewise_polynomial(curve: Curve) -> tuple[int, int, np.ndarray]:
    """The curve as polynomials on a uniform grid of t: (S, degree, weights).

    On piece i = clip(floor(t S), 0, P − 1), with s = t S − i, θ(t) = Σ_m s^m Σ_k weights[i, m, k] θ_k
    (P = weights.shape[0]). Exact: every interpolation here is a polynomial of degree ≤ 3 there.
    """
    k = curve.num_knots
    interp = curve.interp
    if k == 1 or interp == "constant":
        scale, pieces, degree = k, k, 0
    elif interp == "linear" or (interp == "cubic" and k == 2):
        scale, pieces, degree = k, k - 1, 1
    elif interp == "cubic":
        scale, pieces, degree = k, (1 if k == 3 else k - 1), (2 if k == 3 else 3)
    elif interp == "smooth":
        j = curve.n_basis or default_num_basis(k)
        degree = min(3, j - 1)
        scale = pieces = j - degree
    else:
        raise ResodeError(f"no piecewise-polynomial form for interpolation {interp!r}")
    s = np.linspace(0.0, 1.0, degree + 1) if degree else np.zeros(1)
    if interp == "cubic" and k == 3:  # one parabola over u ∈ [0, 3]
        s = np.arange(3.0)
    vander = np.vander(s, degree + 1, increasing=True)  # (d+1, d+1)
    t = (np.arange(pieces)[:, None] + s[None, :]) / scale  # (P, d+1)
    basis = curve.basis(t.ravel()).numpy().reshape(pieces, degree + 1, k)
    weights = np.linalg.solve(vander[None], basis)  # (P, d+1, K): coefficients of s^m
    # check the form against the curve itself on times between the fitting points
    probe = np.linspace(0.0, 1.0, 97)
    u = probe * scale
    i = np.clip(np.floor(u + 1e-12), 0, pieces - 1).astype(int)
    powers = (u - i)[:, None] ** np.arange(degree + 1)[None, :]
    rebuilt = np.einsum("tm,tmk->tk", powers, weights[i])
    if not np.allclose(rebuilt, curve.basis(probe).numpy(), atol=1e-8):
        raise ResodeError(f"internal error: the {interp} curve is not piecewise polynomial on {pieces} pieces")
    return scale, degree, weights


def _stage_denominator(cs) -> int:
    den = 1
    for c in cs:
        f = Fraction(c).limit_denominator(1000)
        if abs(float(f) - c) > 1e-15:
            raise ResodeError(f"stage time {c} is not a simple fraction")
        den = math.lcm(den, f.denominator)
    return den


def curve_coefficients(field: Field, curve: Curve) -> tuple[int, int, dict[str, list[np.ndarray]]]:
    """(S, degree, tables) of :func:`piecewise_polynomial`: tables[name] = [C_0 .. C_d], C_m (P, *shape) float32
    in the field's layout, so that θ(t) = Σ_m s^m C_m[i] on piece i."""
    scale, degree, weights = piecewise_polynomial(curve)
    with torch.no_grad():
        knots = {k: v.detach().cpu().double().numpy() for k, v in curve.knots.items()}
    return scale, degree, {name: [field_layout(field, name, np.tensordot(weights[:, m], kn, axes=(1, 0)).astype(np.float32))
                                  for m in range(degree + 1)] for name, kn in knots.items()}


def stage_pieces(g: GraphBuilder, rows: str, c_num: int, den_c: int, den: str, den_f: str, scale: int,
                 pieces: int) -> tuple[str, str]:
    """Piece and offset ((R,) int64 and float32) of the stage at c = c_num / den_c of each step in ``rows``:
    t S = (n D + c D) S / (N D) in exact integers (``den`` = N D, ``den_f`` its double), as PyTorch snaps t·K."""
    num = g.op("Mul", [g.op("Add", [g.op("Mul", [rows, g.scalar(den_c, np.int64)]), g.scalar(c_num, np.int64)]),
                       g.scalar(scale, np.int64)])
    piece = g.op("Min", [g.op("Div", [num, den]), g.scalar(pieces - 1, np.int64)])
    rem = g.op("Sub", [num, g.op("Mul", [piece, den])])
    offset = g.op("Cast", [g.op("Div", [g.op("Cast", [rem], to=TensorProto.DOUBLE), den_f])], to=TensorProto.FLOAT)
    return piece, offset


def form_weights(b: GraphBuilder, g: GraphBuilder, tables: dict[str, list[str]], ranks: dict[str, int], degree: int,
                 piece: str, offset: str | None) -> dict[str, str]:
    """The weights of the steps ``piece``/``offset`` ((k,) each) select, {name: (k, *shape)}, by Horner's rule
    on the coefficient tables (their initializer names): a Gather per coefficient, a Mul and an Add per degree."""
    out = {}
    for name, coeffs in tables.items():
        acc = b.op("Gather", [coeffs[degree], piece], axis=0)
        if degree:
            s_b = b.op("Reshape", [offset, g.ints([-1] + [1] * ranks[name])])
            for m in reversed(range(degree)):
                acc = b.op("Add", [b.op("Mul", [acc, s_b]), b.op("Gather", [coeffs[m], piece], axis=0)])
        out[name] = acc
    return out


def emit_dynamic_block(g: GraphBuilder, block: ODEBlock, x: str, depth: str, stage: int) -> str:
    """``depth`` steps of the block's scheme (``depth`` names the int64 scalar input; below 1, one step).

    A ``Loop`` over chunks of ``CHUNK`` steps; each iteration forms its steps' weights from the coefficient
    tables, (count, *shape) per parameter and stage time, then a ``Scan`` runs the steps over them."""
    field = block.field
    tableau = get_scheme(block.scheme)
    scale, degree, coefficients = curve_coefficients(field, block.curve)
    pieces = next(iter(coefficients.values()))[0].shape[0]
    tables = {name: [g.const(c, f"{name}_c{m}") for m, c in enumerate(cs)] for name, cs in coefficients.items()}
    ranks = {name: cs[0].ndim - 1 for name, cs in coefficients.items()}
    cs = sorted(set(float(c) for c in tableau.c))
    den_c = _stage_denominator(cs)
    n = g.op("Max", [depth, g.scalar(1, np.int64)])  # dynamic_graph makes the logits of a depth below 1 NaN
    steps = g.op("Range", [g.scalar(0, np.int64), n, g.scalar(1, np.int64)])  # (N,)
    den = g.op("Mul", [n, g.scalar(den_c, np.int64)])  # N·D
    den_f = g.op("Cast", [den], to=TensorProto.DOUBLE)
    reversible = isinstance(tableau, ReversibleHeun)
    stage_cs = [1.0] if reversible else cs
    # Heun, rk4, rk38: a step's stage at c = 1 is the next step's at c = 0, so the chunk forms the c = 0
    # weights of one step more and hands both stage times a slice of them (a copy, not a formation)
    shared = not reversible and 0.0 in cs and 1.0 in cs
    per_stage: dict[float, tuple[str, str]] = {}
    for c in stage_cs:
        if shared and c == 1.0:
            continue
        rows = g.op("Range", [g.scalar(0, np.int64), g.op("Add", [n, g.scalar(1, np.int64)]),
                              g.scalar(1, np.int64)]) if shared and c == 0.0 else steps  # 0 .. N with sharing
        # (N,) each ((N + 1,) for shared c = 0): step n's stage at c sits on piece[n], offset s[n]
        per_stage[c] = stage_pieces(g, rows, round(c * den_c), den_c, den, den_f, scale, pieces)
    h = g.op("Reciprocal", [g.op("Cast", [n], to=TensorProto.FLOAT)])
    h_consts: dict[float, str] = {}

    def h_times(c):
        if c not in h_consts:
            h_consts[c] = h if c == 1.0 else g.op("Mul", [h, g.scalar(c)])
        return h_consts[c]

    for c in ([1.0, 0.5] if reversible else sorted({a for row in tableau.a for a in row if a} | {1.0})):
        h_times(c)  # outside the bodies, computed once
    if reversible:
        theta0 = {k: g.const(c[0][0], f"{k}_t0") for k, c in coefficients.items()}  # θ(0): piece 0 at s = 0
        state = [x, x, emit_field(g, field, x, theta0)]
    else:
        state = [x]
    conv_like = not isinstance(field, (MLPField, LinearField))
    if conv_like:
        # onnxruntime up to 1.22 aborts (a C++ assertion in ConvActivationFusion) on a Conv whose output goes
        # straight into a Loop (a conv transition, reversible Heun's f(x_0)); a one-input Sum, the identity,
        # keeps them apart. Fixed upstream in 1.23; CI runs the dynamic-depth tests on 1.22 too.
        state = [g.op("Sum", [s]) for s in state]
    tag = f"stage{stage}"

    # one step: the Scan body; its weights come in as scan inputs (slices Scan hands in without copying)
    sb = GraphBuilder(prefix=f"{tag}_step/")
    sb._scalars = g._scalars  # share the outer scalar constants (outer scope)
    inner = [f"{tag}_step/state{i}" for i in range(len(state))]
    theta = {c: {name: f"{tag}_step/{name}@{j}" for name in tables} for j, c in enumerate(stage_cs)}
    if reversible:
        cur = list(emit_reversible_step(sb, field, tuple(inner), theta[1.0], h_times))
    else:
        cur = [emit_rk_step(sb, field, tableau, inner[0], [theta[float(c)] for c in tableau.c], h_times)]
    outs = [sb.op("Identity", [c]) for c in cur]
    dims = [f"{tag}_dim{i}" for i in range(4 if conv_like else 2)]
    step_inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in inner]
    step_inputs += [helper.make_tensor_value_info(theta[c][name], TensorProto.FLOAT, None)
                    for c in stage_cs for name in tables]
    g.initializers.extend(sb.initializers)  # constants made for a body live in the outer graph
    step = helper.make_graph(sb.nodes, f"{tag}_step", step_inputs,  # a Scan inside a Loop needs its outputs' ranks
                             [helper.make_tensor_value_info(o, TensorProto.FLOAT, dims) for o in outs])

    # one chunk: the Loop body forms the weights of steps [CHUNK·i, CHUNK·(i+1)) ∩ [0, N), then scans them
    lb = GraphBuilder(prefix=f"{tag}_chunk/")
    lb._scalars = g._scalars
    it, cond = f"{tag}_chunk/iter", f"{tag}_chunk/cond"
    carried = [f"{tag}_chunk/state{i}" for i in range(len(state))]
    begin = lb.op("Reshape", [lb.op("Mul", [it, g.scalar(CHUNK, np.int64)]), g.ints([1])])
    end = lb.op("Add", [begin, g.ints([CHUNK])])
    formed: dict[tuple[float, str], str] = {}
    for c in per_stage:
        stop = lb.op("Add", [end, g.ints([1])]) if shared and c == 0.0 else end
        piece = lb.op("Slice", [per_stage[c][0], begin, stop])  # (count,), count ≤ CHUNK (+ 1 when shared)
        offset = lb.op("Slice", [per_stage[c][1], begin, stop]) if degree else None
        for name, acc in form_weights(lb, g, tables, ranks, degree, piece, offset).items():  # (count, *shape)
            if shared and c == 0.0:  # rows n .. n + count: c = 0 takes the first count, c = 1 the last count
                formed[(1.0, name)] = lb.op("Slice", [acc, g.ints([1]), g.ints([np.iinfo(np.int64).max])])
                acc = lb.op("Slice", [acc, g.ints([0]), g.ints([-1])])
            formed[(c, name)] = acc
    scanned = [formed[(c, name)] for c in stage_cs for name in tables]  # the step body's input order
    result = lb.op("Scan", [*carried, *scanned], n_out=len(state), body=step, num_scan_inputs=len(scanned))
    result = [result] if isinstance(result, str) else result
    chunk_outs = [lb.op("Identity", [cond])] + [lb.op("Identity", [r]) for r in result]
    g.initializers.extend(lb.initializers)
    chunk = helper.make_graph(
        lb.nodes, f"{tag}_chunk",
        [helper.make_tensor_value_info(it, TensorProto.INT64, []), helper.make_tensor_value_info(cond, TensorProto.BOOL, [])]
        + [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in carried],
        [helper.make_tensor_value_info(chunk_outs[0], TensorProto.BOOL, [])]
        + [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in chunk_outs[1:]])
    trips = g.op("Div", [g.op("Add", [n, g.scalar(CHUNK - 1, np.int64)]), g.scalar(CHUNK, np.int64)])  # ⌈N / CHUNK⌉
    # an explicit true condition: onnx's reference evaluator runs a Loop without one wrongly
    out = g.op("Loop", [trips, g.const(np.array(True), "true"), *state], n_out=len(state), body=chunk)
    return out if isinstance(out, str) else out[0]


def dynamic_graph(model: ODENet, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """One graph for every depth: inputs ``input`` and ``depth`` (int64 scalar, steps of every block)."""
    g = GraphBuilder()
    x = emit_stem(g, model, "input")
    for kind, i in model.order():
        x = emit_dynamic_block(g, model.blocks[i], x, "depth", i) if kind == "block" else emit_transition(g, model, i, x)
    logits = emit_head(g, model, x)
    # a depth below 1 has no meaning: NaN logits rather than the network without its ODE blocks
    g.nodes.append(helper.make_node("Where", [g.op("Greater", ["depth", g.scalar(0, np.int64)]), logits,
                                              g.scalar(float("nan"))], ["logits"]))
    inp, out = _io(model)
    depth = helper.make_tensor_value_info("depth", TensorProto.INT64, [])
    return _finish(g, [inp, depth], [out], "resode_dynamic_depth",
                   f"resode ODENet, scheme {model.config.scheme}, depth given at run time", metadata or {})


__all__ = ["CHUNK", "OPSET", "curve_coefficients", "dynamic_graph", "form_weights", "piecewise_polynomial",
           "stage_pieces", "static_graph"]
