"""`mlx-lora serve` end to end through the official openai client over 127.0.0.1: each model
name answers as `mlx-lora generate` with that adapter does, and nothing is reloaded to switch."""

import dataclasses
import http.client
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import mlx.nn as nn
import pytest
import yaml
from click.testing import CliRunner
from helpers import make_adapter

from mlx_lora.adapters import METHODS
from mlx_lora.cli import cli
from mlx_lora.config import ServeConfig, TrainConfig, to_dict
from mlx_lora.demo.tiny import make_tiny_model
from mlx_lora.formats.convert import export_adapter
from mlx_lora.generate import complete, format_prompt
from mlx_lora.model.adapted import load_adapted
from mlx_lora.serve import start_server

openai = pytest.importorskip("openai")  # the test extra installs it

PROMPT = "the cat sat on the"
TOKENS = 24


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    """Four adapters of the tiny llama: LoRA on all linears, LoRA on q/v only, DoRA, and the
    first one converted to PEFT's format."""
    root = tmp_path_factory.mktemp("serve_adapters")
    dirs = {"all": make_adapter(tiny_llama, root / "all", seed=1),
            "qv": make_adapter(tiny_llama, root / "qv", targets="q_proj,v_proj", seed=2),
            "dora": make_adapter(tiny_llama, root / "dora", method="dora", seed=3)}
    export_adapter(dirs["all"], "peft", root / "peft")
    return {**{name: str(d) for name, d in dirs.items()}, "peft": str(root / "peft")}


@pytest.fixture(scope="module")
def server(tiny_llama, adapters):
    with start_server(str(tiny_llama), adapters, port=0) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_llama, adapters):
    """What `mlx-lora generate` gives, each adapter loaded the normal way (cached per case)."""
    cache, models = {}, {}

    def generate(name: str, prompt=PROMPT, max_tokens=TOKENS, chat=True) -> str:
        key = (name, prompt, max_tokens, chat)
        if key not in cache:
            if name not in models:
                models[name] = load_adapted(str(tiny_llama), adapters.get(name))[0]
            cache[key] = complete(models[name], prompt, max_tokens=max_tokens, chat=chat)
        return cache[key]

    return generate


def chat(client, model, prompt=PROMPT, **options):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], **options)


def test_models_lists_the_base_and_each_adapter(client, tiny_llama, adapters):
    assert [m.id for m in client.models.list()] == [str(tiny_llama), *adapters]
    assert client.models.retrieve("qv").id == "qv"


@pytest.mark.parametrize("name", ["all", "qv", "dora", "peft", "base", "(model path)"])
def test_greedy_chat_equals_generate(client, reference, tiny_llama, name):
    model = str(tiny_llama) if name == "(model path)" else name
    answer = chat(client, model, max_tokens=TOKENS)
    expected = reference(None if name in ("base", "(model path)") else name)
    assert answer.choices[0].message.content == expected
    assert answer.model == model and answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == TOKENS


def test_adapters_really_differ(reference):
    # Otherwise the equalities above would hold for a server that ignores "model".
    answers = [reference(name) for name in ("all", "qv", "dora", None)]
    assert len(set(answers)) == 4
    assert reference("peft") == reference("all")  # the same weights in PEFT's format


def test_the_cli_generate_gives_the_same_text(client, tiny_llama, adapters):
    result = CliRunner().invoke(cli, ["generate", "--model", str(tiny_llama), "--adapter-path",
                                      adapters["dora"], "--prompt", PROMPT, "--max-tokens",
                                      str(TOKENS)])
    assert result.exit_code == 0, result.output
    answer = chat(client, "dora", max_tokens=TOKENS).choices[0].message.content
    assert result.stdout == answer + "\n"


def test_usage_counts_the_templated_prompt(client, server):
    tokenizer = server.adapters.loaded.tokenizer
    answer = chat(client, "all", max_tokens=3)
    prompt_ids = tokenizer.encode(format_prompt(tokenizer, PROMPT, chat=True),
                                  add_special_tokens=False)
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.usage.total_tokens == len(prompt_ids) + 3


@pytest.mark.parametrize("name", ["qv", "base"])
def test_text_completion_and_streams_equal_generate(client, reference, name):
    expected = reference(None if name == "base" else name, chat=False)
    answer = client.completions.create(model=name, prompt=PROMPT, max_tokens=TOKENS)
    assert answer.choices[0].text == expected
    stream = client.completions.create(model=name, prompt=PROMPT, max_tokens=TOKENS,
                                       stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == expected
    chunks = list(chat(client, name, max_tokens=TOKENS, stream=True,
                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference(None if name == "base" else name)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == TOKENS


def test_stop_strings_end_the_answer_streamed_or_not(client, reference):
    full = reference("all", max_tokens=60)
    stop = full[20:23]
    expected = full[:full.index(stop)]
    answer = chat(client, "all", max_tokens=60, stop=[stop, "never appears"])
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"
    streamed = chat(client, "all", max_tokens=60, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected


def test_top_p_tiny_samples_the_greedy_token(client, reference):
    # top_p near 0 leaves only the most likely token, so sampling at temperature 1 is greedy.
    answer = chat(client, "qv", max_tokens=TOKENS, temperature=1.0, top_p=1e-9)
    assert answer.choices[0].message.content == reference("qv")
    sampled = chat(client, "qv", max_tokens=TOKENS, temperature=1.5)
    assert sampled.usage.completion_tokens <= TOKENS


def test_requests_for_different_adapters_run_together(client, server, reference):
    long_tokens = 400
    expected_long = reference("all", max_tokens=long_tokens)
    switches = server.adapters.switches
    stream = iter(chat(client, "all", max_tokens=long_tokens, stream=True))
    first = [next(stream)]  # the long request is in flight now
    with ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(chat, client, name, max_tokens=TOKENS)
                   for name in ("qv", "dora", "base")}
        answers = {name: f.result().choices[0].message.content for name, f in futures.items()}
    rest = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in first + rest)
    assert text == expected_long
    for name, answer in answers.items():
        assert answer == reference(None if name == "base" else name), name
    assert server.scheduler.peak_in_flight >= 2
    # Taking turns token by token switches adapters many times; one after another would not.
    assert server.adapters.switches - switches > 2 * TOKENS


def raw(server, method: str, path: str, body=None, headers=None):
    """(status, parsed JSON) of one plain HTTP request, bodies sent as given."""
    address = urlsplit(server.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    connection.request(method, path, body=data, headers=headers or {})
    response = connection.getresponse()
    status, payload = response.status, response.read()
    connection.close()
    return status, json.loads(payload)


MESSAGES = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = {
    "not JSON": (b"{not json", 400, None),
    "a JSON array": ([1, 2], 400, None),
    "unknown model": ({"model": "nope", "messages": MESSAGES}, 404, "model"),
    "model a number": ({"model": 3, "messages": MESSAGES}, 400, "model"),
    "no messages": ({"model": "all"}, 400, "messages"),
    "content a number": ({"model": "all", "messages": [{"role": "user", "content": 5}]},
                         400, "messages[0].content"),
    "message a string": ({"model": "all", "messages": ["hi"]}, 400, "messages[0]"),
    "max_tokens a string": ({"model": "all", "messages": MESSAGES, "max_tokens": "ten"},
                            400, "max_tokens"),
    "max_tokens zero": ({"model": "all", "messages": MESSAGES, "max_tokens": 0}, 400,
                        "max_tokens"),
    "temperature a boolean": ({"model": "all", "messages": MESSAGES, "temperature": True},
                              400, "temperature"),
    "top_p above 1": ({"model": "all", "messages": MESSAGES, "top_p": 2}, 400, "top_p"),
    "stop a number": ({"model": "all", "messages": MESSAGES, "stop": [1]}, 400, "stop"),
    "stream a string": ({"model": "all", "messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    "n of 2": ({"model": "all", "messages": MESSAGES, "n": 2}, 400, "n"),
}


@pytest.mark.parametrize("body, status, param", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_gets_a_json_error_and_the_server_goes_on(server, client, reference, body,
                                                              status, param):
    code, payload = raw(server, "POST", "/v1/chat/completions", body,
                        {"Content-Type": "application/json"})
    assert code == status
    assert payload["error"]["type"] == "invalid_request_error" and payload["error"]["message"]
    assert payload["error"]["param"] == param
    assert chat(client, "qv", max_tokens=TOKENS).choices[0].message.content == reference("qv")


def test_bad_text_prompt_and_routes(server):
    assert raw(server, "POST", "/v1/completions", {"model": "all", "prompt": 7})[0] == 400
    assert raw(server, "POST", "/v1/completions", {"model": "all", "prompt": ""})[0] == 400
    assert raw(server, "POST", "/v1/embeddings", {"model": "all"})[0] == 404
    assert raw(server, "GET", "/v1/nothing")[0] == 404
    assert raw(server, "DELETE", "/v1/models")[0] == 405
    assert raw(server, "GET", "/v1/models/nope")[0] == 404
    assert raw(server, "GET", "/health") == (200, {"status": "ok", "in_flight": 0, "waiting": 0})


def test_the_openai_client_sees_the_errors_as_its_own(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        chat(client, "nope")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        chat(client, "all", max_tokens=-1)


def test_a_client_that_leaves_mid_stream_stops_its_generation(client, server):
    stream = chat(client, "all", max_tokens=100_000, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 20
    while raw(server, "GET", "/health")[1]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert raw(server, "GET", "/health")[1]["in_flight"] == 0


def test_switching_reloads_nothing(tiny_llama, adapters, reference, tmp_path):
    """Every adapter wraps the base's own modules, and the files can go once it has started."""
    model_dir = shutil.copytree(tiny_llama, tmp_path / "model")
    copies = {name: shutil.copytree(d, tmp_path / name) for name, d in adapters.items()}
    with start_server(str(model_dir), {n: str(d) for n, d in copies.items()},
                      port=0) as running:
        net = running.adapters.loaded.model
        base = {p: m for p, m in net.named_modules() if isinstance(m, nn.Linear)}
        weights = {p: m.weight for p, m in base.items()}
        shutil.rmtree(model_dir)
        for directory in copies.values():
            shutil.rmtree(directory)
        client = openai.OpenAI(base_url=running.url, api_key="unused", max_retries=0)
        for name in ("all", "qv", "dora", "all", "base"):
            answer = chat(client, name, max_tokens=TOKENS).choices[0].message.content
            assert answer == reference(None if name == "base" else name), name
        for layers in running.adapters.layers.values():
            assert all(layer.linear is base[path] for path, layer in layers)
        assert running.adapters.active is None  # the last request was the base's
        now = {p: m for p, m in net.named_modules() if isinstance(m, nn.Linear)}
        assert now.keys() == base.keys()
        assert all(now[p] is base[p] and now[p].weight is weights[p] for p in base)


def qlora_adapter(tiny_llama, adapter_dir):
    """An adapter that says it was trained on a 4-bit base (as a QLoRA run's config.yaml does)."""
    make_adapter(tiny_llama, adapter_dir, targets="q_proj,v_proj", seed=5)
    run = TrainConfig(model=str(tiny_llama), quantize=4, adapter_path=str(adapter_dir))
    (adapter_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(run)))
    return str(adapter_dir)


def test_qlora_adapters_get_the_base_quantized_as_in_training(tiny_llama, tmp_path):
    q1, q2 = (qlora_adapter(tiny_llama, tmp_path / name) for name in ("q1", "q2"))
    with start_server(str(tiny_llama), {"q1": q1, "q2": q2}, port=0) as running:
        assert running.adapters.loaded.quantization["bits"] == 4
        client = openai.OpenAI(base_url=running.url, api_key="unused", max_retries=0)
        for name, directory in (("q1", q1), ("q2", q2)):
            expected = complete(load_adapted(str(tiny_llama), directory)[0], PROMPT,
                                max_tokens=TOKENS)
            assert chat(client, name, max_tokens=TOKENS).choices[0].message.content == expected


def test_adapters_for_differently_quantized_bases_are_refused(tiny_llama, adapters, tmp_path):
    code, output = serve("--model", tiny_llama, "--adapter", f"qv={adapters['qv']}",
                         "--adapter", f"q={qlora_adapter(tiny_llama, tmp_path / 'q')}")
    assert_one_error_line(code, output, "trained on differently quantized bases (qv: float, "
                          "q: 4-bit)")


def test_api_key_is_required_when_set(tiny_llama, adapters):
    with start_server(str(tiny_llama), {"qv": adapters["qv"]}, port=0,
                      api_key="secret") as running:
        wrong = openai.OpenAI(base_url=running.url, api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            chat(wrong, "qv", max_tokens=2)
        right = openai.OpenAI(base_url=running.url, api_key="secret", max_retries=0)
        assert chat(right, "qv", max_tokens=2).usage.completion_tokens == 2


def serve(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["serve", *[str(a) for a in args]])
    return result.exit_code, result.output


def assert_one_error_line(code: int, output: str, expected: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output
    assert output.count("\n") == 1 and output.startswith("error: "), output
    assert expected in output, output


def test_an_adapter_that_does_not_fit_is_refused_at_start(tiny_llama, adapters, tmp_path):
    other = make_tiny_model(tmp_path / "other", hidden_size=128, num_layers=1)
    code, output = serve("--model", other, "--adapter", f"qv={adapters['qv']}", "--port", 0)
    assert_one_error_line(code, output, "adapter 'qv': ")
    assert "was the adapter trained on another base model" in output


def test_a_full_fine_tune_is_refused_at_start(tiny_llama, adapters, tmp_path):
    if "full" not in METHODS:
        pytest.skip("no full fine-tuning method in this tree")
    full = make_adapter(tiny_llama, tmp_path / "full", method="full", num_layers=1)
    code, output = serve("--model", tiny_llama, "--adapter", f"qv={adapters['qv']}",
                         "--adapter", f"full={full}", "--port", 0)
    assert_one_error_line(code, output, "adapter 'full': ")
    assert "replaces the base's own weights" in output


@pytest.mark.parametrize("flag, expected", [
    ("qv", "expected NAME=DIR"),
    ("base=somewhere", "cannot be a model name"),
    ("x=/no/such/dir", "adapter 'x': /no/such/dir: no such adapter directory"),
])
def test_bad_adapter_flags_are_one_line_errors(tiny_llama, flag, expected):
    assert_one_error_line(*serve("--model", tiny_llama, "--adapter", flag), expected)


def test_bad_settings_and_a_taken_port_are_one_line_errors(tiny_llama, server):
    assert_one_error_line(*serve("--model", tiny_llama, "--top-p", 0), "--top-p must be in")
    port = urlsplit(server.url).port
    assert_one_error_line(*serve("--model", tiny_llama, "--port", port), "cannot listen on")


def test_help_lists_every_option_with_its_default():
    result = CliRunner().invoke(cli, ["serve", "--help"])
    text = " ".join(result.output.split())
    for field in dataclasses.fields(ServeConfig):
        assert "--" + field.name.replace("_", "-") in text
    assert "--adapter NAME=DIR" in text and "--trust-remote-code" in text
    assert "[default: '127.0.0.1']" in text and "[default: 8080]" in text
