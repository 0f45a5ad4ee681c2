"""Training objectives: one file per objective, one line in OBJECTIVES.

Each entry makes the run's Objective from its config (DPO's beta, ORPO's weight, ...).
"""

from collections.abc import Callable

from mlx_lora.config import TrainConfig
from mlx_lora.objectives.preference import preference_objective
from mlx_lora.objectives.protocol import Objective
from mlx_lora.objectives.sft import SFT

OBJECTIVES: dict[str, Callable[[TrainConfig], Objective]] = {
    "sft": lambda config: SFT,
    "dpo": preference_objective,
    "orpo": preference_objective,
}
