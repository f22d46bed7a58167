"""Ladder side-tuning (Sung, Cho & Bansal 2022): a slim side network reads the frozen backbone's activations
through ladders; the backbone runs forward only. `config` (light), `architectures`, `pruning`, `model`.

This package's __init__ imports nothing, so reading a config stays light (no torch)."""
