"""ONNX graphs with their precision written into them: FP16 everywhere except the ops ViTs are sensitive to.

TensorRT builds strongly typed networks from such a graph (TensorRT 10 and 11 alike; TensorRT 11 dropped the FP16,
INT8 and OBEY_PRECISION_CONSTRAINTS builder flags that chose precisions per layer): every tensor has the type the
graph gives it. `to_fp16` rewrites an FP32 graph (or the symmetric Q/DQ graph of an INT8 build) so that

- float initializers and constants become FP16, except those read only by the ops kept in FP32;
- `KEEP_FP32` ops (LayerNormalization, Softmax, the reductions of a LayerNorm exported as primitives, and Q/DQ,
  whose scales are FP32 below opset 19) read FP32 through a Cast and hand FP16 on through another;
- Casts to FLOAT inside the graph cast to FLOAT16 instead;
- the graph's inputs and outputs stay FP32 (a Cast after each input and before each output), so runners feed and
  read float32 whatever the precision inside.

This is the logic of onnxconverter-common's `convert_float_to_float16` with an op block list, written with the
`onnx` package for the opset-17+ graphs `deploy.export` writes (LayerNormalization is one op there).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

KEEP_FP32 = frozenset(
    {"LayerNormalization", "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceMax",
     "Pow", "QuantizeLinear", "DequantizeLinear"}
)  # fmt: skip


def _float_values(model: Any) -> set[str]:
    """Names of every FLOAT tensor of the graph (inputs, outputs, initializers, inferred intermediates)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            floats.add(info.name)
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and value.data_type == onnx.TensorProto.FLOAT:
                floats.add(node.output[0])
    return floats


def to_fp16(model: Any, keep: Iterable[str] = KEEP_FP32) -> tuple[Any, list[str]]:
    """The model with FP16 tensors except around the `keep` ops; returns it and the names of the nodes kept in FP32.

    The model is changed in place (pass a copy to keep the original)."""
    import onnx
    from onnx import helper, numpy_helper

    keep = frozenset(keep)
    graph = model.graph
    floats = _float_values(model)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    kept = [n for n in graph.node if n.op_type in keep]
    kept_ids = {id(n) for n in kept}

    def only_kept(name: str) -> bool:
        users = consumers.get(name, [])
        return bool(users) and all(id(u) in kept_ids for u in users)

    constants = {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    fp32_left = {name for name in floats & constants if only_kept(name)}  # read only by kept ops: stay FP32
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and init.name not in fp32_left:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    new_nodes: list[Any] = []
    counter = iter(range(1 << 30))

    def cast(src: str, to: int, suffix: str) -> str:
        out = f"{src}__{suffix}{next(counter)}"
        new_nodes.append(helper.make_node("Cast", [src], [out], to=to, name=f"{out}__cast"))
        return out

    inputs_fp16 = {
        i.name: cast(i.name, onnx.TensorProto.FLOAT16, "fp16") for i in graph.input if i.name in floats
    }  # graph inputs stay FP32 for the caller
    outputs = {o.name for o in graph.output if o.name in floats}
    renamed_out = {name: f"{name}__fp16" for name in outputs}
    for node in graph.node:
        is_kept = id(node) in kept_ids
        for k, name in enumerate(node.input):
            if name in inputs_fp16 and not is_kept:
                node.input[k] = inputs_fp16[name]
            elif is_kept and name in floats and name not in fp32_left and name not in inputs_fp16:
                node.input[k] = cast(renamed_out.get(name, name), onnx.TensorProto.FLOAT, "fp32")
            elif name in renamed_out:
                node.input[k] = renamed_out[name]
        if node.op_type == "Constant" and not is_kept and node.output[0] not in fp32_left:
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == onnx.TensorProto.FLOAT:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16)))
        if node.op_type == "ConstantOfShape" and not is_kept:
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == onnx.TensorProto.FLOAT:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16)))
        if node.op_type == "Cast" and not is_kept:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                    attr.i = onnx.TensorProto.FLOAT16
        if is_kept:
            for k, name in enumerate(node.output):
                if name in floats:
                    node.output[k] = f"{name}__fp32"
                    target = renamed_out.get(name, name)
                    new_nodes.append(
                        helper.make_node(
                            "Cast", [node.output[k]], [target], to=onnx.TensorProto.FLOAT16, name=f"{name}__cast16"
                        )
                    )
        else:
            for k, name in enumerate(node.output):
                if name in renamed_out:
                    node.output[k] = renamed_out[name]
        new_nodes.append(node)
    new_nodes += [
        helper.make_node("Cast", [fp16], [name], to=onnx.TensorProto.FLOAT, name=f"{name}__cast32")
        for name, fp16 in renamed_out.items()
    ]
    del graph.node[:]
    graph.node.extend(_topological(new_nodes, graph))
    keep_info = [v for v in graph.value_info if v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT]
    del graph.value_info[:]  # stale FLOAT types; shape inference gives the new ones
    graph.value_info.extend(keep_info)
    return model, [n.name for n in kept]


def _topological(nodes: list[Any], graph: Any) -> list[Any]:
    """Nodes ordered so that each comes after the producers of its inputs (ONNX requires it)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(nodes), []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({n for node in rest for n in node.input if n not in ready})[:5]
            raise ValueError(f"FP16 conversion left a graph whose inputs are never produced: {missing}")
        pending = rest
    return ordered


def write_fp16(src: Path, dst: Path, keep: Iterable[str] = KEEP_FP32) -> tuple[Path, list[str]]:
    """`to_fp16` of the ONNX file `src`, checked with onnx's checker and shape inference, written to `dst`."""
    import onnx

    model = onnx.load(str(src))
    model, kept = to_fp16(model, keep)
    onnx.checker.check_model(model, full_check=True)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst, kept
