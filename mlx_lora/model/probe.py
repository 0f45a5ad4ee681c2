"""What a run needs to know about how a model computes, found once by running it."""

from dataclasses import dataclass

import mlx.nn as nn

from mlx_lora.model.head import Split, split_model
from mlx_lora.model.packed_mask import packing_problem


@dataclass(frozen=True)
class ModelProbe:
    """How the loss can call this model: its head in chunks, and packed rows."""

    split: Split | None  # backbone/head split, or None when the loss needs full logits
    split_problem: str | None  # why there is no split
    packing_problem: str | None  # why packed rows would change the loss; None when exact

    def loss_note(self) -> str | None:
        """The line a run says when the loss cannot go through the head in chunks."""
        if self.split is None:
            return f"the loss uses full logits (more memory): {self.split_problem}"
        return None


def probe_model(model: nn.Module, packing: bool = True) -> ModelProbe:
    """Probe the model (with its adapters in) once; packing=False skips the packing check."""
    split, split_problem = split_model(model)
    return ModelProbe(split, split_problem, packing_problem(model) if packing else None)
