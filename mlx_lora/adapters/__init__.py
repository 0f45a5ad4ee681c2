"""Adapter methods: one file per method, one line in METHODS."""

from mlx_lora.adapters.dora import DORA
from mlx_lora.adapters.lora import LORA
from mlx_lora.adapters.protocol import Method

METHODS: dict[str, Method] = {"lora": LORA, "dora": DORA}
