"""One base in memory and any number of adapters over it; switching is a swap of module pointers.

Virtual tokens (prompt and prefix tuning) have no layer to swap: each such adapter's keys and
values are computed once, on the base, and every request for it starts from a prompt cache
that already holds them (model/prefix_cache.py).
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lora.adapters.inject import adapter_layers
from mlx_lora.adapters.protocol import wrapped
from mlx_lora.config import DEFAULTS
from mlx_lora.errors import UserError
from mlx_lora.formats.convert import adapter_format
from mlx_lora.formats.run_config import trained_quantization
from mlx_lora.model.adapted import adapt_for_inference
from mlx_lora.model.load import LoadedModel, load_base
from mlx_lora.model.prefix_cache import KEY, filled_cache

BASE_ALIAS = "base"  # a model name that always means the base alone
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*")


@dataclass
class AdapterSet:
    """A loaded base, each adapter's own layers around the base's shared linears, and which
    adapter is in the model now (None: the base)."""

    loaded: LoadedModel
    base_name: str  # the --model string, listed by /v1/models
    layers: dict[str, list[tuple[str, nn.Module]]]  # adapter name -> (module path, layer)
    # adapter name -> each layer's keys and values of its virtual tokens (prompt, prefix)
    prefixes: dict[str, list[tuple[mx.array, mx.array]]] = field(default_factory=dict)
    active: str | None = None
    switches: int = 0
    # name -> (its layers, the base layers they wrap) as update_modules trees, built once:
    # building a tree costs several times more than the swap itself.
    trees: dict[str, tuple[dict, dict]] = field(init=False)

    def __post_init__(self):
        self.trees = {name: (tree_unflatten(layers),
                             tree_unflatten([(p, wrapped(layer)) for p, layer in layers]))
                      for name, layers in self.layers.items() if layers}

    def adapter_for(self, model_name: str) -> str | None:
        """The adapter a request's "model" names (None: the base); KeyError if none."""
        if model_name in (self.base_name, BASE_ALIAS):
            return None
        if model_name in self.layers:
            return model_name
        raise KeyError(model_name)

    def model_names(self) -> list[str]:
        """The names /v1/models lists: the base first, then each adapter."""
        return [self.base_name, *self.layers]


def parse_adapter_args(values: tuple[str, ...] | list[str]) -> dict[str, str]:
    """NAME=DIR pairs (the --adapter flags) as {name: dir}, names checked and unique."""
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not directory:
            raise UserError(f"--adapter {value!r}: expected NAME=DIR, e.g. --adapter sql=adapters")
        if not NAME.fullmatch(name) or name == BASE_ALIAS:
            raise UserError(f"--adapter {value!r}: '{name}' cannot be a model name; use letters, "
                            f"digits and ._:/@+- (and not '{BASE_ALIAS}', which means the base)")
        if name in adapters:
            raise UserError(f"--adapter {value!r}: the name '{name}' is given twice")
        adapters[name] = directory
    return adapters


def load_adapter_set(model: str, adapters: dict[str, str],
                     trust_remote_code: bool = False) -> AdapterSet:
    """Load the base once and every adapter onto it; an adapter that does not fit is an error."""
    if model in adapters:
        raise UserError(f"--adapter {model}=...: the name is the base model's; pick another")
    quantization = _shared_quantization(adapters)
    bits, group_size = quantization or (0, DEFAULTS.group_size)
    loaded = load_base(model, quantize=bits, group_size=group_size,
                       trust_remote_code=trust_remote_code)
    loaded.model.eval()
    layers, prefixes = {}, {}
    for name, directory in adapters.items():
        layers[name] = _load_layers(loaded, name, directory)
        if (prefix := _take_prefix(loaded.model)) is not None:
            prefixes[name] = prefix
    return AdapterSet(loaded, model, layers, prefixes)


def _load_layers(loaded: LoadedModel, name: str, directory: str) -> list[tuple[str, nn.Module]]:
    """Inject one adapter (any format, checked against the base), keep its layers, and put
    the base's own modules back."""
    try:
        adapt_for_inference(loaded, directory)  # eval mode: no dropout in these layers
    except UserError as e:
        raise UserError(f"adapter '{name}': {e}") from None
    # Computed here and now: a lazy tensor (a PEFT transpose, DoRA's norms) would otherwise be
    # evaluated by the worker thread, which has no stream of this thread to run it on.
    mx.eval(loaded.model.parameters())
    layers = adapter_layers(loaded.model)
    inside = tuple(path + "." for path, _ in layers) + (KEY + ".",)  # virtual: _take_prefix
    in_place = [key for key, _ in tree_flatten(loaded.model.trainable_parameters())
                if not key.startswith(inside)]
    if in_place:  # e.g. a full fine-tune: it overwrote the base every other name shares
        raise UserError(f"adapter '{name}': {directory} replaces the base's own weights "
                        f"({in_place[0]} and {len(in_place) - 1} more), so it cannot share "
                        "the base with other adapters; fuse it and serve the result alone")
    if layers:
        loaded.model.update_modules(tree_unflatten([(p, wrapped(layer)) for p, layer in layers]))
    return layers


def _take_prefix(model: nn.Module) -> list[tuple[mx.array, mx.array]] | None:
    """The keys and values of the virtual tokens just loaded (None: none), computed now on the
    base alone, and the module that holds them taken out of the model."""
    if model.get(KEY) is None:
        return None
    keys_values = model[KEY].keys_values(model)
    mx.eval(keys_values)
    del model[KEY]
    return keys_values


def _shared_quantization(adapters: dict[str, str]) -> tuple[int, int] | None:
    """The base precision every adapter was trained on (QLoRA: quantized); they must agree."""
    for name, directory in adapters.items():
        try:  # a missing or foreign directory fails here, before the base loads
            adapter_format(Path(directory))
        except UserError as e:
            raise UserError(f"adapter '{name}': {e}") from None
    seen = {name: trained_quantization(Path(d)) for name, d in adapters.items()}
    kinds = set(seen.values())
    if len(kinds) > 1:
        described = ", ".join(f"{n}: {_precision(q)}" for n, q in seen.items())
        raise UserError(f"the adapters were trained on differently quantized bases ({described});"
                        " one server holds one base, so serve them from separate servers")
    return kinds.pop() if kinds else None


def _precision(quantization: tuple[int, int] | None) -> str:
    return "float" if quantization is None else f"{quantization[0]}-bit"


def switch_to(adapters: AdapterSet, name: str | None) -> None:
    """Make `name`'s adapter (None: the base) the one the model runs; no weight is loaded."""
    if name == adapters.active:
        return
    model = adapters.loaded.model
    if adapters.active in adapters.trees:
        model.update_modules(adapters.trees[adapters.active][1])
    if name in adapters.trees:
        model.update_modules(adapters.trees[name][0])
    adapters.active = name
    adapters.switches += 1


def request_cache(adapters: AdapterSet, name: str | None) -> list | None:
    """A new prompt cache holding `name`'s virtual tokens (None: it has none)."""
    prefix = adapters.prefixes.get(name)
    return None if prefix is None else filled_cache(adapters.loaded.model, prefix)


def adapter_nbytes(adapters: AdapterSet) -> dict[str, int]:
    """Bytes of each adapter's own tensors (the shared base layers not counted)."""
    sizes = {}
    for name, layers in adapters.layers.items():
        sizes[name] = sum(v.nbytes for _, layer in layers
                          for key, v in tree_flatten(layer.parameters())
                          if not key.startswith(("linear.", "base.")))
        sizes[name] += sum(k.nbytes + v.nbytes for k, v in adapters.prefixes.get(name, []))
    return sizes
