"""What produces the virtual tokens of one prompt adapter. Each encoder maps nothing to a table
(total virtual tokens, width): prompt tuning's table is its parameter; P-tuning's is an MLP/LSTM's
output; prefix tuning's holds every layer's keys and values. `fold` gives the table PEFT saves, and
`PromptTable` is what a saved adapter loads into. Attribute names follow PEFT's (``embedding``,
``mlp_head``, ``lstm_head``, ``transform``), so state dicts read alike.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import PrefixTuningConfig, PromptEncoderConfig

__all__ = ["PrefixEncoder", "PromptEncoder", "PromptTable"]


class PromptTable(nn.Module):
    """A table of virtual tokens trained directly (prompt tuning; also any method's saved, folded form).

    Args:
        rows: virtual tokens (for prefixes: prefix positions).
        width: their width (``token_dim``, or ``num_layers * 2 * token_dim`` for prefixes).
    """

    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, width)  # normal(0, 1), as PEFT's random init

    def forward(self) -> Tensor:
        """The table, (rows, width)."""
        return self.embedding.weight


class PromptEncoder(nn.Module):
    """P-tuning's prompt encoder (Liu et al. 2021, Sec. 3.2): trainable inputs through an MLP, or a
    bidirectional LSTM and an MLP, give the virtual tokens.

    Args:
        config: a resolved `PromptEncoderConfig` (``token_dim`` and ``encoder_hidden_size`` set).
    """

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Embedding(config.total_virtual_tokens, dim)
        self.kind = config.encoder_reparameterization_type
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self) -> Tensor:
        """The virtual tokens, (total virtual tokens, token_dim)."""
        inputs = self.embedding.weight.unsqueeze(0)  # (1, tokens, dim)
        if self.kind == "LSTM":
            inputs = self.lstm_head(inputs)[0]  # (1, tokens, 2 * hidden)
        return self.mlp_head(inputs)[0]


class PrefixEncoder(nn.Module):
    """Prefix tuning's keys and values for every layer, (num_virtual_tokens, num_layers * 2 * token_dim); with
    ``prefix_projection`` an MLP's output (Li & Liang 2021, Sec. 4.3), else trained directly.

    Args:
        config: a resolved `PrefixTuningConfig`.
    """

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        width = config.num_layers * 2 * config.token_dim
        self.projected = config.prefix_projection
        if self.projected:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size), nn.Tanh(), nn.Linear(config.encoder_hidden_size, width)
            )
            last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            last = self.embedding
        if config.init_weights == "zero":
            nn.init.zeros_(last.weight)
            if getattr(last, "bias", None) is not None:
                nn.init.zeros_(last.bias)

    def forward(self) -> Tensor:
        """The prefix, (num_virtual_tokens, num_layers * 2 * token_dim)."""
        if self.projected:
            return self.transform(self.embedding.weight)
        return self.embedding.weight


def fold(encoder: nn.Module) -> Tensor:
    """The table PEFT saves as ``prompt_embeddings``: the encoder's output, detached.

    Args:
        encoder: a `PromptTable`, `PromptEncoder` or `PrefixEncoder`.

    Returns:
        (rows, width), on the encoder's device.
    """
    with torch.no_grad():
        return encoder().detach()
