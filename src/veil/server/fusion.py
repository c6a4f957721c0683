"""Transformer rewrites for ``optimization="graph"``, on the ONNX protobuf, in the admission child.

A classifier reads the last layer at token 0 only (``Gather(hidden, 0, axis=1)``), and after that
layer's key and value projections everything is per token: its queries, output projection and
feed-forward block need run for that one row (~14 % of DistilBERT's arithmetic at sequence
length 128). Three steps get there:

1. The last attention's scaled scores into the form ONNX Runtime's BERT fusion matches. It knows a
   mask-less attention only as ``Softmax(Div(MatMul(q, k), c))``; Transformers 5 exports
   ``Softmax(MatMul(Mul(q, s), Mul(k, s)))`` (SDPA) or ``Softmax(Mul(MatMul(q, k), s))`` (eager).
   Only the last: fused, the other layers would cost as much or more (bench/README.md).
2. ``onnxruntime.transformers``' BERT attention fusion, the head count read from the graph's
   reshapes: the last layer's attention becomes one Attention node.
3. That node becomes a MultiHeadAttention with one query row over all keys, and the per-token
   operators between it and the ``Gather`` get that row instead of every token.

The result is offered only when step 3 applied. A graph where any Softmax reads something else
than scaled scores (a masked attention) is left as it is: the probe that vouches for the result
feeds all-zero masks, which cannot show a mask handled wrongly. The caller
(`veil.server.optimize`) keeps the result only if its outputs match the original's on that probe
and it is not slower.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["fuse_transformer"]

_MS = "com.microsoft"
_SMALL = 64  # elements: constants read as values; larger ones only by shape
# Operators that act on each token (row of axis 1) alone, given constant weights.
_ROWWISE = {
    ("", "MatMul"),
    ("", "Add"),
    ("", "Sub"),
    ("", "Mul"),
    ("", "Div"),
    ("", "Relu"),
    ("", "Erf"),
    ("", "Tanh"),
    ("", "Sigmoid"),
    ("", "LayerNormalization"),
    (_MS, "SkipLayerNormalization"),
    (_MS, "BiasGelu"),
    (_MS, "FastGelu"),
    (_MS, "Gelu"),
}


def _constants(graph: Any) -> dict[str, np.ndarray[Any, Any]]:
    """The graph's small constants (scales, indices, shape pieces), as arrays.

    Small only: converting every weight would copy the whole model once more, in a child whose
    address space is capped.
    """
    from onnx import numpy_helper

    found = {
        i.name: numpy_helper.to_array(i) for i in graph.initializer if math.prod(i.dims) <= _SMALL
    }
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        value = node.attribute[0] if node.attribute else None
        if value is not None and value.name == "value" and math.prod(value.t.dims) <= _SMALL:
            found[node.output[0]] = numpy_helper.to_array(value.t)
    return found


def _ranks(graph: Any) -> dict[str, int]:
    """Rank of every initializer and small constant: what the row-wise checks need of weights."""
    ranks = {i.name: len(i.dims) for i in graph.initializer}
    ranks.update({name: value.ndim for name, value in _constants(graph).items()})
    return ranks


def _scalar(constants: dict[str, np.ndarray[Any, Any]], name: str) -> float | None:
    value = constants.get(name)
    if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.floating):
        return None
    scale = float(value.reshape(()))
    return scale if np.isfinite(scale) and scale != 0.0 else None


@dataclass(frozen=True, slots=True)
class _Scores:
    """How one Softmax's input becomes ``Div(MatMul(q, k), c)``."""

    softmax: Any
    scores: str  # the MatMul output to divide
    scale: float | None  # what it is multiplied by; None: already divided
    sdpa: tuple[Any, str, str] | None = None  # the MatMul and its unscaled q, k inputs


def _scores(softmax: Any, producer: dict[str, Any], users: Any, constants: Any) -> _Scores | None:
    """The plan for `softmax`, None when its input is no mask-less scaled ``MatMul``."""
    before = producer.get(softmax.input[0])
    if softmax.domain != "" or before is None or before.domain != "":
        return None
    if users[before.output[0]] != 1:
        return None
    if before.op_type in ("Mul", "Div"):  # eager: (q @ k) * s; older exports: (q @ k) / c
        matmul = producer.get(before.input[0])
        scale = _scalar(constants, before.input[1])
        if matmul is None or matmul.op_type != "MatMul" or scale is None:
            return None
        return _Scores(softmax, matmul.output[0], scale if before.op_type == "Mul" else None)
    if before.op_type != "MatMul":
        return None
    left, right = producer.get(before.input[0]), producer.get(before.input[1])  # SDPA
    if not (left and right and left.op_type == "Mul" and right.op_type == "Mul"):
        return None
    sl, sr = _scalar(constants, left.input[1]), _scalar(constants, right.input[1])
    if sl is None or sr is None or users[left.output[0]] != 1 or users[right.output[0]] != 1:
        return None
    return _Scores(softmax, before.output[0], sl * sr, (before, left.input[0], right.input[0]))


def divide_last_attention_scores(model: Any) -> bool:
    """Step 1 on `model` (an ``onnx.ModelProto``, changed in place): the last Softmax's input
    made ``Div(MatMul(q, k), c)``. False, leaving `model` unchanged, when some Softmax reads
    anything else than scaled scores (a masked attention: see the module docstring)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = _constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    users = collections.Counter(name for node in graph.node for name in node.input)
    plans = [_scores(n, producer, users, constants) for n in graph.node if n.op_type == "Softmax"]
    last = plans[-1] if plans and all(plans) else None
    if last is None:
        return False
    if last.scale is not None:
        if last.sdpa is not None:
            matmul, q, k = last.sdpa
            matmul.input[0], matmul.input[1] = q, k
        name = "veil_fusion_scale"
        graph.initializer.append(
            numpy_helper.from_array(np.array(1.0 / last.scale, np.float32), name)
        )
        divide = helper.make_node("Div", [last.scores, name], [f"{name}_out"], name=name)
        last.softmax.input[0] = divide.output[0]
        graph.node.insert(list(graph.node).index(last.softmax), divide)
    return True


def attention_heads(model: Any) -> tuple[int, int]:
    """(heads, hidden size) of the attention reshapes, (0, 0) when they do not agree.

    Exports reshape each projection to ``[batch, seq, heads, head_size]`` with a Concat whose
    heads entry is often -1: the hidden size then comes from the projection's weight.
    """
    graph = model.graph
    constants = _constants(graph)
    dims = {i.name: tuple(i.dims) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    seen: collections.Counter[tuple[int, int]] = collections.Counter()
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        shape = producer.get(node.input[1])
        if shape is None or shape.op_type != "Concat" or len(shape.input) != 4:
            continue
        heads_c, size_c = constants.get(shape.input[2]), constants.get(shape.input[3])
        if size_c is None or size_c.size != 1 or int(size_c.reshape(())) <= 0:
            continue
        head_size = int(size_c.reshape(()))
        heads = int(heads_c.reshape(())) if heads_c is not None and heads_c.size == 1 else -1
        if heads <= 0:
            add = producer.get(node.input[0])
            parents = [producer.get(i) for i in add.input] if add and add.op_type == "Add" else []
            matmul = next((p for p in parents if p is not None and p.op_type == "MatMul"), None)
            if matmul is None:
                continue
            weight = dims.get(matmul.input[1])
            if weight is None or len(weight) != 2 or weight[1] % head_size:
                continue
            heads = weight[1] // head_size
        seen[heads, heads * head_size] += 1
    return seen.most_common(1)[0][0] if len(seen) == 1 else (0, 0)


def _bert_fused(model: Any, heads: int, hidden: int) -> tuple[Any, dict[str, int]]:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.onnx_model_bert import BertOnnxModel

    # It logs and prints its progress; the child's output is not the place for it.
    logging.getLogger().setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        bert = BertOnnxModel(model, heads, hidden)
        # SDPA exports reshape the attention context to its own shape, which hides the pattern.
        # Finding it takes ONNX Runtime's symbolic shape inference, which needs sympy.
        with contextlib.suppress(ImportError):
            bert.utils.remove_useless_reshape_nodes()
        options = FusionOptions("bert")
        # Its shape inference copies the model several times (~1.3 GB more for DistilBERT):
        # past the child's address space. The fusions match without it.
        options.enable_shape_inference = False
        # Attention only: the other fused kernels cost as much as what they replace, or more
        # (SkipLayerNormalization), and ONNX Runtime's session finds what it wants of them.
        options.enable_skip_layer_norm = False
        options.enable_bias_skip_layer_norm = False
        options.enable_embed_layer_norm = False
        options.enable_gelu = False
        options.enable_bias_gelu = False
        bert.optimize(options, add_dynamic_axes=False)
        bert.topological_sort()
        stats = bert.get_fused_operator_statistics()
    return bert.model, {str(k): int(v) for k, v in stats.items() if v}


def _rowwise_ok(node: Any, ranks: dict[str, int]) -> bool:
    """Whether `node` treats each row of axis 1 alone (its constant operands span no axis 1)."""
    if (node.domain, node.op_type) not in _ROWWISE:
        return False
    if node.op_type == "MatMul":
        return ranks.get(node.input[1]) == 2 and node.input[0] not in ranks
    if node.op_type == "LayerNormalization":
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if axis != -1:
            return False
    # Constant operands (biases, scales, LayerNorm weights) must not vary along the token axis.
    return all(ranks[i] <= 1 for i in node.input if i in ranks)


def prune_query_rows(model: Any) -> int:
    """Step 3 on a fused `model` (changed in place); how many attention nodes now run one row."""
    from onnx import numpy_helper

    graph = model.graph
    constants = _constants(graph)
    ranks = _ranks(graph)
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    outputs = {o.name for o in graph.output}
    attention_inputs = {
        n.input[0] for n in graph.node if n.domain == _MS and n.op_type == "Attention"
    }
    for gather in [n for n in graph.node if n.op_type == "Gather" and n.domain == ""]:
        axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
        index = constants.get(gather.input[1])
        if axis != 1 or index is None or index.shape != () or int(index) != 0:
            continue
        # Walk back over per-token operators to the attention they start from; the walk stops
        # at the attention's output and at its input (the residual), nowhere else.
        region: dict[int, Any] = {}
        attentions: set[int] = set()
        found: Any = None
        stops: set[str] = set()
        pending, ok = [gather.input[0]], True
        while pending and ok:
            name = pending.pop()
            node = producer.get(name)
            if name in attention_inputs:
                stops.add(name)
            elif node is None:
                ok = False
            elif node.domain == _MS and node.op_type == "Attention":
                attentions.add(id(node))
                found = node
            elif id(node) not in region:
                ok = _rowwise_ok(node, ranks)
                region[id(node)] = node
                pending.extend(i for i in node.input if i and i not in ranks)
        if not ok or len(attentions) != 1 or stops - {found.input[0]}:
            continue
        source = found.input[0]
        # The region's tensors must stay private to it: its rows are about to disappear.
        private = all(
            out not in outputs and all(id(c) in region or c is gather for c in consumers[out])
            for node in region.values()
            for out in node.output
            if out
        )
        if not private or any(id(c) not in region for c in consumers[found.output[0]]):
            continue
        weights = {
            i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name in found.input
        }
        replacement = _one_row_attention(found, source, weights)
        if replacement is None:
            continue
        new_nodes, new_inits, row = replacement
        for node in region.values():
            for position, name in enumerate(node.input):
                if name == source:
                    node.input[position] = row
        at = list(graph.node).index(found)
        graph.node.remove(found)
        for offset, node in enumerate(new_nodes):
            graph.node.insert(at + offset, node)
        graph.initializer.extend(new_inits)
        for name in found.input[1:3]:  # the packed weights, now split, unless shared
            if len(consumers[name]) == 1 and name in {i.name for i in graph.initializer}:
                graph.initializer.remove(next(i for i in graph.initializer if i.name == name))
        # One classifier head per graph: a second one would need the maps rebuilt.
        return 1
    return 0


def _one_row_attention(
    attention: Any, source: str, constants: dict[str, np.ndarray[Any, Any]]
) -> tuple[list[Any], list[Any], str] | None:
    """The nodes that compute `attention` for row 0 of `source` only (None: not this shape)."""
    from onnx import helper, numpy_helper

    if {a.name for a in attention.attribute} - {"num_heads", "scale"}:
        return None
    if len(attention.input) < 3 or any(attention.input[3:]) or len(attention.output) != 1:
        return None
    weight, bias = constants.get(attention.input[1]), constants.get(attention.input[2])
    if weight is None or bias is None or weight.ndim != 2 or bias.ndim != 1:
        return None
    hidden = weight.shape[1] // 3
    if weight.shape[1] != 3 * hidden or bias.shape[0] != 3 * hidden:
        return None
    prefix = "veil_row_attention"
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), f"{prefix}_start"),
        numpy_helper.from_array(np.array([1], np.int64), f"{prefix}_end"),
        numpy_helper.from_array(np.array([1], np.int64), f"{prefix}_axis"),
    ]
    for part, label in enumerate("qkv"):
        block = np.ascontiguousarray(weight[:, part * hidden : (part + 1) * hidden])
        inits.append(numpy_helper.from_array(block, f"{prefix}_w{label}"))
    inits.append(numpy_helper.from_array(bias, f"{prefix}_bias"))
    row = f"{prefix}_row"
    nodes = [
        helper.make_node(
            "Slice",
            [source, f"{prefix}_start", f"{prefix}_end", f"{prefix}_axis"],
            [row],
            name=f"{prefix}_slice",
        ),
        helper.make_node("MatMul", [row, f"{prefix}_wq"], [f"{prefix}_q"], name=f"{prefix}_q"),
        helper.make_node("MatMul", [source, f"{prefix}_wk"], [f"{prefix}_k"], name=f"{prefix}_k"),
        helper.make_node("MatMul", [source, f"{prefix}_wv"], [f"{prefix}_v"], name=f"{prefix}_v"),
        helper.make_node(
            "MultiHeadAttention",
            [f"{prefix}_q", f"{prefix}_k", f"{prefix}_v", f"{prefix}_bias"],
            [attention.output[0]],
            name=prefix,
            domain=_MS,
        ),
    ]
    nodes[-1].attribute.extend(attention.attribute)
    return nodes, inits, row


def fuse_transformer(model: Any) -> tuple[Any | None, dict[str, int]]:
    """Steps 1-3 on `model` (an ``onnx.ModelProto``, changed in place).

    Returns the rewritten model and what was done (``Attention``: attention nodes fused,
    ``query_rows_pruned``), or None when there is nothing worth serving instead of `model`: no
    transformer, a masked attention, or a last layer whose every token is read (the fusion alone
    does not pay). `model` may then have been changed: serve the original bytes.
    """
    if not divide_last_attention_scores(model):
        return None, {}
    heads, hidden = attention_heads(model)
    model, fused = _bert_fused(model, heads, hidden)
    if fused.get("Attention") != 1:
        return None, {}
    report = {"Attention": 1, "query_rows_pruned": prune_query_rows(model)}
    if not report["query_rows_pruned"]:
        return None, {}
    declared = {opset.domain for opset in model.opset_import}
    if _MS not in declared:
        from onnx import helper

        model.opset_import.append(helper.make_opsetid(_MS, 1))
    return model, report
