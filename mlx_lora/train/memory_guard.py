"""Memory guard: keep a run inside a share of the machine's memory instead of letting it swap.

On a Mac the GPU shares the machine's memory, so a run that outgrows it swaps, stalls or
panics instead of failing. The guard puts MLX's memory limit (MLX then waits for work in flight
before allocating past it), its cache of free buffers and, where the backend has wired memory,
its wired limit under the run's limit; after every step it compares the step's peak with the
limit, so the loop stops with a checkpoint, saying which setting to lower, before the next
step goes further. MLX's memory functions work on every backend (the CPU's too).
"""

import os

import mlx.core as mx

from mlx_lora.adapters import METHODS
from mlx_lora.config import TrainConfig
from mlx_lora.errors import UserError
from mlx_lora.train.distributed import SINGLE, Ranks

GB = 1e9  # the unit of --memory-limit, as of peak_memory_gb in metrics.jsonl
# Without a recommended working set: the share macOS itself gives the GPU on larger Macs,
# leaving a quarter of the memory to the system and other programs.
MEMORY_SHARE = 0.75


class MemoryLimitExceeded(UserError):
    """A step passed --memory-limit; the run stopped after saving that step's checkpoint."""


def gb(n_bytes: float) -> str:
    """A size as the console says it: "9.3 GB"."""
    return f"{n_bytes / GB:.3g} GB"


def machine_memory() -> int | None:
    """The machine's RAM in bytes, from the OS (Linux, macOS); None where it does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def default_limit(info: dict, ram: int | None) -> tuple[int, str] | None:
    """The limit when --memory-limit is -1, in bytes, and how it was chosen; None when neither
    the device (mx.device_info()) nor the OS says how much memory there is.

    Metal's recommended working set is macOS's own figure for what the GPU may hold without
    paging (about 2/3 to 3/4 of the memory; MLX's default limit is 1.5 times it, well into
    swap): the limit is all of it. Other devices give their memory (memory_size, CUDA's
    total_memory), and the CPU none (then the OS's RAM): the limit is MEMORY_SHARE of it.
    """
    def size(key):
        value = info.get(key)
        return value if isinstance(value, int) and value > 0 else None

    if working_set := size("max_recommended_working_set_size"):
        memory = size("memory_size")
        return working_set, ("the GPU's recommended working set"
                             + (f" of {gb(memory)} of memory" if memory else ""))
    total = size("memory_size") or size("total_memory") or ram
    if not total:
        return None
    return int(MEMORY_SHARE * total), f"{MEMORY_SHARE} of {gb(total)} of memory"


def resolve_limit(memory_limit: float) -> tuple[float, str | None]:
    """--memory-limit as the run applies it, in GB (0: off), and the line that says so (none
    when it was turned off)."""
    if memory_limit == 0:
        return 0.0, None
    if memory_limit > 0:
        limit, how = memory_limit, "--memory-limit"
    elif found := default_limit(mx.device_info(), machine_memory()):
        limit, how = round(found[0] / GB, 2), found[1]
    else:
        return 0.0, ("memory limit: off (neither MLX nor the system says how much memory "
                     "there is; --memory-limit GB sets one)")
    return limit, (f"memory limit: {gb(limit * GB)} ({how}); a step that passes it stops the "
                   "run with a checkpoint (--memory-limit GB sets another, 0 turns it off)")


def advice(config: TrainConfig, held: float, limit: float) -> str:
    """What to change so the steps fit, from the run's own settings. held: the bytes that stay
    allocated between steps (weights, adapters, optimizer state)."""
    method = METHODS[config.fine_tune_type]
    if held >= limit:
        quantizable = not config.quantize and method.own_weights is None
        return (f"the weights and optimizer state alone hold {gb(held)}, so no batch setting "
                "helps: use " + ("a quantized base (--quantize 4) or " if quantizable else "")
                + "a smaller model, or a higher --memory-limit where the machine has room")
    lower = [f"--batch-size (now {config.batch_size}; more --grad-accumulation-steps keep "
             "the update's size)"] if config.batch_size > 1 else []
    lower.append(f"--max-seq-length (now {config.max_seq_length})")
    # batch_size and max_seq_length shape the batches, so --resume refuses to change them.
    new_run = f"start a new run with a lower {' or '.join(lower)}"
    if config.grad_checkpoint or method.virtual is not None:  # on, or not possible
        return f"{new_run}, or --resume with a higher --memory-limit where the machine has room"
    return f"add --grad-checkpoint and --resume, or {new_run}"


class MemoryGuard:
    """While active: MLX's memory, cache and wired limits within the run's limit (put back on
    exit). MLX's peak counter is restarted only when loading already passed the limit
    (quantizing on load can, for a moment, where training does not), so check() judges the
    training; otherwise the peak stays the run's whole, loading included (train() restarts it)."""

    def __init__(self, limit_gb: float, ranks: Ranks = SINGLE):
        self.limit = int(limit_gb * GB)  # 0: off
        self.ranks = ranks
        self.cache_limit = 0
        self._restore: list[tuple] = []  # (setter, MLX's value before)

    def __enter__(self) -> "MemoryGuard":
        if not self.limit:
            return self
        if mx.get_peak_memory() > self.limit:
            mx.reset_peak_memory()
        self._restore.append((mx.set_memory_limit, mx.set_memory_limit(self.limit)))
        self.cache_limit = mx.set_cache_limit(0)  # MLX's own, never raised; set just below
        self._restore.append((mx.set_cache_limit, self.cache_limit))
        self._cap_cache(mx.get_active_memory())
        working_set = mx.device_info().get("max_recommended_working_set_size")
        if isinstance(working_set, int) and working_set > 0:  # wiring more can panic macOS
            try:
                wired = mx.set_wired_limit(min(self.limit, working_set))
                self._restore.append((mx.set_wired_limit, wired))
            except (RuntimeError, ValueError):  # a macOS before 15, or a lower system limit
                pass
        return self

    def __exit__(self, *exc) -> bool:
        for setter, before in reversed(self._restore):
            setter(before)
        self._restore.clear()
        return False

    def _cap_cache(self, needed: int) -> None:
        """Keep the cache of free buffers to what fits beside `needed` bytes in use: MLX frees
        the rest at its next allocation, so memory in use plus cache stays under the limit."""
        self.cache_limit = min(self.cache_limit, max(self.limit - needed, 0))
        mx.set_cache_limit(self.cache_limit)

    def check(self, step: int, config: TrainConfig) -> str | None:
        """After `step`: None while every rank's peak is within its limit, else the message
        for the stop (the same on every rank: on several, they compare through all_gather)."""
        peak = mx.get_peak_memory()  # the largest step so far (or loading, within the limit)
        if self.limit:
            self._cap_cache(peak)
        mine = (peak, self.limit, mx.get_active_memory())
        rows = ([mine] if self.ranks.size == 1 else
                self.ranks.gather(mx.array([mine], mx.float32)).tolist())  # (ranks, 3)
        over = [row for row in rows if row[1] and row[0] > row[1]]
        if not over:
            return None
        peak, limit, held = max(over, key=lambda row: row[0] / row[1])
        return (f"step {step} peaked at {gb(peak)}, over --memory-limit {gb(limit)}: stopped with "
                f"its checkpoint before the machine swaps; {advice(config, held, limit)}")
