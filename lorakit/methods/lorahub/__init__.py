"""LoraHub (arXiv 2307.13269): compose trained LoRA modules for an unseen task, weights found gradient-free.

This package's __init__ imports nothing, so importing one module of it stays light."""
