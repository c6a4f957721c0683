"""`veil export`: a Transformers model to a validated ONNX file that `veil serve` accepts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from veil.errors import VeilError

__all__ = ["register"]

_RECIPES = ("distilbert-demo", "minilm")


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "export",
        help="export a Transformers model to ONNX (needs veil[transformers])",
        description=(
            "Export a model to one ONNX file with torch.onnx.export, then check that ONNX Runtime "
            "and PyTorch agree on example inputs. MODEL is 'distilbert-demo' (the tutorial's "
            "DistilBERT classifier with seeded random weights: input 'input', output 'output') "
            "or 'minilm' (the bundled all-MiniLM-L6-v2 sentence encoder: inputs input_ids, "
            "attention_mask, token_type_ids; output 'embedding', mean-pooled and L2-normalised). "
            "With --model-dir, a local checkpoint: a *ForSequenceClassification checkpoint is "
            "exported like distilbert-demo, any other like minilm."
        ),
    )
    parser.add_argument("model", nargs="?", choices=_RECIPES, help="built-in model to export")
    parser.add_argument("output", type=Path, help="the .onnx file to write")
    parser.add_argument("--model-dir", type=Path, help="local Transformers checkpoint to export")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed for distilbert-demo")
    parser.add_argument(
        "--atol", type=float, default=1e-4, help="largest ONNX Runtime vs PyTorch difference"
    )
    parser.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime check")
    parser.set_defaults(handler=_export)


def _is_classifier(model_dir: Path) -> bool:
    import json

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    return any(str(a).endswith("ForSequenceClassification") for a in architectures)


def _build(args: argparse.Namespace) -> tuple[Any, dict[str, Any], tuple[str, ...], str]:
    """(model, example inputs, output names, description)."""
    from veil import export

    if args.model_dir is not None:
        if not (args.model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{args.model_dir}: no config.json, not a Transformers checkpoint"
            )
        has_tokenizer = (args.model_dir / "tokenizer_config.json").is_file()
        tokenizer = export.load_tokenizer(args.model_dir if has_tokenizer else None)
        if _is_classifier(args.model_dir):
            model = export.load_classifier(args.model_dir)
            ids = tokenizer(
                export.DEMO_SENTENCE, padding="max_length", max_length=8, return_tensors="pt"
            )["input_ids"]
            return model, {"input": ids}, ("output",), f"classifier {args.model_dir}"
        pooled: Any = export.sentence_embedding_module(args.model_dir)
        inputs = _sentence_inputs(tokenizer, pooled.input_names)
        return pooled, inputs, ("embedding",), f"encoder {args.model_dir}"
    tokenizer = export.load_tokenizer()
    if args.model == "distilbert-demo":
        ids = tokenizer(
            export.DEMO_SENTENCE, padding="max_length", max_length=8, return_tensors="pt"
        )["input_ids"]
        model = export.build_demo_distilbert(seed=args.seed)
        return model, {"input": ids}, ("output",), "DistilBERT (demo weights)"
    encoder: Any = export.sentence_embedding_module()
    inputs = _sentence_inputs(tokenizer, encoder.input_names)
    return encoder, inputs, ("embedding",), "all-MiniLM-L6-v2"


def _sentence_inputs(tokenizer: Any, names: tuple[str, ...]) -> dict[str, Any]:
    # Realistic examples to trace and check with: two sentences of different lengths (one padded).
    sentences = ["I love AI and privacy!", "Confidential inference keeps my words to myself."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    return {name: batch[name] for name in names}


def _export(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.model_dir is None):
        print("veil export: give either MODEL or --model-dir", file=sys.stderr)
        return 2
    try:
        from veil import export

        export.require_transformers()
        model, inputs, outputs, what = _build(args)
        print(f"veil export: exporting {what} ...", file=sys.stderr, flush=True)
        report = export.export_transformers_model(
            model,
            args.output,
            example_inputs=inputs,
            output_names=outputs,
            opset=export.DEFAULT_OPSET if args.opset is None else args.opset,
            validate=not args.no_validate,
            atol=args.atol,
        )
    except ImportError as exc:
        print(f"veil export: {exc}", file=sys.stderr)
        return 3
    except (VeilError, ValueError, TypeError, OSError) as exc:
        print(f"veil export: {exc}", file=sys.stderr)
        return 1
    check = (
        "not validated"
        if report.max_abs_diff is None
        else f"max |ONNX Runtime - PyTorch| = {report.max_abs_diff:.3g} (atol {report.atol:g})"
    )
    print(
        f"{report.path}: {report.size_bytes / 2**20:.1f} MiB, opset {report.opset}, "
        f"inputs {', '.join(report.input_names)}, outputs {', '.join(report.output_names)}; "
        f"exported in {report.export_seconds:.1f} s; {check}"
    )
    return 0
