"""Logit parity of an exported LoRA GGUF in llama.cpp with mlx_lora's adapted model.

Not a test (it needs a llama.cpp source tree and llama-cpp-python): the base is converted to
an f32 GGUF by llama.cpp's own convert_hf_to_gguf.py, the adapter exported with
`mlx-lora export --format gguf`, and llama.cpp's logits for the prompt's tokens (through
llama-cpp-python, base + lora_path) compared with mlx_lora's, base alone and adapted.

    scripts/run.sh python scripts/llama_cpp_parity.py \
        --model ../shared/data/tinyllamas-stories260K/hf --adapter-path /tmp/gguf_meas/adapter \
        --llama-cpp-dir /tmp/llamacpp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp \
        --llama-cpp-python /tmp/llamacpp/venv/bin/python

llama-cpp-python runs in its own interpreter (it may live in another virtual environment);
the token ids go to both sides, so the two tokenizers cannot differ. The converter runs in
this one, which needs torch and transformers (the `test` extra). The last line printed is one
JSON object with every figure. A llama.cpp source tree: llama-cpp-python's sdist vendors one
(`pip download --no-deps --no-binary :all: llama-cpp-python`, under vendor/llama.cpp).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_lora.formats.convert import export_adapter
from mlx_lora.model.adapted import load_adapted

# Run by --llama-cpp-python: logits of every position, with the adapter when one is given.
LLAMA_CPP_LOGITS = """
import json, sys
import numpy as np
import llama_cpp
base, lora, ids, out = sys.argv[1], sys.argv[2] or None, json.loads(sys.argv[3]), sys.argv[4]
# An f32 KV cache: llama.cpp's default f16 cache alone moves logits by about 1e-2.
llm = llama_cpp.Llama(model_path=base, lora_path=lora, logits_all=True, n_ctx=max(64, len(ids)),
                      n_threads=2, type_k=llama_cpp.GGML_TYPE_F32,
                      type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
llm.eval(ids)
np.save(out, np.array(llm.scores[:len(ids)], dtype=np.float32))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="HF-layout model directory (the base).")
    parser.add_argument("--adapter-path", required=True, help="mlx-lm or PEFT adapter dir.")
    parser.add_argument("--llama-cpp-dir", required=True,
                        help="llama.cpp source tree holding convert_hf_to_gguf.py.")
    parser.add_argument("--llama-cpp-python", default=sys.executable,
                        help="Python interpreter with llama_cpp installed.")
    parser.add_argument("--prompt", default="Once upon a time, there was a little girl who")
    parser.add_argument("--outtype", default="f32", choices=("f32", "f16"),
                        help="The adapter GGUF's tensor type.")
    parser.add_argument("--work-dir", default=None, help="Where the GGUF files go "
                        "[default: a new temporary directory].")
    return parser.parse_args()


def convert_base(model: str, llama_cpp_dir: Path, out: Path) -> None:
    """The base as llama.cpp's own converter writes it, in f32."""
    script = llama_cpp_dir / "convert_hf_to_gguf.py"
    done = subprocess.run([sys.executable, str(script), model, "--outtype", "f32", "--outfile",
                           str(out)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{script} failed:\n{done.stderr[-3000:]}")


def llama_cpp_logits(python: str, base: Path, lora: Path | None, ids: list[int],
                     work: Path) -> np.ndarray:
    """llama.cpp's (tokens, vocab) logits, through llama-cpp-python in its own interpreter."""
    out = work / f"logits-{'lora' if lora else 'base'}.npy"
    subprocess.run([python, "-c", LLAMA_CPP_LOGITS, str(base), str(lora or ""),
                    json.dumps(ids), str(out)], check=True)
    return np.load(out)


def mlx_lora_logits(model: str, adapter: str | None, ids: list[int]) -> np.ndarray:
    """mlx_lora's (tokens, vocab) float32 logits, base alone or adapted."""
    loaded, _ = load_adapted(model, adapter)
    return np.array(loaded.model(mx.array(ids)[None]).astype(mx.float32)[0])


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="llama_cpp_parity-"))
    work.mkdir(parents=True, exist_ok=True)
    base_gguf, lora_gguf = work / "base-f32.gguf", work / f"adapter-{args.outtype}.gguf"
    convert_base(args.model, Path(args.llama_cpp_dir), base_gguf)
    export_adapter(args.adapter_path, "gguf", lora_gguf, outtype=args.outtype, model=args.model)
    ids = load_adapted(args.model, None)[0].tokenizer.encode(args.prompt)

    ours_base = mlx_lora_logits(args.model, None, ids)
    ours = mlx_lora_logits(args.model, args.adapter_path, ids)
    theirs_base = llama_cpp_logits(args.llama_cpp_python, base_gguf, None, ids, work)
    theirs = llama_cpp_logits(args.llama_cpp_python, base_gguf, lora_gguf, ids, work)
    result = {
        "tokens": len(ids),
        "outtype": args.outtype,
        "max_abs_diff_adapted": float(np.abs(theirs - ours).max()),
        "max_abs_diff_base": float(np.abs(theirs_base - ours_base).max()),
        "adapter_effect_max_abs": float(np.abs(ours - ours_base).max()),
        "argmax_agree": float((theirs.argmax(-1) == ours.argmax(-1)).mean()),
        "work_dir": str(work),
    }
    print(f"{len(ids)} tokens; max |llama.cpp - mlx_lora| logit: adapted "
          f"{result['max_abs_diff_adapted']:.3g}, base alone {result['max_abs_diff_base']:.3g}; "
          f"the adapter moves logits by up to {result['adapter_effect_max_abs']:.3g}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
