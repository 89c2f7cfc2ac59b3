"""Function-preserving widening of a trained model (Net2Net-style, with zero fan-out for the new units).

A model of hidden size H is copied into a freshly initialised model of hidden size H' > H. Every trained unit keeps
its weights; each new unit keeps its random incoming weights and bias, and every weight that *reads* a new unit
(the recurrent weights of the trained units, the next layer's input weights, the output layers) starts at zero. The
wider model therefore computes exactly what the narrow one did, and training grows the new units from there: the
gradient of a zero weight is the new unit's activation times the error, not zero.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
from torch import Tensor

from asr.model import CTCModel

_RNN_PARAMETER = re.compile(r"^(layers|char_branch)\.(\d+)\.(forward|backward)_rnn\.(weight_ih|weight_hh|bias_ih|bias_hh)_l0$")
_OUTPUT_WEIGHT = re.compile(r"^(output|phone_output|char_branch_output)\.weight$")


def _gate_rows(old: int, new: int, gates: int) -> Tensor:
    """Where the ``old`` units of each of ``gates`` stacked gate blocks sit among ``new`` units a block."""
    return torch.cat([torch.arange(old) + gate * new for gate in range(gates)])


def _pair_columns(old: int, new: int) -> Tensor:
    """Where the features of a bidirectional layer of width 2 * ``old`` sit in one of width 2 * ``new``."""
    return torch.cat([torch.arange(old), torch.arange(old) + new])


def widen_model(narrow: CTCModel, wide: CTCModel) -> None:
    """Copy ``narrow`` into ``wide`` (in place) so that ``wide`` computes the same outputs.

    ``wide`` must have the configuration of ``narrow`` with a larger ``hidden_size``; its own (random) initial values
    are kept for the new units' incoming weights and biases.
    """
    old, new = narrow.config.hidden_size, wide.config.hidden_size
    if new <= old or replace(wide.config, hidden_size=old) != narrow.config:
        raise ValueError(f"can only widen a model to a larger hidden size with everything else equal (hidden size {old} -> {new})")
    gates = 4 if narrow.config.cell == "lstm" else 3
    rows, pairs, hidden = _gate_rows(old, new, gates), _pair_columns(old, new), torch.arange(old)
    source = narrow.state_dict()
    with torch.no_grad():
        for name, target in wide.state_dict().items():
            weights = source[name]
            rnn, output = _RNN_PARAMETER.match(name), _OUTPUT_WEIGHT.match(name)
            if rnn:
                group, index, _, kind = rnn.groups()
                if kind.startswith("bias"):
                    target[rows] = weights
                    continue
                if kind == "weight_hh":
                    columns = hidden
                elif group == "layers" and index == "0":
                    columns = torch.arange(weights.shape[1])  # the stacked log-mel features: not widened
                else:
                    columns = pairs
                target[rows] = 0  # trained units read nothing from new ones
                target[rows.unsqueeze(1), columns.unsqueeze(0)] = weights
            elif output:
                target.zero_()
                target[:, pairs] = weights
            else:  # output biases, feature normalisation
                target.copy_(weights)
