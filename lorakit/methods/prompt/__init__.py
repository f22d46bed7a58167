"""Prompt methods in PEFT's format: prompt tuning, P-tuning, prefix tuning / P-tuning v2: `config` (light),
`encoders`, `prefix`, `generation`, `model`.

This package's __init__ imports nothing, so reading a config stays light (no torch)."""
