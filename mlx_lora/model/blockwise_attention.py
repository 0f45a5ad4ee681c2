"""Attention in blocks of query rows for training, so the (heads, L, L) scores never exist whole.

A plain backward keeps every adapted layer's attention scores until it reaches that layer;
at a few thousand tokens they outweigh everything else a step holds. Here chosen attention
instances compute their output one block of query rows at a time, and their backward
recomputes each block's scores, uses them and lets them go (flash attention's trade:
compute for memory). mlx-lm's attention code is called unchanged, through its `cache`
argument: a stand-in cache records the rotated keys and values of the whole row, and each
block's call gets a stand-in that hands it those keys and values up to its last row, at
that block's RoPE offset. Every score a row sees is computed exactly as in the plain call.

Causal blocks are the same blocks without the recompute: each block's scores are kept for the
backward, as the plain call keeps its whole (L, L) ones. Where the backend's fused attention is
not a fused kernel but the plain composition (MLX's CPU backend), it scores every key of a
row, masked or not; blocks skip the keys after their last row, and with five blocks compute 3/5
of the scores, in 3/5 of the memory (measured on the CPU: 141 ms against 194 for a layer's
forward and backward at 2 x 8 heads x 640 positions).
"""

import functools

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lora.model.load import vocab_rows
from mlx_lora.model.logit_gap import logit_gap
from mlx_lora.model.packed_mask import SegmentCache, segment_caches

# Below this longest row the scores a backward keeps are a small part of a step's memory
# (README.md, "Attention in blocks", has the measurement), and recomputing them costs time:
# causal blocks, which keep them, are faster there.
BLOCKWISE_FROM = 1024
CAUSAL_BLOCK_ROWS = 128  # query rows per causal block (the fastest of 2-10 blocks at 640)
SCORE_BUDGET = 32 * 2**20  # bytes of one block's float32 scores (batch x heads x rows x keys)
ATTENTION_NAMES = ("self_attn", "attention", "attn")  # where mlx-lm blocks keep their attention

_SUBCLASSES: dict[type, type] = {}


class _Recorder:
    """A cache at offset 0 that keeps the rotated keys and values of the whole row."""

    offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values  # (B, kv_heads, L, head_dim)
        # The recording call's own output is never used: one key keeps its attention trivial.
        return keys[:, :, :1], values[:, :, :1]


class _Given:
    """A cache at a block's offset that hands its call the recorded keys and values."""

    def __init__(self, offset: int, keys: mx.array, values: mx.array):
        self.offset, self.keys, self.values = offset, keys, values

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return self.keys, self.values  # the block's own keys are these rows of them


def _spans(length: int, rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows, length)) for s in range(0, length, rows)]


def _block_mask(mask, s: int, e: int):
    """The mask of query rows s:e over keys :e; "causal" already means that for a block
    whose queries are the last rows of its keys."""
    return mask[..., s:e, :e] if isinstance(mask, mx.array) else mask


def _block_rows(attn: nn.Module, x: mx.array, keys: mx.array) -> int:
    """Query rows per block: a quarter of the row at most, fewer where one block's scores
    would pass SCORE_BUDGET. Blocks skip the keys after their last row, so four of them
    compute 5/8 of the scores a whole row does: that pays for most of the recomputing."""
    batch, length = x.shape[:2]
    heads = getattr(attn, "n_heads", None) or x.shape[-1] // keys.shape[-1]
    rows = min(length // 4, SCORE_BUDGET // (4 * batch * heads * length))
    return max(32, rows // 32 * 32)  # whole multiples of 32 rows: few shapes, fair matmuls


def _blockwise_call(self, x: mx.array, mask=None, cache=None):
    base_call = super(type(self), self).__call__
    # Only the training forms (no cache, or the packed batch's stateless one) with a causal
    # mask; a generation cache holds earlier tokens' keys and goes the plain way.
    if not (cache is None or type(cache) is SegmentCache) or mask is None:
        return base_call(x, mask, cache)
    if not self.recompute:
        return _causal_blocks(self, base_call, x, mask)
    given = self.trainable_parameters()
    names = [name for name, _ in tree_flatten(given)]

    def record(params, x):
        self.update(params)
        return _recorded_keys_values(base_call, x)

    def block(params, x_rows, keys, values, s, e):
        self.update(params)
        return _block_call(base_call, x_rows, mask, keys, values, s, e)

    def spans(x, keys):
        return _spans(x.shape[1], self.block_rows or _block_rows(self, x, keys))

    @mx.custom_function
    def attend(params, x):
        keys, values = record(params, x)
        out = mx.concatenate([block(params, x[:, s:e], keys, values, s, e)
                              for s, e in spans(x, keys)], axis=1)
        self.update(given)
        return out  # (B, L, hidden)

    @attend.vjp
    def attend_vjp(primals, cotangent, output):
        params, x = primals
        leaves = _leaves(params)
        keys, values = record(params, x)  # mx.compile reuses the forward's: they are small
        d_leaves = [mx.zeros_like(leaf) for leaf in leaves]
        d_keys, d_values = mx.zeros_like(keys), mx.zeros_like(values)
        d_rows = []
        for s, e in spans(x, keys):
            # One block at a time: its scores are gone before the next one's exist. (This also
            # keeps a one-block row's rows apart from x, which mx.compile fails on, as of MLX
            # 0.32.4, inside a checkpointed block: "_Map_base::at".)
            x_rows, keys, values = mx.depends([x[:, s:e], keys, values],
                                              [d_keys, d_values, *d_leaves, *d_rows[-1:]])

            def run(*arrays, s=s, e=e):
                return block(_tree(names, arrays[:-3]), *arrays[-3:], s, e)

            _, grads = mx.vjp(run, [*leaves, x_rows, keys, values], [cotangent[:, s:e]])
            d_leaves = [a + b for a, b in zip(d_leaves, grads[:-3], strict=True)]
            d_rows.append(grads[-3])
            d_keys, d_values = d_keys + grads[-2], d_values + grads[-1]
        _, grads = mx.vjp(lambda *arrays: record(_tree(names, arrays[:-1]), arrays[-1]),
                          [*leaves, x], [d_keys, d_values])
        self.update(primals[0])
        d_params = _tree(names, [a + b for a, b in zip(d_leaves, grads[:-1], strict=True)])
        return d_params, mx.concatenate(d_rows, axis=1) + grads[-1]

    return attend(given, x)


def _recorded_keys_values(base_call, x: mx.array) -> tuple[mx.array, mx.array]:
    """The rotated keys and values of the whole row (the call's own output is never run)."""
    recorder = _Recorder()
    base_call(x, None, recorder)
    return recorder.keys, recorder.values


def _block_call(base_call, x_rows: mx.array, mask, keys: mx.array, values: mx.array,
                s: int, e: int) -> mx.array:
    """The attention output of query rows s:e, which see the recorded keys up to row e."""
    return base_call(x_rows, _block_mask(mask, s, e), _Given(s, keys[:, :, :e], values[:, :, :e]))


def _causal_blocks(attn: nn.Module, base_call, x: mx.array, mask) -> mx.array:
    """The attention output block by block, each block's graph kept for the backward."""
    keys, values = _recorded_keys_values(base_call, x)
    return mx.concatenate([_block_call(base_call, x[:, s:e], mask, keys, values, s, e)
                           for s, e in _spans(x.shape[1], attn.block_rows)], axis=1)


def _leaves(tree) -> list[mx.array]:
    return [leaf for _, leaf in tree_flatten(tree)]


def _tree(names: list[str], leaves) -> dict:
    return tree_unflatten(list(zip(names, leaves, strict=True)))


def blockwise_attention(modules: list[nn.Module], block_rows: int | None = None,
                        recompute: bool = True) -> None:
    """Make these attention instances compute in blocks of query rows (None: as many rows as
    SCORE_BUDGET allows, or CAUSAL_BLOCK_ROWS without recompute) with a backward that
    recomputes each block's scores, or (recompute=False) keeps them.

    As recompute.checkpoint_blocks does, each chosen instance gets a subclass of its own class
    that overrides __call__; other instances of that class are untouched.
    """
    wrapped = set(_SUBCLASSES.values())
    for module in modules:
        base = type(module)
        if base not in wrapped and base not in _SUBCLASSES:
            _SUBCLASSES[base] = type(f"Blockwise{base.__name__}", (base,), {
                "__call__": _blockwise_call,
            })
        if base not in wrapped:
            module.__class__ = _SUBCLASSES[base]
        module.block_rows = block_rows or (None if recompute else CAUSAL_BLOCK_ROWS)
        module.recompute = recompute


def attention_modules(blocks: list[nn.Module]) -> list[nn.Module]:
    """Each block's attention module, where it keeps one under a name mlx-lm uses."""
    found = [next((block[name] for name in ATTENTION_NAMES
                   if isinstance(block.get(name), nn.Module)), None) for block in blocks]
    return [module for module in found if module is not None]


def use_blockwise(model: nn.Module, modules: list[nn.Module], packed: bool,
                  recompute: bool = True) -> str | None:
    """Make `modules` blockwise (or causal blocks: recompute=False) if the model then gives
    its plain logits; else why not.

    Two short random sequences go through the model plain and with blocks of 5 query rows
    (three blocks, the last a short one), as one causal row and, when the run packs, as one
    packed row; on an exception or a mismatch the modules stay plain.
    """
    lengths = (5, 7)
    vocab = vocab_rows(model) or 2
    ids = mx.random.randint(0, vocab, (1, sum(lengths)), key=mx.random.key(0))
    segments = mx.array([sum(([i + 1] * n for i, n in enumerate(lengths)), [])])
    caches = [None, segment_caches(model, segments)] if packed else [None]
    classes = [type(module) for module in modules]
    was_training = model.training
    model.eval()
    try:
        plain = [model(ids, cache=cache) for cache in caches]
        blockwise_attention(modules, block_rows=5)
        gaps = [logit_gap(expected, model(ids, cache=cache))
                for expected, cache in zip(plain, caches, strict=True)]
    except Exception as e:  # an attention module that does not take the stand-in caches
        gaps = [f"{type(e).__name__}: {e}"]
    finally:
        model.train(was_training)
    gap = next((gap for gap in gaps if gap), None)
    if gap is None:
        blockwise_attention(modules, recompute=recompute)
        return None
    for module, cls in zip(modules, classes, strict=True):
        module.__class__ = cls
    if isinstance(gap, str):
        return f"{type(model).__module__}'s attention does not take blocks ({gap})"
    return f"blockwise logits differ from plain ones (max difference {gap[0]:.3g} of {gap[1]:.3g})"


@functools.cache
def fused_keeps_scores() -> bool:
    """Whether this backend's fused attention keeps (heads, L, L) scores for its backward.

    Measured, once per process: the peak memory of a gradient through
    mx.fast.scaled_dot_product_attention (2 heads of 64, causal) at 512 and 1024 positions.
    Scores kept make it grow about 4x; a backward that recomputes them, about 2x.
    """
    peaks = []
    for length in (512, 1024):
        q, k, v = (mx.random.normal((1, 2, length, 64), key=mx.random.key(i)) for i in range(3))
        mx.eval(q, k, v)
        grad = mx.grad(lambda q, k, v: mx.fast.scaled_dot_product_attention(
            q, k, v, scale=0.125, mask="causal").sum(), argnums=(0, 1, 2))
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(grad(q, k, v))
        peaks.append(mx.get_peak_memory() - before)
    return peaks[1] > 3 * peaks[0]


def choose_attention(model: nn.Module, blocks: list[nn.Module], choice: str, longest_row: int,
                     packed: bool, not_here: str | None) -> tuple[str, str]:
    """The attention a run takes, "blockwise" or "causal-blocks" (its modules in `blocks` made
    so here) or "fused" (mlx-lm's own), and the line that says why; not_here: why the method or
    its settings rule blocks out (None: they do not)."""
    if choice == "fused":
        return "fused", "attention: fused (--attention fused)"
    if not_here:
        return "fused", f"attention: fused ({not_here})"
    modules = attention_modules(blocks)
    if not modules:
        return "fused", ("attention: fused (no block keeps its attention as "
                         f"{', '.join(ATTENTION_NAMES)})")
    why = f"--attention {choice}"
    if choice == "auto":
        if longest_row < 2 * CAUSAL_BLOCK_ROWS:
            return "fused", (f"attention: fused (rows of at most {longest_row} tokens: "
                             "their scores are small)")
        if not fused_keeps_scores():
            return "fused", ("attention: fused (this backend's fused attention keeps no "
                             "(L, L) scores for its backward)")
        if longest_row >= BLOCKWISE_FROM:
            choice, why = "blockwise", ("the fused attention's backward would keep every "
                                        "layer's (heads, L, L) scores")
        else:
            choice, why = "causal-blocks", ("this backend's fused attention scores every key "
                                            "of a row, masked or not")
    if problem := use_blockwise(model, modules, packed, recompute=choice == "blockwise"):
        return "fused", f"attention: fused, not {choice}: {problem}"
    if choice == "blockwise":
        return "blockwise", (f"attention: blockwise in {len(modules)} layers ({why}; blocks of "
                             "query rows recompute them in the backward instead)")
    return "causal-blocks", (f"attention: causal blocks of {CAUSAL_BLOCK_ROWS} query rows in "
                             f"{len(modules)} layers ({why}; a block skips the keys after its "
                             "last row)")
