"""Tiny random models with a trained tokenizer, built offline for tests, the demo and benchmarks."""

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mlx_lora.errors import UserError

EOS = "<|im_end|>"
PAD = "<|endoftext|>"
SPECIAL_TOKENS = [PAD, "<|im_start|>", EOS]

# ChatML with Qwen2.5-style tools: the tool list goes in the system turn, calls are
# <tool_call>{json}</tool_call> (mlx-lm infers its json_tools parser from "tool_call.name"),
# and each tool result is its own user turn. One message renders as one <|im_start|> block.
# Newlines are explicit '\n' strings: transformers renders with trim_blocks, other engines not.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions. Their signatures are within"
    " <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each call, reply with a JSON object with \"name\" and"
    " \"arguments\" within <tool_call></tool_call> tags.<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- if not message.content and not message.tool_calls %}{{- '\\n' }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content"
    " + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

DEFAULT_CORPUS = [
    "Once upon a time there was a little girl named Lily. She loved to play in the park.",
    "One day she found a big red ball under a tree. She was very happy and ran home.",
    "The cat sat on the mat and looked at the bird in the garden.",
    "Tom and his dog went to the river to catch fish. The sun was warm and bright.",
    "You are a helpful assistant. Answer the question in one short sentence.",
    "What is the capital of France? The capital of France is Paris.",
    "How many legs does a spider have? A spider has eight legs.",
    "Translate to French: good morning. Bonjour.",
    "The weather today is sunny with a high of 21 degrees and a light wind.",
    'Call get_weather with {"city": "London", "unit": "celsius"} to check the forecast.',
    'def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5',
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "Summarize the text. The meeting moved to Friday because the room was booked.",
    "Please write a haiku about the sea: waves fold into foam, the gulls call the tide back home,"
    " salt on the cold stones.",
]


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> None:
    """Train a byte-level BPE on texts and write tokenizer.json + tokenizer_config.json."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    # Written by hand rather than via transformers' save_pretrained, whose layout (e.g. a
    # separate chat_template.jinja) changes between versions; this one every version reads.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": SPECIAL_TOKENS[1:2],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def make_tiny_model(
    out_dir: Path,
    *,
    arch: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    texts: list[str] | None = None,
    tokenizer_dir: Path | None = None,
    seed: int = 0,
) -> Path:
    """Write a random float32 llama/qwen2 model dir (HF layout) with a tokenizer; return it."""
    if arch not in ("llama", "qwen2"):
        raise UserError(f"arch must be llama or qwen2, got {arch!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise UserError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        vocab_size, bos_id, eos_id = _copy_tokenizer(Path(tokenizer_dir), out_dir)
    else:
        train_tokenizer(texts or DEFAULT_CORPUS, vocab_size, out_dir)
        bos_id, eos_id = None, Tokenizer.from_file(str(out_dir / "tokenizer.json")).token_to_id(EOS)
    config = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0 if arch == "llama" else 1000000.0,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=num_layers)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = _random_weights(config, seed)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def _random_weights(config: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, v, m = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    d = config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d

    def normal(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(v, h), "model.norm.weight": np.ones(h, np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = np.ones(h, np.float32)
        w[f"{p}.post_attention_layernorm.weight"] = np.ones(h, np.float32)
        for name, (out, inp) in {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q)}.items():
            w[f"{p}.self_attn.{name}_proj.weight"] = normal(out, inp)
            if config["model_type"] == "qwen2" and name != "o":  # qwen2: q/k/v carry biases
                w[f"{p}.self_attn.{name}_proj.bias"] = normal(out)
        w[f"{p}.mlp.gate_proj.weight"] = normal(m, h)
        w[f"{p}.mlp.up_proj.weight"] = normal(m, h)
        w[f"{p}.mlp.down_proj.weight"] = normal(h, m)
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = normal(v, h)
    return w


def _copy_tokenizer(src: Path, out_dir: Path) -> tuple[int, int | None, int | None]:
    from transformers import AutoTokenizer  # slow import, only needed here

    names = [
        p for p in src.iterdir()
        if p.is_file() and (p.name.startswith(("tokenizer", "special_tokens", "added_tokens",
                                               "vocab", "merges", "chat_template"))
                            or p.suffix == ".jinja")
    ]
    if not names:
        raise UserError(f"{src}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
    for p in names:
        shutil.copy2(p, out_dir / p.name)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    # The model's vocabulary is the tokenizer's, added tokens included.
    return len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
