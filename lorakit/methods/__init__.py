"""Methods built on the core: SVD-init export (PiSSA/MiLoRA), PLoRA, LoraHub. Import nothing above them.

This package's __init__ imports nothing, so importing one module of it stays light."""
