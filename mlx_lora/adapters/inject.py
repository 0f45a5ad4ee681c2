"""Choose target modules by name, regex or all-linear; swap in adapters; freeze the rest."""

import dataclasses
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lora.adapters import METHODS
from mlx_lora.adapters.lora import linear_dims
from mlx_lora.adapters.pissa import init_pissa
from mlx_lora.adapters.protocol import Hyper, Method, wrapped
from mlx_lora.errors import UserError
from mlx_lora.model.prefix_cache import KEY, attach

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)
QUANTIZED_TYPES = (nn.QuantizedLinear, nn.QuantizedEmbedding)


@dataclass(frozen=True)
class AdapterSpec:
    """Which modules carry which method's adapters, with what hyper-parameters."""

    method: str  # a key of METHODS
    paths: tuple[str, ...]  # full module paths, e.g. model.layers.3.self_attn.q_proj
    hyper: Hyper | None  # None for a method that wraps nothing (full fine-tuning)
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
        if path == prefix or path.startswith(prefix + "."):  # a whole block, or inside one
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
        chosen = [p for p in linears if _named(p, names)]
    chosen = [p for p in chosen if in_range(p)]
    if not chosen:
        examples = sorted({p.rsplit(".", 1)[-1] for p in linears})
        raise UserError(
            f"targets '{targets}' matches no linear layer of this model "
            f"(its linear layers are named: {', '.join(examples)}); "
            "use names like q_proj,v_proj, 're:REGEX' on full paths, or all-linear"
        )
    return chosen


def _named(path: str, names) -> bool:
    """True where the module at `path` is one of `names` (a full path or a suffix after a dot)."""
    return any(path == n or path.endswith("." + n) for n in names)


def inject(model: nn.Module, spec: AdapterSpec) -> None:
    """Replace each target with an adapter around it; freeze everything but the adapters.

    A method that wraps nothing (full) unfreezes the targets' own weights instead.
    """
    modules = dict(model.named_modules())
    if spec.table.own_weights is not None:
        _unfreeze(model, [(path, modules[path]) for path in spec.paths], spec.method)
        return
    if spec.table.virtual is not None:  # nothing to wrap: one module at the model's top level
        attach(model, spec.table.virtual, spec.method, spec.hyper.virtual_tokens,
               spec.hyper.init_ids)
        return
    method, rank = spec.table, spec.hyper.rank
    swapped = []
    for path in spec.paths:
        base = modules[path]
        if method.low_rank:
            _check_rank(path, base, rank)
        adapter = method.layer.from_base(base, spec.hyper, path)
        if spec.hyper.init == "pissa":
            init_pissa(adapter)
        swapped.append((path, adapter))
    model.freeze()
    model.update_modules(tree_unflatten(swapped))
    for _, adapter in swapped:  # a new module's arrays start trainable; PiSSA's lora_a0 not
        adapter.freeze(recurse=False)
        adapter.unfreeze(keys=list(method.trainable), recurse=False)


def _check_rank(path: str, linear: nn.Module, rank: int) -> None:
    input_dims, output_dims = linear_dims(linear)
    if rank > min(input_dims, output_dims):
        raise UserError(f"rank {rank} is larger than layer {path} ({input_dims} -> "
                        f"{output_dims}); use --rank {min(input_dims, output_dims)} or less")


def _unfreeze(model: nn.Module, chosen: list[tuple[str, nn.Module]], method: str) -> None:
    """Freeze the model but the chosen modules; quantized weights cannot train in place."""
    for path, module in chosen:
        quantized = [p for p, m in module.named_modules() if isinstance(m, QUANTIZED_TYPES)]
        if quantized:
            where = f"{path}.{quantized[0]}" if quantized[0] else path
            raise UserError(f"{method} fine-tuning trains the base's own weights, but {where} "
                            "is quantized (integers take no gradient steps); use a float base "
                            "without --quantize, or lora/dora for QLoRA")
    model.freeze()
    for _, module in chosen:
        module.unfreeze()


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every adapter layer in the model, of any method."""
    layer_types = tuple(m.layer for m in METHODS.values() if m.layer is not None)
    return [(p, m) for p, m in model.named_modules() if isinstance(m, layer_types)]


@contextmanager
def bypassed(model: nn.Module) -> Iterator[nn.Module]:
    """The model as its base: every adapter layer (of any method) swapped for the base layer it
    wraps, and swapped back on leaving. The base layers are the same objects, so nothing is
    copied or loaded twice. Virtual tokens (prompt, prefix) are taken out meanwhile. Weights
    trained in place (full) have no base to go back to."""
    layers = adapter_layers(model)
    virtual = model.get(KEY)
    inside = tuple(path + "." for path, _ in layers) + ((KEY + ".",) if virtual else ())
    if any(not name.startswith(inside) for name, _ in
           tree_flatten(model.trainable_parameters())):
        raise UserError("the base's loss needs the base's weights, which a full fine-tune "
                        "overwrites in place (no copy is kept); measure the base by running "
                        "eval without --adapter-path")
    model.update_modules(tree_unflatten([(path, wrapped(layer)) for path, layer in layers]))
    if virtual is not None:
        del model[KEY]
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(layers))
        if virtual is not None:
            setattr(model, KEY, virtual)


def make_spec(model: nn.Module, method: str, targets: str, num_layers: int,
              hyper: Hyper, train_embeddings: bool = False) -> AdapterSpec:
    """Resolve targets into an AdapterSpec for this model (for full: the modules that train)."""
    own_weights = METHODS[method].own_weights
    if own_weights is not None:  # no layer to wrap, so no targets and no hyper-parameters
        paths = own_weights(model, num_layers, train_embeddings)
        return AdapterSpec(method, tuple(paths), None, len(model.layers))
    table = METHODS[method]
    if table.virtual is not None:  # no targets: one module at the model's top level
        return AdapterSpec(method, (KEY,), hyper, len(model.layers))
    if table.place is not None:  # blocks or sublayers, placed by the method itself
        paths, hyper = table.place(model, hyper, num_layers)
        return AdapterSpec(method, tuple(paths), hyper, len(model.layers))
    paths = find_targets(model, resolve_targets(model, method, targets), num_layers)
    if table.feedforward:
        names = _by_type(table.feedforward, model)
        hyper = dataclasses.replace(hyper, feedforward=tuple(p for p in paths if _named(p, names)))
    return AdapterSpec(method, tuple(paths), hyper, len(model.layers))


def resolve_targets(model: nn.Module, method: str, targets: str) -> str:
    """`targets`, or where it is empty the method's default for this model's type."""
    return targets or _by_type(METHODS[method].default_targets, model)


def _by_type(table: dict, model: nn.Module):
    """The entry of a table by mlx-lm model_type for this model, else its "*" entry."""
    return table.get(getattr(model, "model_type", None), table["*"])


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
