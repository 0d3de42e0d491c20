"""A generic supervised actor runtime on anyio (knows nothing about LoRA)."""
