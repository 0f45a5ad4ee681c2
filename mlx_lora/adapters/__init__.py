"""Adapter methods: one file per method, one line in METHODS."""

from mlx_lora.adapters.bottleneck import ADAPTER
from mlx_lora.adapters.dora import DORA
from mlx_lora.adapters.full import FULL
from mlx_lora.adapters.ia3 import IA3
from mlx_lora.adapters.lora import LORA
from mlx_lora.adapters.prefix import PREFIX
from mlx_lora.adapters.prompt import PROMPT
from mlx_lora.adapters.protocol import Method

METHODS: dict[str, Method] = {
    "lora": LORA, "dora": DORA, "full": FULL, "ia3": IA3, "adapter": ADAPTER,
    "prompt": PROMPT, "prefix": PREFIX,
}
