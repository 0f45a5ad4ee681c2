"""Start and stop a server: the adapters loaded once, the worker, and the HTTP listener."""

import dataclasses
import ipaddress
import threading
from dataclasses import dataclass

from mlx_lora.config import ServeConfig
from mlx_lora.console import status
from mlx_lora.errors import UserError
from mlx_lora.serve.adapters import AdapterSet, load_adapter_set
from mlx_lora.serve.http import ApiServer
from mlx_lora.serve.worker import Scheduler


@dataclass
class Server:
    """A running server; close() (or leaving a with block) stops it."""

    http: ApiServer
    scheduler: Scheduler
    adapters: AdapterSet
    thread: threading.Thread

    @property
    def url(self) -> str:
        """The base URL an OpenAI client takes, e.g. http://127.0.0.1:8080/v1."""
        host, port = self.http.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/v1"

    def wait(self) -> None:
        """Serve until Ctrl-C, then stop."""
        try:
            while self.thread.is_alive():
                self.thread.join(timeout=1.0)
        except KeyboardInterrupt:
            status("stopping")
        finally:
            self.close()

    def close(self) -> None:
        """Stop listening, let the worker end, free the port."""
        self.http.shutdown()
        self.scheduler.stop()
        self.http.server_close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_server(model: str, adapters: dict[str, str] | None = None,
                 config: ServeConfig | None = None, trust_remote_code: bool = False,
                 **options) -> Server:
    """Load `model` once with every adapter ({name: directory}) and serve OpenAI's API in
    background threads; options are serve's flags (port=0: any free port), over `config`."""
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(ServeConfig)})
    if unknown:
        raise UserError(f"start_server: unknown option '{unknown[0]}' (the options are the "
                        "flags of mlx-lora serve --help)")
    config = dataclasses.replace(config or ServeConfig(), **options)
    check_config(config)
    adapter_set = load_adapter_set(model, adapters or {}, trust_remote_code)
    scheduler = Scheduler(adapter_set, config.max_concurrent, config.turn_tokens)
    try:
        http = ApiServer((config.host, config.port), adapter_set, scheduler, config)
    except OSError as e:
        raise UserError(f"cannot listen on {config.host}:{config.port} ({e.strerror or e}); "
                        "pick another --port (or --host)") from None
    scheduler.start()
    thread = threading.Thread(target=http.serve_forever, name="mlx-lora-http", daemon=True)
    thread.start()
    return Server(http, scheduler, adapter_set, thread)


def check_config(config: ServeConfig) -> None:
    """Refuse settings that cannot work, before anything loads."""
    checks = [
        (0 <= config.port <= 65535, f"--port must be 0 to 65535, got {config.port}"),
        (config.max_tokens >= 1, f"--max-tokens must be at least 1, got {config.max_tokens}"),
        (config.temp >= 0, f"--temp must not be negative, got {config.temp}"),
        (0 < config.top_p <= 1, f"--top-p must be in (0, 1], got {config.top_p}"),
        (config.max_concurrent >= 1,
         f"--max-concurrent must be at least 1, got {config.max_concurrent}"),
        (config.turn_tokens >= 1, f"--turn-tokens must be at least 1, got {config.turn_tokens}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if not config.api_key and not _is_loopback(config.host):
        status(f"note: listening on {config.host} without --api-key: anyone who can reach this "
               "port can use the model")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
