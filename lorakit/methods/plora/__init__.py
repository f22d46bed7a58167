"""PeriodicLoRA (arXiv 2402.16141): periodic and momentum unloading, its export and diagnostics.

This package's __init__ imports nothing, so importing one module of it stays light."""
