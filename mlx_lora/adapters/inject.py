"""Choose target modules by name, regex or all-linear; swap in adapters; freeze the rest."""

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lora.adapters import METHODS
from mlx_lora.adapters.lora import linear_dims
from mlx_lora.adapters.protocol import Hyper, Method
from mlx_lora.errors import UserError

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)
QUANTIZED_TYPES = (nn.QuantizedLinear, nn.QuantizedEmbedding)


@dataclass(frozen=True)
class AdapterSpec:
    """Which modules carry which method's adapters, with what hyper-parameters."""

    method: str  # a key of METHODS
    paths: tuple[str, ...]  # full module paths, e.g. model.layers.3.self_attn.q_proj
    hyper: Hyper
    num_blocks: int  # transformer blocks in the model

    @property
    def table(self) -> Method:
        """The method's entry in METHODS."""
        return METHODS[self.method]

    def block_keys(self, model: nn.Module) -> tuple[list[str], int]:
        """mlx-lm's view: paths relative to a block (or top-level ones) and num_layers."""
        prefixes = block_prefixes(model)
        keys, first_block = set(), self.num_blocks
        for path in self.paths:
            index, rest = _split_block_path(path, prefixes)
            if index is None:
                keys.add(path)
            else:
                keys.add(rest)
                first_block = min(first_block, index)
        return sorted(keys), self.num_blocks - first_block


def block_prefixes(model: nn.Module) -> dict[str, int]:
    """Module path of each transformer block -> its index (mlx-lm models expose `layers`)."""
    blocks = {id(block): i for i, block in enumerate(model.layers)}
    return {path: blocks[id(m)] for path, m in model.named_modules() if id(m) in blocks}


def _split_block_path(path: str, prefixes: dict[str, int]) -> tuple[int | None, str]:
    for prefix, index in prefixes.items():
        if path.startswith(prefix + "."):
            return index, path[len(prefix) + 1:]
    return None, path


def adapted_blocks(model: nn.Module, paths) -> list[int]:
    """Indices of the blocks that hold at least one of these module paths."""
    prefixes = block_prefixes(model)
    indices = {_split_block_path(path, prefixes)[0] for path in paths}
    return sorted(i for i in indices if i is not None)


def find_targets(model: nn.Module, targets: str, num_layers: int) -> list[str]:
    """Paths of the linear layers that `targets` names, within the last `num_layers` blocks."""
    prefixes = block_prefixes(model)
    first_block = 0 if num_layers == -1 else max(len(prefixes) - num_layers, 0)
    linears = [path for path, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]

    def in_range(path: str) -> bool:
        index, _ = _split_block_path(path, prefixes)
        return index is None or index >= first_block

    if targets == "all-linear":
        # As PEFT's all-linear: every linear inside the blocks, never the output head.
        chosen = [p for p in linears if _split_block_path(p, prefixes)[0] is not None]
    elif targets.startswith("re:"):
        try:
            pattern = re.compile(targets[3:])
        except re.error as e:
            raise UserError(f"targets: bad regular expression {targets[3:]!r}: {e}") from None
        chosen = [p for p in linears if pattern.fullmatch(p)]
    else:
        names = [name.strip() for name in targets.split(",") if name.strip()]
        chosen = [p for p in linears if any(p == n or p.endswith("." + n) for n in names)]
    chosen = [p for p in chosen if in_range(p)]
    if not chosen:
        examples = sorted({p.rsplit(".", 1)[-1] for p in linears})
        raise UserError(
            f"targets '{targets}' matches no linear layer of this model "
            f"(its linear layers are named: {', '.join(examples)}); "
            "use names like q_proj,v_proj, 're:REGEX' on full paths, or all-linear"
        )
    return chosen


def inject(model: nn.Module, spec: AdapterSpec) -> None:
    """Replace each target with an adapter around it; freeze everything but the adapters."""
    modules = dict(model.named_modules())
    method, rank = spec.table, spec.hyper.rank
    swapped = []
    for path in spec.paths:
        base = modules[path]
        input_dims, output_dims = linear_dims(base)
        if rank > min(input_dims, output_dims):
            raise UserError(
                f"rank {rank} is larger than layer {path} ({input_dims} -> {output_dims}); "
                f"use --rank {min(input_dims, output_dims)} or less"
            )
        swapped.append((path, method.layer.from_base(base, spec.hyper)))
    model.freeze()
    model.update_modules(tree_unflatten(swapped))
    for _, adapter in swapped:
        adapter.unfreeze(keys=list(method.trainable), recurse=False)


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every adapter layer in the model, of any method."""
    layer_types = tuple(m.layer for m in METHODS.values())
    return [(p, m) for p, m in model.named_modules() if isinstance(m, layer_types)]


@contextmanager
def bypassed(model: nn.Module) -> Iterator[nn.Module]:
    """The model as its base: every adapter layer (of any method) swapped for the base layer it
    wraps, and swapped back on leaving. The base layers are the same objects, so nothing is
    copied or loaded twice."""
    layers = adapter_layers(model)
    model.update_modules(tree_unflatten([(path, layer.linear) for path, layer in layers]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(layers))


def make_spec(model: nn.Module, method: str, targets: str, num_layers: int,
              hyper: Hyper) -> AdapterSpec:
    """Resolve targets into an AdapterSpec for this model."""
    paths = find_targets(model, targets, num_layers)
    return AdapterSpec(method, tuple(paths), hyper, len(model.layers))


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; quantized weights count as their unpacked size."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = 0
    for _, m in model.named_modules():
        for name, v in m.parameters().items():
            if not hasattr(v, "size"):
                continue  # a child module's tree, counted at that module
            quantized = isinstance(m, QUANTIZED_TYPES)
            if quantized and name == "weight":
                total += v.size * 32 // m.bits
            elif not (quantized and name in ("scales", "biases")):
                total += v.size
    return trainable, total
