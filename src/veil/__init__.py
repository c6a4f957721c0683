"""veil: confidential inference for ONNX and Transformers models."""

__version__ = "0.1.0"
