"""veil.export: torch.onnx.export plus an ONNX Runtime check, on tiny models (fast).

The checks that need no torch are in test_export_optional.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from veil.errors import ExportError

torch = pytest.importorskip("torch")


class Affine(torch.nn.Module):
    """y = x @ W + b, and a second output 2y."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.linear = torch.nn.Linear(4, 3)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.dropout(self.linear(x))
        return y, 2 * y


class TokenSum(torch.nn.Module):
    """Keyword inputs named like tokenizer outputs; returns a Transformers-style mapping."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.embed = torch.nn.Embedding(50, 6)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, object]:
        mask = attention_mask.unsqueeze(-1).float()
        return {"pooled": (self.embed(input_ids) * mask).sum(1), "unused": None}


class BatchDependent(torch.nn.Module):
    """Python control flow on the batch size: the trace freezes the batch-1 branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return x * 2
        return x * 3


pytestmark = pytest.mark.torch


def _dims(path: Path) -> dict[str, list[str | int]]:
    graph = onnx.load(str(path)).graph
    return {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in [*graph.input, *graph.output]
    }


def test_exports_validates_and_reports(tmp_path: Path) -> None:
    from veil.export import export_transformers_model

    model = Affine()
    x = torch.randn(2, 4)
    report = export_transformers_model(
        model, tmp_path / "affine.onnx", example_inputs={"x": x}, output_names=("y", "y2"), opset=13
    )
    assert report.path == tmp_path / "affine.onnx"
    assert report.size_bytes == report.path.stat().st_size > 0
    assert (report.input_names, report.output_names, report.opset) == (("x",), ("y", "y2"), 13)
    assert report.max_abs_diff is not None
    assert report.max_abs_diff <= 1e-6
    assert onnx.load(str(report.path)).opset_import[0].version == 13
    # Default axes: batch on everything; float inputs get no sequence axis.
    assert _dims(report.path) == {"x": ["batch", 4], "y": ["batch", 3], "y2": ["batch", 3]}
    session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    z = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    y, y2 = session.run(None, {"x": z})
    with torch.no_grad():
        want = model.eval().linear(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(y, want, atol=1e-6)
    np.testing.assert_allclose(y2, 2 * want, atol=1e-6)
    assert not list(tmp_path.glob("*.partial"))


def test_only_the_first_outputs_are_kept(tmp_path: Path) -> None:
    from veil.export import export_transformers_model

    report = export_transformers_model(
        Affine(), tmp_path / "a.onnx", example_inputs={"x": torch.randn(1, 4)}
    )
    assert report.output_names == ("output",)
    assert [o.name for o in onnx.load(str(report.path)).graph.output] == ["output"]


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_is_restored(tmp_path: Path, training: bool) -> None:
    from veil.export import export_transformers_model

    model = Affine().train(training)
    export_transformers_model(model, tmp_path / "a.onnx", example_inputs={"x": torch.randn(1, 4)})
    assert model.training is training
    assert model.dropout.training is training


def test_keyword_inputs_and_token_axes(tmp_path: Path) -> None:
    from veil.export import export_transformers_model

    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    # Given in the opposite order to forward's parameters: matched by name, not position.
    report = export_transformers_model(
        TokenSum(), tmp_path / "t.onnx", example_inputs={"attention_mask": mask, "input_ids": ids}
    )
    dims = _dims(report.path)
    assert dims["input_ids"] == dims["attention_mask"] == ["batch", "sequence"]
    assert dims["output"] == ["batch", 6]
    session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    ids3 = np.array([[9, 8, 7, 6, 5, 4, 3]] * 3, dtype=np.int64)
    mask3 = np.ones_like(ids3)
    (got,) = session.run(None, {"input_ids": ids3, "attention_mask": mask3})
    with torch.no_grad():
        want = TokenSum().embed(torch.from_numpy(ids3)).sum(1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_positional_when_forward_lacks_the_names(tmp_path: Path) -> None:
    from veil.export import export_transformers_model

    # Affine.forward takes `x`; the graph input is called `input`, as in the tutorial.
    report = export_transformers_model(
        Affine(), tmp_path / "a.onnx", example_inputs={"input": torch.randn(1, 4)}
    )
    assert report.input_names == ("input",)


def test_validation_catches_a_wrong_trace_and_writes_nothing(tmp_path: Path) -> None:
    from veil.export import export_transformers_model

    target = tmp_path / "b.onnx"
    with pytest.raises(ExportError, match=r"differ by 1(\.0+)?, expected at most 0\.0001"):
        export_transformers_model(BatchDependent(), target, example_inputs={"x": torch.ones(1, 3)})
    assert not target.exists()
    assert not list(tmp_path.iterdir())


def test_validation_can_be_skipped(tmp_path: Path) -> None:
    from veil.export import export_transformers_model

    report = export_transformers_model(
        BatchDependent(),
        tmp_path / "b.onnx",
        example_inputs={"x": torch.ones(1, 3)},
        validate=False,
    )
    assert report.max_abs_diff is None
    assert report.path.is_file()


def test_fixed_axes_skip_the_doubled_batch_check(tmp_path: Path) -> None:
    from veil.export import export_transformers_model

    report = export_transformers_model(
        BatchDependent(),
        tmp_path / "b.onnx",
        example_inputs={"x": torch.ones(1, 3)},
        dynamic_axes={},
    )
    assert report.max_abs_diff == 0.0
    assert _dims(report.path) == {"x": [1, 3], "output": [1, 3]}


def test_too_few_model_outputs(tmp_path: Path) -> None:
    from veil.export import export_transformers_model

    with pytest.raises(ExportError, match=r"model returns 1 output\(s\), but 2 output_names"):
        export_transformers_model(
            BatchDependent(),
            tmp_path / "b.onnx",
            example_inputs={"x": torch.ones(1, 3)},
            output_names=("a", "b"),
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"example_inputs": {}},
            ValueError,
            "example_inputs: got dict, expected a non-empty mapping",
        ),
        (
            {"example_inputs": {"x": [1.0]}},
            TypeError,
            r"example_inputs\['x'\]: got list, expected torch.Tensor",
        ),
        ({"output_names": "out"}, ValueError, "output_names: got 'out'"),
        ({"output_names": ("a", "a")}, ValueError, "expected distinct names"),
        ({"output_names": ("x",)}, ValueError, r"\['x'\] are also input names"),
        ({"opset": 6}, ValueError, "opset: got 6, expected an int from 7 to 20"),
        ({"opset": 21}, ValueError, "opset: got 21"),
        ({"atol": 0.0}, ValueError, "atol: got 0.0, expected a finite number > 0"),
        ({"atol": float("nan")}, ValueError, "atol: got nan"),
        (
            {"dynamic_axes": {"y": {0: "b"}}},
            ValueError,
            r"dynamic_axes: \['y'\] name no input or output",
        ),
    ],
)
def test_bad_arguments(
    tmp_path: Path, kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    from veil.export import export_transformers_model

    arguments: dict[str, object] = {"example_inputs": {"x": torch.ones(1, 4)}, **kwargs}
    with pytest.raises(error, match=message):
        export_transformers_model(Affine(), tmp_path / "a.onnx", **arguments)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_tokenizer_from_the_bundled_folder() -> None:
    from veil.export import DEMO_SENTENCE, DEMO_TOKEN_IDS, load_tokenizer, minilm_model_dir

    assert (minilm_model_dir() / "vocab.txt").is_file()
    tokenizer = load_tokenizer()
    ids = tokenizer(DEMO_SENTENCE, padding="max_length", max_length=8)["input_ids"]
    assert tuple(ids) == DEMO_TOKEN_IDS == (101, 1045, 2293, 9932, 1998, 9394, 999, 102)


def test_demo_distilbert_is_seeded_eager_and_exports_at_opset_11(tmp_path: Path) -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from veil.export import build_demo_distilbert, export_transformers_model

    a, b, c = (
        build_demo_distilbert(seed=0),
        build_demo_distilbert(seed=0),
        build_demo_distilbert(seed=1),
    )
    assert a.config._attn_implementation == "eager"
    assert a.config.num_labels == 2
    assert not a.training
    w = "distilbert.embeddings.word_embeddings.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])
    # The same architecture, shrunk, so that the opset-11 export stays fast here.
    torch.manual_seed(0)
    config = DistilBertConfig(
        num_labels=2, n_layers=1, dim=32, hidden_dim=64, n_heads=2, attn_implementation="eager"
    )
    small = DistilBertForSequenceClassification(config).eval()
    ids = torch.tensor([[101, 1045, 2293, 9932, 1998, 9394, 999, 102]])
    report = export_transformers_model(
        small, tmp_path / "d.onnx", example_inputs={"input": ids}, opset=11
    )
    assert report.max_abs_diff is not None
    assert report.max_abs_diff <= 1e-5
    assert onnx.load(str(report.path)).opset_import[0].version == 11


def test_sdpa_attention_below_opset_14_says_what_to_do(tmp_path: Path) -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from veil.export import export_transformers_model

    torch.manual_seed(0)
    config = DistilBertConfig(
        num_labels=2, n_layers=1, dim=32, hidden_dim=64, n_heads=2, attn_implementation="sdpa"
    )
    model = DistilBertForSequenceClassification(config).eval()
    ids = torch.tensor([[101, 1045, 102]])
    with pytest.raises(ExportError, match='attn_implementation="eager"'):
        export_transformers_model(
            model, tmp_path / "d.onnx", example_inputs={"input": ids}, opset=11
        )


# --- veil export (in process) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny local checkpoints: a DistilBERT classifier and a BERT encoder (no tokenizer files)."""
    from transformers import (
        BertConfig,
        BertModel,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        DistilBertModel,
    )

    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(5)
    small = {"n_layers": 1, "dim": 32, "hidden_dim": 64, "n_heads": 2}
    DistilBertForSequenceClassification(DistilBertConfig(num_labels=3, **small)).save_pretrained(
        root / "classifier"
    )
    bert = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertModel(bert).save_pretrained(root / "encoder")
    DistilBertModel(DistilBertConfig(**small)).save_pretrained(root / "distil-encoder")
    return {name: root / name for name in ("classifier", "encoder", "distil-encoder")}


def _graph(path: Path) -> tuple[dict[str, list[str | int]], list[str]]:
    graph = onnx.load(str(path)).graph
    outputs = [o.name for o in graph.output]
    return _dims(path), outputs


def test_cli_exports_a_classifier_checkpoint(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from veil.cli import main

    out = tmp_path / "classifier.onnx"
    assert (
        main(["export", "--model-dir", str(checkpoints["classifier"]), str(out), "--opset", "11"])
        == 0
    )
    dims, outputs = _graph(out)
    assert dims == {"input": ["batch", "sequence"], "output": ["batch", 3]}
    assert outputs == ["output"]
    printed = capsys.readouterr().out
    assert re.search(
        r"opset 11, inputs input, outputs output; .*max \|ONNX Runtime - PyTorch\| = ", printed
    )


def test_cli_exports_an_encoder_checkpoint(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from veil.cli import main

    out = tmp_path / "encoder.onnx"
    assert main(["export", "--model-dir", str(checkpoints["encoder"]), str(out)]) == 0
    dims, outputs = _graph(out)
    assert outputs == ["embedding"]
    assert dims["embedding"][0] == "batch"
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ids = np.array([[101, 2000, 3000, 102, 0]] * 3, dtype=np.int64)
    feeds = {
        "input_ids": ids,
        "token_type_ids": np.zeros_like(ids),
        "attention_mask": np.ones_like(ids),
    }
    (embedding,) = session.run(None, feeds)
    assert embedding.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
    assert {k: v for k, v in dims.items() if k != "embedding"} == {
        "input_ids": ["batch", "sequence"],
        "token_type_ids": ["batch", "sequence"],
        "attention_mask": ["batch", "sequence"],
    }


def test_cli_exports_an_encoder_without_token_types(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from veil.cli import main

    out = tmp_path / "distil.onnx"
    assert main(["export", "--model-dir", str(checkpoints["distil-encoder"]), str(out)]) == 0
    dims, outputs = _graph(out)
    assert sorted(dims) == ["attention_mask", "embedding", "input_ids"]
    assert outputs == ["embedding"]


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["export", "out.onnx"], 2, "give either MODEL or --model-dir"),
        (
            ["export", "minilm", "out.onnx", "--model-dir", "."],
            2,
            "give either MODEL or --model-dir",
        ),
        (
            ["export", "--model-dir", ".", "out.onnx"],
            1,
            "no config.json, not a Transformers checkpoint",
        ),
        (["export", "minilm", "out.onnx", "--opset", "5"], 1, "opset: got 5"),
    ],
)
def test_cli_export_errors(
    argv: list[str],
    status: int,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from veil.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == status
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_cli_exports_the_demo_distilbert(tmp_path: Path) -> None:
    from veil.cli import main
    from veil.export import DEMO_TOKEN_IDS, build_demo_distilbert

    out = tmp_path / "distilbert.onnx"
    assert main(["export", "distilbert-demo", str(out), "--opset", "11"]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ids = np.array([DEMO_TOKEN_IDS] * 2, dtype=np.int64)
    (got,) = session.run(None, {"input": ids})
    with torch.no_grad():
        want = build_demo_distilbert(seed=0)(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
