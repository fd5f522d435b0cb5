"""3D convolutions written as 2D convolutions over the frames: the same function, a graph that
ONNX Runtime's CPU runs faster (the demo model 2.4x, a wide R50 a little).

ONNX Runtime's CPU ``Conv`` runs a 3D convolution as im2col + GEMM over the whole clip. For
the convolutions of a small SlowFast this is memory-bound: the Fast stem (1 input channel,
5 x 7 x 7 kernel, 1-2 output channels on 32 x 64 x 64) unrolls 245 values per output and
took about half of the demo model's time, for a GEMM with one or two rows. 2D convolutions
(with ONNX Runtime's blocked NCHWc kernels) do not have that problem, so every ``Conv`` with a
5-D weight and a spatial kernel larger than 1 x 1 (groups 1, dilation 1, explicit pads)
becomes

    Transpose (N,C,T,H,W -> N,T,C,H,W) -> Reshape (N*T,C,H,W) -> 2D Conv with kt*C_out outputs
    -> Reshape (N,T,kt*C_out,H',W') -> [kt > 1: Pad in time, then output frame t = sum over
    taps k of tap k's maps at input frame s*t + k - p, as strided Slices and Adds]
    -> Transpose (N,C_out,T',H',W')

The 2D conv runs once per input frame; its im2col holds ``C_in x kh x kw`` values per output
position instead of ``C_in x kt x kh x kw``; the work is the same. The bias is added inside
the 2D conv on the channels of a tap that reads a real frame for every output frame (the
centre tap of a "same" convolution), so exactly once per output. Shapes come from ONNX shape
inference and must be static apart from the batch axis (so the graph computes no shapes at
run time). ONNX Runtime cancels most of the Transposes between consecutive convolutions.
Convolutions with a 1 x 1 spatial kernel (an R50's bottleneck ends and temporal 3 x 1 x 1
convs, the fusion convs) stay 3D: they need no spatial im2col, and lowering them was slower
on an R50 (33.5 vs 41.1 ms at batch 1 when all were lowered; 34.7 ms with none lowered).

Used by the export (``fmh export --conv3d as2d``, the default; parity against PyTorch is
checked on the result) and for files exported before (no checkpoint needed):

    python -m export.lower_onnx IN.onnx OUT.onnx

The benchmark that chose this: ``python -m bench.bench_model_latency MODEL --compare-lowering``
(bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.errors import ModelError

__all__ = ["lower_onnx", "lower_onnx_file", "bias_tap", "LOWERINGS"]

LOWERINGS = ("as2d", "none")      # values of the export's ``conv3d`` option


def bias_tap(t: int, kt: int, st: int, pt: int) -> int | None:
    """The temporal tap of a (T, kt, stride st, padding pt) convolution that reads a real
    input frame for every output frame (the first such), or None if there is none."""
    t_out = (t + 2 * pt - kt) // st + 1
    for k in range(kt):
        if k - pt >= 0 and st * (t_out - 1) + k - pt < t:
            return k
    return None


def _attr(node, name: str, default):
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def lower_onnx(model):
    """A copy of the ``onnx.ModelProto`` with its 3D ``Conv``s written as 2D convolutions, and
    how many; convolutions with a 1 x 1 spatial kernel are left as they are.

    Raises
    ------
    ModelError
        A 3D Conv this rewrite cannot express (groups, dilation, auto_pad) or whose input shape
        is not static apart from the batch axis.
    """
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    model = shape_inference.infer_shapes(model)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    shapes = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    new_nodes, new_inits = [], []
    uid = [0]

    def name(base: str) -> str:
        uid[0] += 1
        return f"/lower3d/{base}_{uid[0]}"

    def const(values, dtype=np.int64) -> str:
        n = name("c")
        new_inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), n))
        return n

    def node(op: str, inputs: list[str], **attrs) -> str:
        out = name(op)
        new_nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    # Constant tensors by name: initializers, Constant nodes, and Identity nodes of either (the
    # TorchScript exporter shares identical initializers, e.g. zero biases, through Identity).
    consts = {name: numpy_helper.to_array(i) for name, i in inits.items()}
    for nd in g.node:
        if nd.op_type == "Constant" and _attr(nd, "value", None) is not None:
            consts[nd.output[0]] = numpy_helper.to_array(_attr(nd, "value", None))
        elif nd.op_type == "Identity" and nd.input[0] in consts:
            consts[nd.output[0]] = consts[nd.input[0]]

    n_lowered = 0
    for nd in g.node:
        if nd.op_type != "Conv" or len(nd.input) < 2:
            new_nodes.append(nd)
            continue
        where = f"Conv {nd.name or nd.output[0]}"
        weight = consts.get(nd.input[1])
        if weight is None:
            if len(shapes.get(nd.input[1]) or ()) == 5:
                raise ModelError(f"{where}: its 3D weight is computed in the graph, not a "
                                 "constant; it cannot be lowered")
            new_nodes.append(nd)
            continue
        if weight.ndim != 5 or weight.shape[3] * weight.shape[4] == 1:
            # 1x1 spatial kernels need no spatial im2col: lowering them only adds the tap
            # sums' memory traffic (measured slower on the wide convolutions of an R50)
            new_nodes.append(nd)
            continue
        if _attr(nd, "group", 1) != 1 or any(d != 1 for d in _attr(nd, "dilations", [1, 1, 1])):
            raise ModelError(f"{where}: groups/dilation other than 1 cannot be lowered")
        if _attr(nd, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise ModelError(f"{where}: auto_pad cannot be lowered (export with explicit pads)")
        shape = shapes.get(nd.input[0])
        if not shape or len(shape) != 5 or any(v is None for v in shape[1:]):
            raise ModelError(f"{where}: input shape {shape} is not static apart from the batch")
        _, c_in, t, h, wd = shape
        c_out, _, kt, kh, kw = weight.shape
        st, sh, sw = _attr(nd, "strides", [1, 1, 1])
        pads = _attr(nd, "pads", [0] * 6)
        if pads[0] != pads[3]:
            raise ModelError(f"{where}: asymmetric temporal padding {pads} cannot be lowered")
        pt = pads[0]
        ho = (h + pads[1] + pads[4] - kh) // sh + 1
        wo = (wd + pads[2] + pads[5] - kw) // sw + 1
        w2 = np.ascontiguousarray(weight.transpose(2, 0, 1, 3, 4).reshape(kt * c_out, c_in, kh, kw))
        bias = None
        if len(nd.input) > 2 and nd.input[2]:
            bias = consts.get(nd.input[2])
            if bias is None:
                raise ModelError(f"{where}: its bias {nd.input[2]!r} is not a constant")
        tap = bias_tap(t, kt, st, pt)
        conv_in = None
        if bias is not None and tap is not None:      # once per output, inside the 2D conv
            b2 = np.zeros((kt, c_out), bias.dtype)
            b2[tap] = bias
            conv_in, bias = const(b2.reshape(-1), b2.dtype), None
        x = node("Transpose", [nd.input[0]], perm=[0, 2, 1, 3, 4])
        x = node("Reshape", [x, const([-1, c_in, h, wd])])
        z = node("Conv", [x, const(w2, w2.dtype)] + ([conv_in] if conv_in else []),
                 kernel_shape=[kh, kw], strides=[sh, sw],
                 pads=[pads[1], pads[2], pads[4], pads[5]])
        z = node("Reshape", [z, const([-1, t, kt * c_out, ho, wo])])
        if kt == 1 and st == 1 and pt == 0:
            y = z
        else:
            t_out = (t + 2 * pt - kt) // st + 1
            if t_out < 1:
                raise ModelError(f"{where}: T={t}, temporal kernel {kt}, stride {st}, pad {pt} "
                                 "gives no output frame")
            if pt:
                z = node("Pad", [z, const([0, pt, 0, 0, 0, 0, pt, 0, 0, 0])], mode="constant")
            span = st * (t_out - 1) + 1
            y = None
            for k in range(kt):
                term = node("Slice", [z, const([k, k * c_out]), const([k + span, (k + 1) * c_out]),
                                      const([1, 2]), const([st, 1])])
                y = term if y is None else node("Add", [y, term])
        y = node("Transpose", [y], perm=[0, 2, 1, 3, 4])
        if bias is not None:
            b = bias.reshape(1, c_out, 1, 1, 1)
            y = node("Add", [y, const(b, b.dtype)])
        new_nodes[-1].output[0] = nd.output[0]      # the last node (y) takes the conv's name
        n_lowered += 1
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    out.graph.initializer.extend(new_inits)
    del out.graph.value_info[:]
    used = {i for n in out.graph.node for i in n.input}
    keep = [i for i in out.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    return out, n_lowered


def lower_onnx_file(src: str | os.PathLike, dst: str | os.PathLike, *,
                    tolerance: float = 1e-4, batches: Sequence[int] = (1, 3),
                    seed: int = 0) -> dict:
    """Lower ``src`` into ``dst`` (metadata kept, ``fmh.export`` updated) and check with ONNX
    Runtime that both give the same outputs on random inputs; returns what was measured.

    Raises
    ------
    ModelError
        Unreadable input, a Conv that cannot be lowered, or outputs that differ by more than
        ``tolerance`` (then nothing is written).
    """
    import json

    import onnx
    import onnxruntime as ort
    src, dst = Path(src), Path(dst)
    try:
        model = onnx.load(str(src))
    except Exception as exc:  # noqa: BLE001 - protobuf errors have many types
        raise ModelError(f"{src}: not a readable ONNX file ({type(exc).__name__}: {exc})") from None
    lowered, n = lower_onnx(model)
    meta = {p.key: p for p in lowered.metadata_props}
    if "fmh.format" in meta:
        info = json.loads(meta["fmh.export"].value) if "fmh.export" in meta else {}
        info["conv3d"] = "as2d"
        if "fmh.export" in meta:
            meta["fmh.export"].value = json.dumps(info)
        else:
            e = lowered.metadata_props.add()
            e.key, e.value = "fmh.export", json.dumps(info)
    onnx.checker.check_model(lowered, full_check=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    a = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(lowered.SerializeToString(), so, providers=["CPUExecutionProvider"])
    inp = a.get_inputs()[0]
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch in batches:
        x = rng.standard_normal([batch] + [int(d) for d in inp.shape[1:]]).astype(np.float32)
        ya, yb = a.run(None, {inp.name: x})[0], b.run(None, {inp.name: x})[0]
        worst = max(worst, float(np.max(np.abs(ya - yb))))
    if not worst <= tolerance:
        raise ModelError(f"{src}: lowered graph differs by {worst:.3e} > {tolerance:.0e}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(lowered, str(tmp))
    os.replace(tmp, dst)
    return {"convs_lowered": n, "max_abs_diff": worst, "path": str(dst)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write an ONNX model's 3D convolutions as 2D ones")
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args(argv)
    try:
        res = lower_onnx_file(args.src, args.dst)
    except ModelError as exc:
        print(f"lower_onnx: {exc}")
        return 2
    print(f"wrote {res['path']}: {res['convs_lowered']} 3D convolutions lowered, "
          f"max |difference| {res['max_abs_diff']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
