"""The adapter library: config, errors, inits, layers, targeting, the model wrapper, the on-disk format.

This package's __init__ imports nothing, so importing one module of it stays light."""
