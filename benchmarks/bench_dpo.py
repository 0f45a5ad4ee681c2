"""The same DPO job through mlx_lora and through mlx-lm-lora, side by side.

    python benchmarks/bench_dpo.py [--iters N] [--sides mlx_lm_lora,mlx_lora,mlx_lora_sft]

Both sides train LoRA (rank 8, alpha 16, every linear layer) with sigmoid DPO (beta 0.1) on
the same model, pairs and hyper-parameters, each in its own process so peak memory is its own.
mlx-lm-lora 5.10.2 is installed (without its dependencies, which ours already has) under the
work dir, never into this project's environment, and run through its own `main()` as its
CLI runs it. It calls `mx.device_info()["max_recommended_working_set_size"]`, a key only the
Metal backend has; its process gets that one key added (the machine's memory), nothing else
changed. Afterwards one referee scores both adapters: the reward accuracy and margin of
each on the held-out pairs against the base, from the full logits. The last stdout line is
one JSON object. A third side, mlx_lora_sft, trains SFT on the same sequences (each pair's
halves as prompt/completion records, twice the batch size): DPO's peak memory over it is the
cost of the preference objective itself.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_train import (
    DATA,
    ROOT,
    add_side_options,
    machine,
    qwen_shaped_model,
    run_side,
    write_jsonl,
)

PEER = "mlx-lm-lora==5.10.2"
SIDES = ("mlx_lm_lora", "mlx_lora", "mlx_lora_sft")


@dataclass(frozen=True)
class Job:
    """What both sides train on, and how."""

    model: str
    data: str  # train.jsonl only: neither side validates while training
    valid: str  # the referee's held-out pairs
    peer_dir: str  # where mlx-lm-lora is installed
    iters: int = 12
    batch_size: int = 2
    max_seq_length: int = 512
    learning_rate: float = 5e-4
    beta: float = 0.1
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0


def main() -> None:
    """Prepare the job, run each side in its own process, print the summary JSON last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=Job.iters)
    add_side_options(parser, SIDES)
    args = parser.parse_args()
    if args.side:
        job = Job(**json.loads(Path(args.job).read_text()))
        print(json.dumps(RUNNERS[args.side](job, Path(args.job).parent / f"dpo-{args.side}")))
        return
    job = prepare(Path(args.work_dir), args.iters)
    job_file = Path(args.work_dir) / "job-dpo.json"
    job_file.write_text(json.dumps(asdict(job)))
    results = {side: run_side(side, job_file, __file__) for side in args.sides.split(",")}
    print(json.dumps(summary(job, results)))


def summary(job: Job, results: dict) -> dict:
    """Both sides' figures and the ratios the targets are stated in."""
    theirs, ours = results.get("mlx_lm_lora"), results.get("mlx_lora")
    ratios = {}
    if theirs and ours:
        ratios = {"pairs_per_sec": ours["pairs_per_sec"] / theirs["pairs_per_sec"],
                  "peak_memory": ours["peak_memory_gb"] / theirs["peak_memory_gb"]}
    if ours and results.get("mlx_lora_sft"):
        ratios["peak_memory_dpo_over_sft"] = (ours["peak_memory_gb"]
                                              / results["mlx_lora_sft"]["peak_memory_gb"])
    settings = {k: v for k, v in asdict(job).items() if k not in ("data", "valid", "peer_dir")}
    return {**settings, "machine": machine(), **results,
            "ratios": {k: round(v, 3) for k, v in ratios.items()}}


# ---- the job: model, pairs and the peer, made once under the work dir ----

def prepare(work_dir: Path, iters: int) -> Job:
    """The Qwen-shaped model, single-turn pairs of LLaMA-Factory's DPO demo that fit
    max_seq_length on both halves, and mlx-lm-lora."""
    work_dir.mkdir(parents=True, exist_ok=True)
    model = qwen_shaped_model(work_dir / "qwen-512x8")
    job = Job(model=str(model), data=str(work_dir / "data-dpo" / "train"),
              valid=str(work_dir / "data-dpo" / "valid.jsonl"),
              peer_dir=str(install_peer(work_dir / "mlx-lm-lora")), iters=iters)
    pairs = fitting_pairs(job, n=job.iters * job.batch_size + 16)
    Path(job.data).mkdir(parents=True, exist_ok=True)
    write_jsonl(Path(job.data) / "train.jsonl", pairs[:job.iters * job.batch_size])
    write_jsonl(Path(job.valid), pairs[job.iters * job.batch_size:])
    return job


def install_peer(target: Path) -> Path:
    """mlx-lm-lora's own code under target (once); its dependencies are ours already."""
    if not (target / "mlx_lm_lora").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", str(target), PEER], check=True)
    return target


def fitting_pairs(job: Job, n: int) -> list[dict]:
    """n single-turn {prompt, chosen, rejected} pairs whose halves both fit, shuffled (seed 0)."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(Path(job.model))
    demo = json.loads((DATA / "llama-factory" / "dpo_en_demo.json").read_text())
    random.Random(job.seed).shuffle(demo)
    pairs = []
    for row in demo:
        turns = row["conversations"]
        if len(turns) != 1 or turns[0]["from"] != "human" or "system" in row:
            continue
        pair = {"prompt": turns[0]["value"], "chosen": row["chosen"]["value"],
                "rejected": row["rejected"]["value"]}
        lengths = [len(tokenizer.apply_chat_template(
            [{"role": "user", "content": pair["prompt"]},
             {"role": "assistant", "content": pair[half]}])) for half in ("chosen", "rejected")]
        if max(lengths) <= job.max_seq_length:
            pairs.append(pair)
        if len(pairs) == n:
            return pairs
    raise SystemExit(f"only {len(pairs)} of {n} pairs fit {job.max_seq_length} tokens")


# ---- the sides (each runs in its own process) ----

def run_mlx_lm_lora(job: Job, out_dir: Path) -> dict:
    """mlx-lm-lora's DPO through its own main(), its training call timed."""
    import mlx.core as mx

    wall = run_peer(job.peer_dir, "train_dpo", {
        "model": job.model, "train": True, "train_mode": "dpo", "data": job.data,
        "adapter_path": str(out_dir), "iters": job.iters, "batch_size": job.batch_size,
        "max_seq_length": job.max_seq_length, "learning_rate": job.learning_rate,
        "beta": job.beta, "dpo_cpo_loss_type": "sigmoid", "seed": job.seed,
        "lora_parameters": {"rank": job.rank, "dropout": 0.0, "scale": job.alpha / job.rank},
        "optimizer": "adam", "optimizer_config": {"adam": {"bias_correction": True}},
        "steps_per_report": job.iters, "steps_per_eval": 10**9, "save_every": job.iters,
        "fuse": False, "num_layers": -1})
    peak = mx.get_peak_memory() / 1e9
    pairs = job.iters * job.batch_size
    return {"pairs": pairs, "wall_s": round(wall, 2),
            "pairs_per_sec": round(pairs / wall, 4), "peak_memory_gb": round(peak, 3),
            **referee(job, out_dir)}


def run_peer(peer_dir: str, trainer: str, options: dict, **overrides) -> float:
    """Run mlx-lm-lora's own main() on `options` in this process (a side's own) and return the
    wall time of its training call `trainer` ("train_dpo", "train_sft"), compilation included;
    the training records are tokenized before the clock starts (its CacheDataset would do it
    lazily inside the call), and loading is not timed. `overrides` replace keyword arguments of
    that call (a training_callback)."""
    import mlx.core as mx

    sys.path.insert(0, peer_dir)
    device_info = mx.device_info
    # The one line it needs off Metal: the working-set key, set to the machine's memory.
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    mx.device_info = lambda: {"max_recommended_working_set_size": memory, **device_info()}
    from mlx_lm_lora import train as peer

    timing = {}
    train = getattr(peer, trainer)

    def timed_train(*args, **kwargs):
        records = kwargs["train_dataset"]
        for i in range(len(records)):
            records[i]
        started = time.perf_counter()
        train(*args, **{**kwargs, **overrides})
        timing["wall_s"] = time.perf_counter() - started

    setattr(peer, trainer, timed_train)
    peer.main(options)
    return timing["wall_s"]


def run_mlx_lora(job: Job, out_dir: Path) -> dict:
    """mlx_lora's DPO run, as `mlx-lora train --train-mode dpo` does it; the reference pass
    counts as training time."""
    import mlx.core as mx

    from mlx_lora.config import TrainConfig
    from mlx_lora.formats.metrics import read_metrics
    from mlx_lora.train.run import train

    config = TrainConfig(model=job.model, data=job.data, adapter_path=str(out_dir),
                         train_mode="dpo", beta=job.beta, iters=job.iters,
                         batch_size=job.batch_size, max_seq_length=job.max_seq_length,
                         learning_rate=job.learning_rate, optimizer="adam", rank=job.rank,
                         alpha=job.alpha, seed=job.seed, steps_per_report=job.iters,
                         save_every=job.iters, valid_fraction=0.0)
    train(config, overwrite=True)
    peak = mx.get_peak_memory() / 1e9
    metrics = read_metrics(out_dir)
    reference_s = next(r["elapsed_s"] for r in metrics if r["event"] == "prepare")
    done = metrics[-1]
    wall = done["elapsed_s"] + reference_s
    return {"pairs": done["trained_pairs"], "wall_s": round(wall, 2),
            "reference_pass_s": round(reference_s, 2),
            "pairs_per_sec": round(done["trained_pairs"] / wall, 4),
            "peak_memory_gb": round(peak, 3), **referee(job, out_dir)}


def run_mlx_lora_sft(job: Job, out_dir: Path) -> dict:
    """SFT on the same sequences, for DPO's memory to be measured against: each pair's two
    halves as prompt/completion records, 2 x batch size of them per batch, unpacked."""
    import mlx.core as mx

    from mlx_lora.config import TrainConfig
    from mlx_lora.train.run import train

    records = [json.loads(line) for line in
               (Path(job.data) / "train.jsonl").read_text().splitlines()]
    halves = [{"prompt": r["prompt"], "completion": r[half]} for r in records
              for half in ("chosen", "rejected")]
    config = TrainConfig(model=job.model, data="records", adapter_path=str(out_dir),
                         iters=job.iters, batch_size=2 * job.batch_size, mask_prompt=True,
                         pack=False, max_seq_length=job.max_seq_length,
                         learning_rate=job.learning_rate, optimizer="adam", rank=job.rank,
                         alpha=job.alpha, seed=job.seed, steps_per_report=job.iters,
                         save_every=job.iters, valid_fraction=0.0)
    train(config, overwrite=True, data=halves)
    return {"peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3)}


def referee(job: Job, adapter_dir: Path) -> dict:
    """Reward accuracy and mean margin on the held-out pairs: beta * (log p_adapted - log
    p_base) of chosen against rejected, each from the full logits, one pair at a time."""
    import mlx.core as mx
    import mlx_lm

    from mlx_lora.config import TrainConfig
    from mlx_lora.data.records import read_records
    from mlx_lora.objectives.pairs import make_pair_batch, to_pairs

    base, tokenizer = mlx_lm.load(job.model)
    adapted, _ = mlx_lm.load(job.model, adapter_path=str(adapter_dir))
    config = TrainConfig(train_mode="dpo", max_seq_length=job.max_seq_length)
    pairs = to_pairs(read_records(Path(job.valid)), tokenizer, config, "valid")

    def logps(model, batch):
        logits = model(mx.array(batch.rows.inputs)).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logp, mx.array(batch.rows.targets)[..., None], -1)[..., 0]
        return (picked * mx.array(batch.rows.loss_mask)).sum(axis=1)

    wins, margins = 0, 0.0
    for i in range(len(pairs)):
        batch = make_pair_batch(pairs, [i], job.max_seq_length)
        chosen, rejected = (job.beta * (logps(adapted, batch) - logps(base, batch))).tolist()
        wins += chosen > rejected
        margins += chosen - rejected
    return {"val_reward_accuracy": round(wins / len(pairs), 4),
            "val_reward_margin": round(margins / len(pairs), 5), "val_pairs": len(pairs)}


RUNNERS = {"mlx_lm_lora": run_mlx_lm_lora, "mlx_lora": run_mlx_lora,
           "mlx_lora_sft": run_mlx_lora_sft}

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from a clone without installing
    main()
