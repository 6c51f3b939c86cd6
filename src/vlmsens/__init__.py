"""vlmsens: per-layer quantization sensitivity maps of Qwen vision-language models."""

__version__ = "0.1.0"
