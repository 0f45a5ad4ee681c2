"""A training run from a resolved config: read data, load, adapt, decide, resume, fit, save."""

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.adapters import METHODS
from mlx_lora.adapters.inject import (
    adapted_blocks,
    inject,
    make_spec,
    parameter_counts,
    resolve_targets,
)
from mlx_lora.adapters.protocol import Hyper
from mlx_lora.config import TrainConfig, features, hub_splits, to_dict
from mlx_lora.data.columns import kinds_of
from mlx_lora.data.formats import describe
from mlx_lora.data.packing import decide_packing, packed_width, positions
from mlx_lora.data.records import plain_records
from mlx_lora.data.sources import hold_out_valid, read_splits
from mlx_lora.errors import UserError
from mlx_lora.forgetting import (
    MAX_TRAINING_TOKENS,
    general_examples,
    general_probe,
    read_general,
    target_tokens,
)
from mlx_lora.formats.mlx_lm_adapter import load_adapter_weights
from mlx_lora.formats.output_dir import check_writable, claim_run_dir, exclusive
from mlx_lora.model.allocator import reuse_freed_memory
from mlx_lora.model.blas import slow_blas_warning
from mlx_lora.model.blockwise_attention import choose_attention
from mlx_lora.model.head import find_head
from mlx_lora.model.load import (
    LoadedModel,
    frozen_base,
    load_base,
    load_tokenizer_only,
    vocab_rows,
)
from mlx_lora.model.prefix_cache import init_ids
from mlx_lora.model.probe import probe_model
from mlx_lora.model.qmatmul import choose_matmul, quantized_again
from mlx_lora.model.recompute import checkpoint_blocks
from mlx_lora.objectives import OBJECTIVES
from mlx_lora.objectives.chunked_ce import chunk_size
from mlx_lora.train.checkpoint import CHECKPOINTS, Position, list_checkpoints, resume_position
from mlx_lora.train.checks import (
    blockwise_ruled_out,
    check_method,
    check_ranks,
    check_resume,
    check_template,
    warnings,
    with_run_defaults,
)
from mlx_lora.train.distributed import (
    Ranks,
    broadcast,
    check_same_inputs,
    join_ranks,
    ranked,
    ranks_line,
)
from mlx_lora.train.loop import Trainee, fit, total_steps
from mlx_lora.train.memory_guard import resolve_limit
from mlx_lora.train.optim import init_state, optimizer_for, state_line
from mlx_lora.train.report import BEST_DIR, Callback, RunReport
from mlx_lora.train.step import make_eval_step
from mlx_lora.train.trackers import check_installed
from mlx_lora.train.validation import evaluate_split, stats_text


@dataclass(frozen=True)
class TrainResult:
    """How a run ended and where its output is."""

    adapter_dir: Path
    step: int
    finished: bool  # False when Ctrl-C or a stop request ended it (a checkpoint was saved)
    best_val_loss: float | None
    best_step: int | None
    loaded: LoadedModel  # the base with the trained adapters in, for evaluation and generation
    rank: int = 0  # of the processes that trained together; rank 0 wrote the files


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False, *, data=None,
          base: tuple | None = None, callback: Callback | None = None, stop=None) -> TrainResult:
    """Run training as `config` says.

    data: records in memory instead of config.data (see data.sources.read_splits); base: an
    already-loaded (model, tokenizer) instead of config.model; callback: gets every metrics
    event as a dict; stop: a threading.Event that ends training after the current step,
    with a checkpoint saved, as Ctrl-C does. Started by mlx.launch, each process trains on
    its share of every batch (train.distributed); rank 0 alone reads and writes adapter_path.
    """
    mx.reset_peak_memory()  # peak_memory_gb is this run's, loading included, not the process's
    ranks = join_ranks()
    check_method(config)
    check_ranks(config, ranks.size)
    if ranks.writes:
        check_writable(config.adapter_path, "--adapter-path")
        check_installed(config.report_to)  # a missing tracker library fails before any loading
    adapter_dir = Path(config.adapter_path)
    with exclusive(adapter_dir, "mlx-lora train") if ranks.writes else nullcontext():
        if ranks.writes:
            claim_run_dir(adapter_dir, resume, overwrite)
        if resume and ranks.writes:
            config = with_run_defaults(adapter_dir, config)
            check_resume(adapter_dir, config)
        if ranks.size > 1:  # every rank runs as rank 0 resolved it
            config = TrainConfig(**broadcast(ranks, to_dict(config)))
        objective = ranked(OBJECTIVES[config.train_mode](config), ranks)
        with RunReport(adapter_dir, config.model, callback, writes=ranks.writes,
                       unit=objective.unit) as report:
            return _train(config, objective, report, resume, data, base, stop, ranks)


def _train(config: TrainConfig, objective, report: RunReport, resume: bool, data,
           base: tuple | None, stop, ranks: Ranks) -> TrainResult:
    adapter_dir = Path(config.adapter_path)
    reuse_freed_memory()
    if warning := slow_blas_warning():
        report.say(warning)
    splits = _read_data(config, data, report)
    general = read_general(config.general_data) if config.general_data else None
    given = frozen_base(*base, {}, None, config.quantize, config.group_size,
                        "the given model") if base else None
    tokenizer = given.tokenizer if given else load_tokenizer_only(config.model,
                                                                   config.trust_remote_code)
    kinds = set().union(*(kinds_of(plain_records(split_records))
                          for _, split_records in splits.values()))
    check_template(tokenizer, kinds, config.model)
    general_set = _general_set(config, general, tokenizer, report)
    wanted = ("train", "valid", "test") if config.test else ("train", "valid")
    examples = {split: objective.examples(split_records, tokenizer, config, name)
                for split, (name, split_records) in splits.items() if split in wanted}
    loaded = given or load_base(config.model, quantize=config.quantize,
                                group_size=config.group_size,
                                trust_remote_code=config.trust_remote_code, tokenizer=tokenizer)
    context = getattr(getattr(loaded.model, "args", None), "max_position_embeddings", None)
    for line in warnings(config, tokenizer, kinds, context):
        report.say(line)
    train_set, valid_set = examples["train"], examples.get("valid", [])
    trainee, config = _prepare(loaded.model, objective, config, train_set, report,
                               loaded.tokenizer)
    trainee.ranks = ranks
    check_same_inputs(ranks, examples, trainee.model)
    if general_set:
        trainee.general = general_probe(trainee.model, trainee.split, general_set, config)
    steps = total_steps(config, len(train_set))
    examples, prepared = _objective_prepare(trainee, config, examples, steps)
    train_set, valid_set = examples["train"], examples.get("valid", [])
    optimizer = optimizer_for(config, steps, trainee.model, ranks)
    position, resumed = (resume_position(adapter_dir, trainee.model, optimizer, ranks)
                         if resume else (Position(), None))
    init_state(optimizer, trainee.model)
    memory_limit, memory_line = resolve_limit(config.memory_limit)
    config = dataclasses.replace(config, memory_limit=memory_limit)  # recorded as it applies
    report.start(to_dict(config), position)
    for line in (resumed, ranks_line(config, ranks),
                 state_line(config, optimizer, trainee.model, ranks), memory_line):
        if line:
            report.say(line)
    if objective.prepare:
        report.event({"event": "prepare", "step": position.step, "objective": objective.name,
                      "elapsed_s": round(prepared, 3)})
    what = "pairs" if objective.unit == "pairs" else "examples"
    report.say(f"training {steps} steps on {len(train_set)} {what} "
               f"({len(valid_set)} for validation) into {adapter_dir}")
    finished = fit(trainee, optimizer, config, train_set, valid_set, position, stop)
    loaded.model.eval()
    result = TrainResult(adapter_dir, position.step, finished, position.best_val_loss,
                         position.best_step, loaded, ranks.rank)
    if finished:
        _finish(trainee, config, position, bool(valid_set))
        if config.test:
            _test(trainee, config, examples["test"])
    quantized_again(loaded.model)  # generation's few rows per call: MLX's quantized matmul
    return result


def _read_data(config: TrainConfig, data, report: RunReport) -> dict:
    """Every split's records, each file said in a line; a valid split held out if none."""
    splits = read_splits(config.data if data is None else data, features(config),
                         hub_splits(config))
    for name, split_records in splits.values():
        report.say(describe(name, split_records))
    splits, held_out = hold_out_valid(splits, config.valid_fraction, config.batch_size,
                                      config.seed)
    if held_out:
        report.say(held_out)
    if config.test and "test" not in splits:
        raise UserError("--test needs a test split (test.jsonl beside train.jsonl)")
    return splits


def _general_set(config: TrainConfig, general, tokenizer, report: RunReport) -> list | None:
    """The forgetting probe's general text, tokenized once (None when off)."""
    if general is None:
        return None
    name, records = general
    examples = general_examples(name, records, tokenizer, config.max_seq_length,
                                MAX_TRAINING_TOKENS)
    report.say(f"forgetting probe: the loss on {target_tokens(examples):,} tokens of "
               f"{config.general_data} general text at every evaluation")
    return examples


def _prepare(model: nn.Module, objective, config: TrainConfig, train_set: list,
             report: RunReport, tokenizer) -> tuple[Trainee, TrainConfig]:
    """Inject adapters, probe the model once, decide packing; the config as it really runs."""
    mx.random.seed(config.seed)
    hyper = Hyper(config.rank, config.alpha, config.dropout, config.rslora, config.init,
                  adapter_variant=config.adapter_variant, adapter_size=config.adapter_size,
                  **_virtual_hyper(config, tokenizer))
    targets = resolve_targets(model, config.fine_tune_type, config.targets)
    config = dataclasses.replace(config, targets=targets)  # recorded as what really happens
    started = time.perf_counter()
    spec = make_spec(model, config.fine_tune_type, targets, config.num_layers, hyper,
                     config.train_embeddings)
    inject(model, spec)
    report.spec = spec
    if spec.table.place is not None:  # the size as it really is, said and recorded
        hyper = spec.hyper
        config = dataclasses.replace(config, adapter_size=hyper.adapter_size)
        report.say(f"adapter: {hyper.adapter_variant} bottleneck adapters, {hyper.hidden_size} -> "
                   f"{hyper.adapter_size} -> {hyper.hidden_size}, around {len(spec.paths)} modules")
    if config.init == "pissa":
        report.say(f"pissa: lora_a, lora_b of {len(spec.paths)} layers from their weights' SVD "
                   f"(on the CPU) in {time.perf_counter() - started:.1f}s")
    if config.resume_adapter_file:
        load_adapter_weights(model, Path(config.resume_adapter_file))
        report.say(f"starting from the adapter weights in {config.resume_adapter_file}")
    config = _qlora_matmul(model, config, report)  # before the probe: its split sees the path
    probe = probe_model(model, packing=config.pack)
    if note := probe.loss_note():
        report.say(note)
    if spec.table.virtual is not None:
        # A row has one set of virtual tokens at its start, and one RoPE offset for all of it.
        pack, line = False, (f"packing: off ({spec.method} tuning puts its virtual tokens "
                             "before each row, not before each sequence packed into one)")
    elif objective.packable:
        pack, line = decide_packing(config.pack, probe.packing_problem, positions(train_set),
                                    config.batch_size, config.max_seq_length, config.seed)
    else:
        pack, line = False, f"packing: off ({objective.name} batches whole pairs)"
    report.say(line)
    config = dataclasses.replace(config, pack=pack)  # recorded as what really happens
    if config.grad_checkpoint:
        checkpoint_blocks([model.layers[i] for i in adapted_blocks(model, spec.paths)])
    # Pairs (not packable) are padded per batch: their rows reach max_seq_length at most.
    longest_row = (packed_width(positions(train_set), config.max_seq_length)
                   if objective.packable else config.max_seq_length)
    config = _attention(model, spec, config, report, longest_row)
    trainable, total = parameter_counts(model)
    what = "adapted layers" if spec.table.own_weights is None else "trained modules"
    where = (f"{spec.hyper.virtual_tokens} virtual tokens" if spec.table.virtual else
             f"{len(spec.paths)} {what}")
    report.say(f"trainable parameters: {trainable:,} of {total:,} "
               f"({100 * trainable / total:.3f}%) in {where}")
    # Only a token loss has a uniform-output value (ln vocabulary) to recognize divergence by.
    vocab = vocab_rows(model) if objective.unit == "tokens" else None
    return Trainee(model, objective, probe.split, pack, report, vocab), config


def _attention(model: nn.Module, spec, config: TrainConfig, report: RunReport,
               longest_row: int) -> TrainConfig:
    """Blockwise or fused attention in every block a gradient goes through (from the first
    adapted one, or all with trained embeddings); said, and recorded as it runs.

    longest_row: the widest row the run makes (its longest record, at most max_seq_length),
    which is what decides whether the scores weigh enough to pay for the recompute."""
    adapted = adapted_blocks(model, spec.paths)
    first = 0 if config.train_embeddings else (adapted or [len(model.layers)])[0]
    attention, line = choose_attention(model, list(model.layers)[first:], config.attention,
                                       longest_row, config.pack,
                                       blockwise_ruled_out(config))
    report.say(line)
    return dataclasses.replace(config, attention=attention)


def _qlora_matmul(model: nn.Module, config: TrainConfig, report: RunReport) -> TrainConfig:
    """Put each frozen quantized layer on its matmul path (qmatmul.py), for a step's rows at
    most and the loss's chunks through the head; said, and recorded as it runs."""
    choice = choose_matmul(model, config.qlora_matmul, config.batch_size * config.max_seq_length,
                           find_head(model)[0], chunk_size(vocab_rows(model) or 1))
    if choice.line:
        report.say(choice.line)
    return dataclasses.replace(config, qlora_matmul=choice.setting)


def _virtual_hyper(config: TrainConfig, tokenizer) -> dict:
    """Prompt and prefix tuning's Hyper fields: how many virtual tokens, and the tokens they
    start as (--prompt-init-text's; none: random ones)."""
    if METHODS[config.fine_tune_type].virtual is None:
        return {}
    text, count = config.prompt_init_text, config.num_virtual_tokens
    return {"virtual_tokens": count,
            "init_ids": init_ids(tokenizer, text, count) if text else ()}


def _objective_prepare(trainee: Trainee, config: TrainConfig, examples: dict,
                       steps: int) -> tuple[dict, float]:
    """The examples as the objective prepares them from the model as it starts (before any
    checkpoint loads), for the batches the run reads; and the seconds it took."""
    started = time.perf_counter()
    prepare = trainee.objective.prepare
    if prepare is None:
        return examples, 0.0
    reads = {"train": (config, steps * config.grad_accumulation_steps), "valid": (config, None),
             "test": (dataclasses.replace(config, val_batches=config.test_batches), None)}
    prepared = {split: prepare(trainee.model, trainee.split, split_set, *reads[split])
                for split, split_set in examples.items()}
    return prepared, time.perf_counter() - started


def _finish(trainee: Trainee, config: TrainConfig, position: Position, validated: bool) -> None:
    report = trainee.report
    report.save_adapters(trainee.model)
    report.done(position)
    report.say(f"done: the last adapters (step {position.step}) are in {report.adapter_dir}")
    if validated and config.keep_best:
        report.say(f"the best adapters (validation loss {position.best_val_loss:.4f} at step "
                   f"{position.best_step}) are in {report.adapter_dir / BEST_DIR}")


def _test(trainee: Trainee, config: TrainConfig, test_set: list) -> None:
    """--test: the loss on the test split after training, as mlx-lm's lora --test reports it."""
    model, objective = trainee.model, trainee.objective
    eval_step = make_eval_step(model, objective.make_loss(model, trainee.split, with_grad=False))
    model.eval()
    loss, stats = evaluate_split(objective, eval_step, test_set,
                                 dataclasses.replace(config, val_batches=config.test_batches),
                                 trainee.ranks)
    trainee.report.say(f"test loss {loss:.4f}, perplexity {math.exp(min(loss, 700)):.3f}"
                       if objective.unit == "tokens" else
                       f"test loss {loss:.4f}{stats_text(stats)}")


def interrupted_message(result: TrainResult) -> str:
    """What to tell the person after Ctrl-C or a stop request."""
    checkpoints = list_checkpoints(result.adapter_dir)
    where = checkpoints[-1] if checkpoints else result.adapter_dir / CHECKPOINTS
    return (f"interrupted after step {result.step}: saved {where}; "
            "run the same command with --resume to continue")
