"""(IA)³: learned rescaling vectors (Liu et al. 2022), in PEFT's format: `config` (light), `layers`, `model`.

This package's __init__ imports nothing, so reading a config stays light (no torch)."""
