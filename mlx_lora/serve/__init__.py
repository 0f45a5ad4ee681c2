"""Serve one base model with many adapters over OpenAI's HTTP API (`mlx-lora serve`).

    from mlx_lora.serve import start_server
    with start_server("Qwen/Qwen2.5-0.5B-Instruct", {"sql": "adapters/sql"}) as server:
        ...  # openai.OpenAI(base_url=server.url, api_key="none"), model="sql" or the base's name
"""

from mlx_lora.serve.server import Server, start_server

__all__ = ["Server", "start_server"]
