"""Text generation with a base model and optional adapters, through mlx-lm."""

from mlx_lm import generate as mlx_lm_generate
from mlx_lm.sample_utils import make_sampler

from mlx_lora.config import GenerateConfig
from mlx_lora.model.load import LoadedModel
from mlx_lora.model.prefix_cache import generation_cache

GENERATE = GenerateConfig()


def format_prompt(tokenizer, prompt: str, chat: bool) -> str:
    """The prompt as the model saw it in training: through the chat template when it has one."""
    if chat and tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def complete(loaded: LoadedModel, prompt: str, max_tokens: int = GENERATE.max_tokens,
             temperature: float = GENERATE.temp, chat: bool = GENERATE.chat) -> str:
    """Generate a completion of `prompt` (greedy at temperature 0)."""
    text = format_prompt(loaded.tokenizer, prompt, chat)
    # Virtual tokens (prompt, prefix) go in as a prompt cache that already holds them.
    return mlx_lm_generate(loaded.model, loaded.tokenizer, text, max_tokens=max_tokens,
                           sampler=make_sampler(temp=temperature), verbose=False,
                           prompt_cache=generation_cache(loaded.model))
