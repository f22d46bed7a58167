"""The training application: base models, data, evaluation, the trainer and YAML run recipes.

This package's __init__ imports nothing, so importing one module of it stays light."""
