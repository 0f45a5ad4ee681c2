"""Training objectives: one file per objective, one line in OBJECTIVES."""

from mlx_lora.objectives.protocol import Objective
from mlx_lora.objectives.sft import SFT

OBJECTIVES: dict[str, Objective] = {"sft": SFT}
