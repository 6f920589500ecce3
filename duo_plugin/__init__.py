"""duo-plugin: uniform-state discrete diffusion language models (Duo) for the PyTorch LLM stack."""

__version__ = "0.1.0"
