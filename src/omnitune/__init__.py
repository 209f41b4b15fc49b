"""omnitune: fine-tune, evaluate, serve and export Qwen3-Omni."""

__version__ = "0.1.0"
