"""``train.activation_checkpointing``: keep only each transformer block's input in the forward and
recompute the block in the backward (``blocks``), trading one more forward for the blocks'
activation memory.

torch's composable ``checkpoint`` is torch.utils.checkpoint's non-reentrant recomputation driven by
forward hooks on the block, so the model's code, its module tree and its parameter names (the keys of
the noise and of checkpoints) are unchanged; a wrapper module would prefix every name.  It composes
with FSDP2's ``fully_shard`` on the same blocks.

The tap is unaffected: a layer's weight-gradient records are made in its backward, which runs once;
the recomputation only re-runs the forwards that refill the saved tensors that backward reads, under
the autocast state and random state of the original forward.  Under ``torch.no_grad`` (validation)
nothing is saved, so nothing is recomputed.  Re-Attention's variance-carrying blocks run through
their own method, not the block's forward, and are not checkpointed.
"""
from __future__ import annotations

from torch import nn
from torch.distributed._composable import checkpoint

from ..model import TRANSFORMER_BLOCKS

MODES = ("none", "blocks")


def apply_activation_checkpointing(mode: str, model: nn.Module) -> int:
    """Checkpoint every transformer block of ``model`` for ``mode`` ``blocks``; how many were."""
    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "none":
        return 0
    blocks = [module for module in model.modules() if isinstance(module, TRANSFORMER_BLOCKS)]
    if not blocks:
        raise ValueError(f"train.activation_checkpointing=blocks found no transformer block in a "
                         f"{type(model).__name__}; its block class must be in dpdist.model.TRANSFORMER_BLOCKS")
    for block in blocks:
        checkpoint(block)
    return len(blocks)
