"""8-bit Adam: the code, block-wise quantization, the update against 32-bit AdamW, resume."""


import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from helpers import assert_resume_equals_uninterrupted
from mlx.utils import tree_flatten, tree_map

from mlx_lora.config import TrainConfig
from mlx_lora.errors import UserError
from mlx_lora.train.adam8bit import (
    BLOCK,
    SIGNED,
    UNSIGNED,
    Adam8bit,
    dequantize,
    dynamic_code,
    nearest,
    quantize,
)
from mlx_lora.train.optim import build_optimizer, state_bytes
from mlx_lora.train.run import train


@pytest.mark.parametrize("signed", [True, False])
def test_the_code_is_sorted_and_spans_seven_decades_and_more(signed):
    code = dynamic_code(signed)
    assert code.shape == (256,) and np.all(np.diff(code) >= 0)
    assert code[-1] == 1.0 and 0.0 in code and (code[0] == -1.0 if signed else code[0] == 0.0)
    smallest = code[code > 0].min()
    assert smallest == pytest.approx(1e-6 if signed else 1e-7)
    # In the top decade a value is within 0.8% (signed) of the nearest code value.
    top = code[code >= 0.1]
    assert np.diff(top).max() / 2 <= (0.008 if signed else 0.004)


@pytest.mark.parametrize("code", [SIGNED, UNSIGNED], ids=["signed", "unsigned"])
def test_nearest_is_the_nearest_code_value(code):
    low = float(code[0].item())
    x = mx.random.uniform(low, 1.0, (4000,), key=mx.random.key(0)) ** 3  # many small values
    if low < 0:
        x = x * mx.sign(mx.random.normal((4000,), key=mx.random.key(1)))
    brute = mx.argmin(mx.abs(x[:, None] - code[None, :]), axis=1)
    found = nearest(x, code)
    assert mx.all(mx.abs(code[found] - x) <= mx.abs(code[brute] - x)).item()


def test_blocks_keep_their_own_scale_and_small_values():
    # One block of large values, one of tiny ones; a block-free code would zero the second.
    x = mx.concatenate([mx.random.normal((BLOCK,), key=mx.random.key(2)) * 1e3,
                        mx.random.normal((BLOCK - 7,), key=mx.random.key(3)) * 1e-5])
    codes, scales = quantize(x, SIGNED)
    assert codes.dtype == mx.uint8 and codes.shape == (2, BLOCK) and scales.shape == (2,)
    back = dequantize(codes, scales, SIGNED, x.shape)
    relative = mx.abs(back - x) / mx.abs(x)
    big = mx.abs(x) >= 0.1 * mx.concatenate([mx.full((BLOCK,), scales[0]),
                                             mx.full((BLOCK - 7,), scales[1])])
    assert mx.max(mx.where(big, relative, 0)).item() <= 0.08  # top decade: 64 values
    assert mx.all(back != 0).item()  # nothing of either block rounds to zero
    zeros = mx.zeros((300,))
    assert mx.all(dequantize(*quantize(zeros, UNSIGNED), UNSIGNED, zeros.shape) == 0).item()


def params_and_grads(seed: int):
    key = mx.random.key(seed)
    shapes = {"a": (64, 8), "b": (8, 300), "c": (7,)}
    keys = iter(mx.random.split(key, len(shapes)))
    return {name: mx.random.normal(shape, key=next(keys)) for name, shape in shapes.items()}


def run_steps(optimizer, steps: int):
    params = params_and_grads(0)
    optimizer.init(params)
    trajectory = []
    for step in range(steps):
        grads = tree_map(lambda g, k=1 + step: g * k, params_and_grads(10 + step))
        params = optimizer.apply_gradients(grads, params)
        mx.eval(params, optimizer.state)
        trajectory.append(params)
    return trajectory


def test_first_update_is_adamw_and_later_ones_stay_close():
    settings = dict(learning_rate=1e-2, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.1,
                    bias_correction=True)
    exact = run_steps(optim.AdamW(**settings), 20)
    eight = run_steps(Adam8bit(**settings), 20)
    for name in exact[0]:  # moments start at zero, which 8 bits hold exactly
        assert mx.array_equal(exact[0][name], eight[0][name]).item(), name
    start = params_and_grads(0)
    for name in exact[-1]:  # after 20 steps, within 3% of how far AdamW moved each tensor
        moved = mx.abs(exact[-1][name] - start[name]).mean().item()
        apart = mx.abs(exact[-1][name] - eight[-1][name]).mean().item()
        assert apart <= 0.03 * moved, name  # measured 1.2%, 1.2%, 2.1%


def test_state_is_a_quarter_of_adams():
    params = {"w": mx.zeros((4096, 64)), "b": mx.zeros((64,))}
    config = TrainConfig(optimizer="adamw-8bit")
    eight, full = build_optimizer(config, 10), optim.AdamW(learning_rate=1e-3)
    eight.init(params)
    full.init(params)
    per_element = state_bytes(eight) / (4096 * 64 + 64)
    assert per_element == pytest.approx(2 + 2 * 4 / BLOCK, rel=0.02)  # two codes, two scales
    assert state_bytes(eight) / state_bytes(full) == pytest.approx(0.254, abs=0.005)
    kinds = {key.rsplit(".", 1)[-1]: value.dtype for key, value in tree_flatten(eight.state)}
    assert kinds["m_codes"] == kinds["sqrt_v_codes"] == mx.uint8
    assert kinds["m_scales"] == kinds["sqrt_v_scales"] == mx.float32


def test_adam_8bit_is_adamw_8bit_without_decay():
    config = TrainConfig(optimizer="adam-8bit")
    assert isinstance(build_optimizer(config, 10), Adam8bit)
    assert build_optimizer(config, 10).weight_decay == 0.0
    with pytest.raises(UserError, match="weight_decay needs optimizer adamw"):
        from mlx_lora.config import build_config
        build_config({}, {"optimizer": "adam-8bit", "weight_decay": 0.1}, "test")


@pytest.mark.parametrize("lora_plus", [0.0, 4.0], ids=["adamw-8bit", "with LoRA+"])
def test_resume_is_exact_and_the_checkpoint_holds_codes(tiny_llama, data, tmp_path, lora_plus):
    settings = dict(iters=8, batch_size=4, learning_rate=5e-3, save_every=2, steps_per_eval=4,
                    steps_per_report=1,
                    optimizer="adamw-8bit", weight_decay=0.01, lora_plus_ratio=lora_plus)
    assert_resume_equals_uninterrupted(tiny_llama, str(data), tmp_path, 3, **settings)
    checkpoint = sorted((tmp_path / "whole" / "checkpoints").iterdir())[-1]
    state = mx.load(str(checkpoint / "optimizer.safetensors"))
    assert {v.dtype for k, v in state.items() if k.endswith("_codes")} == {mx.uint8}
    assert not any(k.endswith((".m", ".v")) for k in state)


class Adam8bitOfV(Adam8bit):
    """The same, but with the second moment stored as itself: the linear-in-v way."""

    def apply_single(self, gradient, parameter, state):
        shape = parameter.shape
        moments = {"m": dequantize(state["m_codes"], state["m_scales"], SIGNED, shape),
                   "v": dequantize(state["sqrt_v_codes"], state["sqrt_v_scales"], UNSIGNED,
                                   shape)}
        updated = optim.AdamW.apply_single(self, gradient, parameter, moments)
        state["m_codes"], state["m_scales"] = quantize(moments["m"], SIGNED)
        state["sqrt_v_codes"], state["sqrt_v_scales"] = quantize(moments["v"], UNSIGNED)
        return updated


def drift(optimizer, steps: int = 200) -> float:
    """How far the optimizer ends from AdamW, per how far AdamW moved: gradients whose
    scales differ by e^(2 N(0, 1)) from element to element, so by 10^4 within a block."""
    start = mx.random.normal((4096,), key=mx.random.key(1))
    spread = mx.exp(2.0 * mx.random.normal((4096,), key=mx.random.key(0)))

    def run(optimizer):
        params = {"w": start}
        optimizer.init(params)
        for step in range(steps):
            noise = mx.random.normal((4096,), key=mx.random.key(100 + step))
            params = optimizer.apply_gradients({"w": (noise + 0.3) * spread}, params)
            mx.eval(params, optimizer.state)
        return params["w"]

    settings = dict(learning_rate=1e-3, betas=[0.9, 0.999], eps=1e-8, bias_correction=True)
    exact = run(optim.AdamW(**settings))
    moved = mx.abs(exact - start).mean().item()
    return mx.abs(run(optimizer(**settings)) - exact).mean().item() / moved


def test_gradients_decades_apart_in_a_block_do_not_blow_up_the_step():
    assert drift(Adam8bit) < 0.15  # measured 0.10
    assert drift(Adam8bitOfV) > 1.0  # measured 14: small v rounded to 0, huge steps


def test_resuming_with_another_kind_of_adam_is_refused(tiny_llama, data, tmp_path):
    out = tmp_path / "run"
    base = dict(model=str(tiny_llama), data=str(data), adapter_path=str(out),
                batch_size=4, steps_per_eval=0)
    train(TrainConfig(**base, iters=2, optimizer="adamw-8bit"))
    with pytest.raises(UserError, match="optimizer 'adamw-8bit' -> 'adamw'"):
        train(TrainConfig(**base, iters=4), resume=True)


def test_8bit_training_reaches_the_validation_loss_of_32bit(tiny_llama, data, tmp_path):
    def val_loss(optimizer: str) -> float:
        out = tmp_path / optimizer
        result = train(TrainConfig(model=str(tiny_llama), data=str(data), adapter_path=str(out),
                                   iters=30, batch_size=4, learning_rate=5e-3,
                                   steps_per_eval=30, optimizer=optimizer))
        return result.best_val_loss

    assert val_loss("adamw-8bit") == pytest.approx(val_loss("adamw"), rel=0.02)
