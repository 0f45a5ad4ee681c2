"""Reading 100k small records: mlx-lm's loading against mlx_lora's checks and quality report.

    python benchmarks/bench_data.py [--records 100000] [--repeat 3]

The records are short prompt/completion pairs cut from the WWDC25 set in ../shared/data, each
made distinct, tokenized with stories260K's SentencePiece tokenizer. Each side runs in its
own process, timed from after the imports, in the order its trainer does the work:
- mlx_lm: `load_tokenizer`, then `mlx_lm.tuner.datasets.load_dataset` (which needs it), all
  mlx-lm does with the records before training (it tokenizes them lazily, batch by batch);
- mlx_lora_checks: `read_splits`, which reads and checks every record, then
  `load_tokenizer_only`: `mlx-lora train` checks the data before it loads anything;
- mlx_lora_report: `load_tokenizer_only`, then `inspect_data`, `mlx-lora data`'s report, which
  tokenizes every record whole.
Each side runs --repeat times, the sides taking turns; the fastest run of each counts. The last
line of stdout is one JSON object with the seconds of each side.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from bench_train import DATA, machine, write_jsonl

MODEL = DATA / "tinyllamas-stories260K" / "hf"
SIDES = ("mlx_lm", "mlx_lora_checks", "mlx_lora_report")


def main() -> None:
    """Write the records, time every side in its own process, print the summary JSON last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side; the fastest "
                        "counts (other load on the machine only slows a run down)")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(SIDE_RUNNERS[args.side](Path(args.data))))
        return
    work = Path(tempfile.mkdtemp(prefix="mlx_lora_bench_data_"))
    write_jsonl(work / "train.jsonl", records(args.records))
    seconds = {side: float("inf") for side in SIDES}
    for _ in range(args.repeat):
        for side in SIDES:
            out = subprocess.run([sys.executable, __file__, "--side", side, "--data", str(work)],
                                 check=True, capture_output=True, text=True).stdout
            run_seconds = json.loads(out.splitlines()[-1])["seconds"]
            seconds[side] = min(seconds[side], run_seconds)
            print(f"{side}: {run_seconds:.2f} s", file=sys.stderr)
    print(json.dumps({"records": args.records, "machine": machine(), "seconds": seconds,
                      "checks_over_mlx_lm": round(seconds["mlx_lora_checks"]
                                                  / seconds["mlx_lm"], 3)}))


def records(n: int) -> list[dict]:
    """n short, distinct prompt/completion records."""
    source = [json.loads(line) for line in
              (DATA / "mlx-examples-wwdc25" / "train.jsonl").read_text().splitlines()]
    return [{"prompt": f"{r['prompt'][:80]} #{i}", "completion": r["completion"][:80]}
            for i, r in enumerate(source[i % len(source)] for i in range(n))]


def run_mlx_lm(data: Path) -> dict:
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.utils import load_tokenizer

    started = time.perf_counter()
    tokenizer = load_tokenizer(MODEL)
    args = types.SimpleNamespace(data=str(data), train=True, test=False, mask_prompt=False,
                                 hf_dataset=None)
    train, _, _ = load_dataset(args, tokenizer)
    assert len(train) > 0
    return {"seconds": time.perf_counter() - started}


def run_mlx_lora(data: Path, report: bool) -> dict:
    from mlx_lora.data.inspect import inspect_data
    from mlx_lora.data.sources import read_splits
    from mlx_lora.model.load import load_tokenizer_only

    started = time.perf_counter()
    if report:
        inspect_data(str(data), load_tokenizer_only(str(MODEL)), 2048, False)
    else:
        assert read_splits(str(data))["train"][1]
        load_tokenizer_only(str(MODEL))
    return {"seconds": time.perf_counter() - started}


SIDE_RUNNERS = {"mlx_lm": run_mlx_lm,
                "mlx_lora_checks": lambda data: run_mlx_lora(data, report=False),
                "mlx_lora_report": lambda data: run_mlx_lora(data, report=True)}

if __name__ == "__main__":
    main()
