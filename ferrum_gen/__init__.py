"""ferrum-gen: shape-specialised CUDA for the MoE layer of GGUF-quantized LLMs."""

__version__ = "0.1.0"
