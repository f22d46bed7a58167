"""LoraHub's defaults, the paper's code (sail-sg/lorahub): one source for `learn()` and the CLI. Light on
purpose (no torch), so `lorakit --help` can show them."""

from __future__ import annotations

__all__ = ["DEFAULTS", "STARTS"]

DEFAULTS = {"budget": 40, "lam": 0.05, "bounds": (-1.5, 1.5), "optimizer": "NGOpt", "n_examples": 5, "start": "zero"}
# where the search starts: the paper's all-zero weights, or the module that scores best alone (lorakit's addition)
STARTS = ("zero", "best-single")
