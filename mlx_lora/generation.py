"""Text generation with a base model and optional adapters, through mlx-lm."""

from mlx_lm import generate as mlx_lm_generate
from mlx_lm.sample_utils import make_sampler

from mlx_lora.formats.convert import load_adapted
from mlx_lora.load import LoadedModel


def load_for_inference(model: str, adapter_path: str | None = None,
                       trust_remote_code: bool = False) -> LoadedModel:
    """The base (as the adapter was trained on it) with the adapters of any format, in eval mode."""
    return load_adapted(model, adapter_path, trust_remote_code)[0]


def format_prompt(tokenizer, prompt: str, chat: bool) -> str:
    """The prompt as the model saw it in training: through the chat template when it has one."""
    if chat and tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def complete(loaded: LoadedModel, prompt: str, max_tokens: int = 100, temperature: float = 0.0,
             chat: bool = True) -> str:
    """Generate a completion of `prompt` (greedy at temperature 0)."""
    text = format_prompt(loaded.tokenizer, prompt, chat)
    return mlx_lm_generate(loaded.model, loaded.tokenizer, text, max_tokens=max_tokens,
                           sampler=make_sampler(temp=temperature), verbose=False)
