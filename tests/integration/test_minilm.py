"""all-MiniLM-L6-v2 served by veil: the embeddings equal the ones Transformers computes here."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import veil  # noqa: E402
from veil.export import (  # noqa: E402
    export_transformers_model,
    load_tokenizer,
    minilm_model_dir,
    sentence_embedding_module,
)
from veil.testing.local_server import LocalServer  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]

SENTENCES = [
    "I love AI and privacy!",
    "Confidential computing protects data while it is being processed.",
    "The cat sat on the mat.",
    "Trusted execution environments isolate code and data from the host operating system.",
]


@pytest.fixture(scope="module")
def minilm_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = load_tokenizer()
    example = dict(tokenizer(SENTENCES[:2], padding=True, return_tensors="pt"))
    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    report = export_transformers_model(
        sentence_embedding_module(), path, example_inputs=example, output_names=("embedding",)
    )
    assert report.max_abs_diff is not None
    assert report.max_abs_diff <= 1e-4
    return path


@pytest.fixture(scope="module")
def client(minilm_onnx: Path) -> Iterator[veil.Connection]:
    with LocalServer() as server, veil.connect(server.host, simulation=True, **server.ports) as c:
        c.upload_model(minilm_onnx, model_id="minilm")
        yield c


def _reference(sentences: list[str]) -> np.ndarray[Any, Any]:
    """Transformers in this process, with its default attention, pooled here in numpy."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_model_dir()))
    model = transformers.AutoModel.from_pretrained(str(minilm_model_dir())).eval()
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state.numpy().astype(np.float64)
    mask = batch["attention_mask"].numpy()[..., None].astype(np.float64)
    mean = (tokens * mask).sum(axis=1) / mask.sum(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def test_graph_has_the_three_token_inputs_with_free_axes(minilm_onnx: Path) -> None:
    graph = onnx.load(str(minilm_onnx), load_external_data=False).graph
    inputs = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in graph.input
    }
    assert inputs == {
        "input_ids": ["batch", "sequence"],
        "attention_mask": ["batch", "sequence"],
        "token_type_ids": ["batch", "sequence"],
    }
    assert [o.name for o in graph.output] == ["embedding"]


def test_served_embeddings_equal_transformers(client: veil.Connection) -> None:
    tokenizer = load_tokenizer()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    response = client.predict("minilm", dict(batch))
    got = response.output[0].as_numpy()
    assert got.shape == (len(SENTENCES), 384)
    assert got.dtype == np.float32
    want = _reference(SENTENCES)
    assert float(np.max(np.abs(got - want))) <= 1e-4
    # Different sentences, different embeddings (the check above could not pass on zeros).
    assert float(np.max(np.abs(got[0] - got[2]))) > 0.05


def test_padding_does_not_change_an_embedding(client: veil.Connection) -> None:
    tokenizer = load_tokenizer()
    padded = client.predict("minilm", dict(tokenizer(SENTENCES, padding=True, return_tensors="np")))
    alone = client.predict("minilm", dict(tokenizer(SENTENCES[2:3], return_tensors="np")))
    np.testing.assert_allclose(
        alone.output[0].as_numpy()[0], padded.output[0].as_numpy()[2], atol=1e-5
    )


def test_matches_sentence_transformers(client: veil.Connection) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    with warnings.catch_warnings():
        # third-party deprecation notices are not what this test checks
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        model = sentence_transformers.SentenceTransformer(str(minilm_model_dir()), device="cpu")
        want = model.encode(SENTENCES, convert_to_numpy=True)
    tokenizer = load_tokenizer()
    got = client.predict("minilm", dict(tokenizer(SENTENCES, padding=True, return_tensors="np")))
    assert float(np.max(np.abs(got.output[0].as_numpy() - want))) <= 1e-4
