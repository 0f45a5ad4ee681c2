"""The one thread that runs the model: requests in flight take turns, a few tokens each, and
the adapter is switched (pointers, no weights) between turns; the rest wait in line."""

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from mlx_lm import stream_generate
from mlx_lm.generate import wired_limit
from mlx_lm.sample_utils import make_sampler

from mlx_lora.serve.adapters import AdapterSet, request_cache, switch_to
from mlx_lora.serve.requests import Completion


@dataclass(frozen=True)
class Piece:
    """More text of the answer."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The answer is complete: why it ended ("stop" or "length") and the token counts."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The request failed while generating; the server goes on."""

    message: str


@dataclass
class Job:
    """A request handed to the worker; its answer arrives on `events`, Piece by Piece, then
    one Finished or Failed. Setting `cancelled` (the client left) drops it at its next turn."""

    request: Completion
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Running:
    job: Job
    responses: Iterator  # mlx_lm.stream_generate's, one per token
    text: str = ""  # generated so far
    sent: int = 0  # characters of text already sent (the rest may start a stop string)


@dataclass
class Scheduler:
    """The worker: admits up to max_concurrent jobs in arrival order and serves them in rounds,
    turn_tokens tokens per job per round (a fair queue, not a batched forward pass)."""

    adapters: AdapterSet
    max_concurrent: int
    turn_tokens: int
    inbox: queue.Queue = field(default_factory=queue.Queue)
    in_flight: int = 0
    peak_in_flight: int = 0
    _thread: threading.Thread | None = None

    def submit(self, request: Completion) -> Job:
        """Queue a request; returns the Job its answer comes out of."""
        job = Job(request)
        self.inbox.put(job)
        return job

    def start(self) -> None:
        """Run the worker thread."""
        self._thread = threading.Thread(target=self._run, name="mlx-lora-serve", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Let the worker finish its current turn and end."""
        self.inbox.put(None)
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        running: list[_Running] = []
        # Held for the thread's life, so the nested limits of interleaved generators (entered
        # and left out of order) always restore the same value (Metal; a no-op elsewhere).
        with wired_limit(self.adapters.loaded.model):
            while self._admit(running):
                self.in_flight = len(running)
                self.peak_in_flight = max(self.peak_in_flight, len(running))
                # The adapter in the model now goes first: at most one switch per adapter a round.
                active = self.adapters.active
                for item in sorted(running, key=lambda r: (r.job.request.adapter != active,
                                                           r.job.request.adapter or "")):
                    if self._turn(item):
                        running.remove(item)
                self.in_flight = len(running)
            for item in running:
                item.job.events.put(Failed("the server is shutting down"))

    def _admit(self, running: list[_Running]) -> bool:
        """Take waiting jobs while there is room (waiting for one when idle); False to stop."""
        while len(running) < self.max_concurrent:
            try:
                job = self.inbox.get(block=not running)
            except queue.Empty:
                break
            if job is None:
                return False
            if not job.cancelled.is_set():
                running.append(_Running(job, _responses(self.adapters, job.request)))
        return True

    def _turn(self, item: _Running) -> bool:
        """Up to turn_tokens tokens of one job with its adapter in; True when it is done."""
        if item.job.cancelled.is_set():
            item.responses.close()
            return True
        try:
            switch_to(self.adapters, item.job.request.adapter)
            for _ in range(self.turn_tokens):
                if _advance(item, next(item.responses)):
                    item.responses.close()
                    return True
        except Exception as e:  # e.g. a prompt the model cannot take: that request alone fails
            item.job.events.put(Failed(f"generation failed: {type(e).__name__}: {e}"))
            return True
        return False


def _responses(adapters: AdapterSet, request: Completion) -> Iterator:
    """mlx-lm's token-by-token generation of a request, as `mlx-lora generate` runs it; it
    starts (the prompt is processed) at its first turn."""
    loaded = adapters.loaded
    return stream_generate(loaded.model, loaded.tokenizer, request.prompt,
                           max_tokens=request.max_tokens,
                           sampler=make_sampler(temp=request.temp, top_p=request.top_p),
                           prompt_cache=request_cache(adapters, request.adapter))


def _advance(item: _Running, response) -> bool:
    """Take one token's response: send what is final, finish on a stop string, EOS or length."""
    job = item.job
    item.text += response.text
    cut, stopped = stop_cut(item.text, job.request.stop)
    done = stopped or response.finish_reason is not None
    if done:
        cut = cut if stopped else len(item.text)
    if cut > item.sent:
        job.events.put(Piece(item.text[item.sent:cut]))
        item.sent = cut
    if done:
        reason = "stop" if stopped else response.finish_reason
        job.events.put(Finished(reason, response.prompt_tokens, response.generation_tokens))
    return done


def stop_cut(text: str, stops: tuple[str, ...]) -> tuple[int, bool]:
    """(where the answer ends or what of it is final, whether a stop string ended it): the
    text before the first stop string, else all but a tail that may begin one."""
    hits = [i for stop in stops if (i := text.find(stop)) >= 0]
    if hits:
        return min(hits), True
    tail = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])),
               default=0)
    return len(text) - tail, False
