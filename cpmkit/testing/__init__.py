"""Builders of tiny MiniCPM checkpoints for tests and benchmarks (no downloads needed)."""

from cpmkit.testing.fixtures import (
    VARIANTS,
    Layout,
    Ternary,
    build_checkpoint,
    longrope_factors,
    random_weights,
)

__all__ = ["VARIANTS", "Layout", "Ternary", "build_checkpoint", "longrope_factors", "random_weights"]
