"""ONNX Runtime CPU: each block's attention rewritten as one fused `com.microsoft.Attention` node.

`dmtjepa export` writes attention in standard ONNX ops (qkv MatMul + Add, a Reshape to
[B, N, 3, H, d], a Transpose, three Slice/Squeeze, q @ k^T with its scale, Softmax, @ v, a Transpose
back and a Reshape to [B, N, D]), which every runtime reads. ONNX Runtime's own optimiser does not
fuse that pattern (nor timm's), so its CPU session runs the pieces one by one, with three full
transposes of the activations per block. Its contrib `Attention` kernel takes the block's input,
the qkv weight and bias and writes [B, N, D] directly: ViT-S/16 at 224 px ran 13.6 % faster on a
2-core AMD EPYC (docs/embed.md), and dynamic int8 quantises the fused node as `QAttention` (13 %
faster again). The file on disk stays standard ONNX; only the session's copy of the graph is
rewritten, and only after the rewritten graph matched the original on a test batch.

Matching is by dataflow, not by node names: from each Softmax, its `@ v` MatMul, the Transpose
(0, 2, 1, 3) and Reshape that follow, and back to the one weight MatMul (weight [D_in, 3 * D],
bias [3 * D]) nearest to both the logits and v. Every node between that MatMul and the final
Reshape is replaced, provided nothing outside uses a value they make and each is an op this
pattern uses; the logits' scale is the product of the scalar Mul (and 1 / Div) constants on the way.
Anything else is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

# The ops the exporter uses between the qkv MatMul and the output Reshape; any other op means a pattern we do not know.
PATTERN_OPS = {"MatMul", "Add", "Reshape", "Transpose", "Slice", "Squeeze", "Split", "Shape", "Concat", "Mul", "Div",
               "Softmax", "Gather", "Unsqueeze", "Cast", "Constant"}  # fmt: skip


class _Graph:
    """Producer, consumer and constant lookups over one ONNX graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initialisers = {init.name: init for init in graph.initializer}
        self.constants = {
            node.output[0]: node.attribute[0].t
            for node in graph.node
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"
        }
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {out.name for out in graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        tensor = self.initialisers.get(name, self.constants.get(name))
        return None if tensor is None else numpy_helper.to_array(tensor)

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        found = self.consumers.get(name, [])
        if len(found) == 1 and found[0].op_type == op_type and name not in self.outputs:
            return found[0]
        return None

    def ancestors(self, name: str) -> set[int]:
        found, stack = set(), [name]
        while stack:
            node = self.producer.get(stack.pop())
            if node is not None and id(node) not in found:
                found.add(id(node))
                stack.extend(node.input)
        return found

    def descendants(self, node: onnx.NodeProto) -> set[int]:
        found, stack = {id(node)}, list(node.output)
        while stack:
            for consumer in self.consumers.get(stack.pop(), []):
                if id(consumer) not in found:
                    found.add(id(consumer))
                    stack.extend(consumer.output)
        return found


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _match(g: _Graph, softmax: onnx.NodeProto, num_heads: int) -> tuple[set[int], onnx.NodeProto, onnx.NodeProto] | None:
    """(ids of the nodes to replace, the qkv MatMul among them, the fused node) for the attention around `softmax`."""
    if _attribute(softmax, "axis", -1) not in (-1, 3):
        return None
    weighted = g.only_consumer(softmax.output[0], "MatMul")  # probs @ v: [B, H, N, d]
    if weighted is None or weighted.input[0] != softmax.output[0]:
        return None
    back = g.only_consumer(weighted.output[0], "Transpose")
    if back is None or list(_attribute(back, "perm", [])) != [0, 2, 1, 3]:
        return None
    merged = g.only_consumer(back.output[0], "Reshape")  # [B, N, H, d] -> [B, N, D]
    if merged is None:
        return None
    upstream = g.ancestors(weighted.input[1]) & g.ancestors(softmax.input[0])
    qkv = [node for node in g.graph.node if id(node) in upstream and node.op_type == "MatMul"
           and g.constant(node.input[1]) is not None]  # fmt: skip
    if not qkv:
        return None
    project = qkv[-1]  # the nearest (nodes are in topological order): earlier blocks' MatMuls feed it too
    weight = g.constant(project.input[1])
    bias_add = g.only_consumer(project.output[0], "Add")
    if weight.ndim != 2 or weight.shape[1] % 3 or bias_add is None:
        return None
    bias_name = bias_add.input[1] if bias_add.input[0] == project.output[0] else bias_add.input[0]
    bias = g.constant(bias_name)
    width = weight.shape[1] // 3
    if bias is None or bias.shape != (3 * width,) or width % num_heads:
        return None
    inside = g.descendants(project) & g.ancestors(merged.output[0])
    nodes = [node for node in g.graph.node if id(node) in inside]
    for node in nodes:
        if node.op_type not in PATTERN_OPS:
            return None
        if node is merged:
            continue
        for out in node.output:  # nothing outside may use a value the pattern makes
            if out in g.outputs or any(id(c) not in inside for c in g.consumers.get(out, [])):
                return None
    scale = 1.0
    for node in nodes:
        if node.op_type in ("Mul", "Div"):
            constants = [g.constant(name) for name in node.input]
            factor = constants[1] if node.op_type == "Div" else next((c for c in constants if c is not None), None)
            if factor is None or factor.size != 1:
                return None  # a Mul of two activations inside attention is not this pattern
            scale = scale / float(factor.reshape(())) if node.op_type == "Div" else scale * float(factor.reshape(()))
    fused = helper.make_node(
        "Attention",
        [project.input[0], project.input[1], bias_name],
        [merged.output[0]],
        name=f"{project.name or merged.output[0]}_fused_attention",
        domain="com.microsoft",
        num_heads=num_heads,
        scale=scale,
    )
    return inside, project, fused


def fuse_attention(model: onnx.ModelProto, num_heads: int) -> tuple[onnx.ModelProto, int]:
    """A copy of `model` with every attention it matches fused, and how many were."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = _Graph(model.graph)
    replaced: set[int] = set()
    fused_at: dict[int, onnx.NodeProto] = {}
    for softmax in [node for node in model.graph.node if node.op_type == "Softmax"]:
        found = _match(g, softmax, num_heads)
        if found is None:
            continue
        inside, project, fused = found
        if inside & replaced:
            continue
        replaced |= inside
        fused_at[id(project)] = fused  # the qkv MatMul's place: its input exists there
    if not fused_at:
        return model, 0
    kept = [fused_at.get(id(node), node) for node in model.graph.node if id(node) not in replaced or id(node) in fused_at]
    # Shape helpers that only fed the replaced nodes (Shape/Concat of the input's size) are dropped too.
    needed = {out.name for out in model.graph.output}
    alive = []
    for node in reversed(kept):
        if any(out in needed for out in node.output):
            alive.append(node)
            needed.update(node.input)
    model.graph.ClearField("node")
    model.graph.node.extend(reversed(alive))
    used = {name for node in model.graph.node for name in node.input}
    unused = [init for init in model.graph.initializer if init.name not in used]
    for init in unused:
        model.graph.initializer.remove(init)
    model.graph.ClearField("value_info")  # shapes of removed values; ONNX Runtime infers its own
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, len(fused_at)
