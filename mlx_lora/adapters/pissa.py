"""PiSSA (Meng et al. 2024): lora_a, lora_b start at the top-rank SVD of the base weight.

As PEFT's init_lora_weights="pissa": W = U S V^T; with the rank r and scale s of the layer,
lora_a = V_r sqrt(S_r / s) (in, r) and lora_b = sqrt(S_r / s) U_r^T (r, out), so that
s * (lora_a lora_b)^T is W's best rank-r approximation, and the base becomes the residual
W - s * (a0 b0)^T, where a0, b0 are the initial factors.

We keep that residual as the unchanged base plus a frozen -s * x a0 b0 term (LoRALinear's
lora_a0, lora_b0): the same function of lora_a, lora_b (so the same gradients), but the base
stays W, bit for bit, whatever its dtype or quantization. That makes the trained layer equal,
on the original base, to a plain LoRA of twice the rank (PEFT's PiSSA-to-LoRA conversion):
lora_a' = [lora_a | a0], lora_b' = [lora_b ; -b0]. Adapter files hold that LoRA, so mlx-lm,
PEFT, fuse and our own loader read them as any LoRA; a checkpoint splits it back on resume.
On a quantized base the SVD is of the dequantized weight and the quantized base stays as it
is (not QPiSSA's quantized residual, which no base a consumer loads would match).
"""

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.adapters.lora import LoRALinear, dequantized_weight
from mlx_lora.adapters.protocol import Hyper


def thin_svd(weight: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """U (m, k), S (k,), V^T (k, n) of an (m, n) matrix, k = min(m, n), on the CPU stream."""
    # MLX's svd runs only on the CPU and returns full square factors; a QR step first keeps
    # them k-sized (a full V of a 14336-wide weight would take 0.8 GB).
    if weight.shape[0] < weight.shape[1]:
        u, s, vt = thin_svd(weight.T)
        return vt.T, s, u.T
    q, r = mx.linalg.qr(weight, stream=mx.cpu)  # weight = q r, q (m, n), r (n, n)
    u, s, vt = mx.linalg.svd(r, stream=mx.cpu)
    return q @ u, s, vt


def init_pissa(layer: LoRALinear) -> None:
    """Set lora_a, lora_b (and the frozen lora_a0, lora_b0) to the base weight's top SVD."""
    weight = dequantized_weight(layer.linear).astype(mx.float32)  # (out, in)
    u, s, vt = thin_svd(weight)
    rank = layer.lora_a.shape[1]
    root = mx.sqrt(s[:rank] / layer.scale)  # PEFT divides S by the scale: s * a0 b0 = U S V^T
    a0 = vt[:rank].T * root  # (in, r): PEFT's lora_A (r, in) transposed
    b0 = root[:, None] * u[:, :rank].T  # (r, out): PEFT's lora_B (out, r) transposed
    mx.eval(a0, b0)  # one layer's SVD factors at a time, not every layer's at once
    layer.lora_a, layer.lora_b = a0, b0
    layer.lora_a0, layer.lora_b0 = a0, b0


def pissa_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(path, layer) of the layers that carry PiSSA's initial factors."""
    return [(p, m) for p, m in model.named_modules()
            if isinstance(m, LoRALinear) and "lora_a0" in m]


def saved_weights(model: nn.Module, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Trainable tensors as a file holds them: each PiSSA layer as its LoRA of twice the rank."""
    weights = dict(weights)
    for path, layer in pissa_layers(model):
        a, b = f"{path}.lora_a", f"{path}.lora_b"
        weights[a] = mx.concatenate([weights[a], layer.lora_a0], axis=1)  # (in, 2r)
        weights[b] = mx.concatenate([weights[b], -layer.lora_b0], axis=0)  # (2r, out)
    return weights


def loaded_weights(model: nn.Module, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """A file's tensors for this model, each PiSSA layer's split back into lora_a, lora_b,
    lora_a0, lora_b0 (exactly: slicing and negating round nothing)."""
    weights = dict(weights)
    for path, layer in pissa_layers(model):
        a, b = f"{path}.lora_a", f"{path}.lora_b"
        rank = layer.lora_a.shape[1]
        weights[a], weights[f"{path}.lora_a0"] = weights[a][:, :rank], weights[a][:, rank:]
        weights[b], weights[f"{path}.lora_b0"] = weights[b][:rank], -weights[b][rank:]
    return weights


def saved_hyper(hyper: Hyper) -> Hyper:
    """The plain LoRA a PiSSA run saves: twice the rank at the same scale (as PEFT's
    conversion doubles r and lora_alpha, or multiplies lora_alpha by sqrt(2) with rslora)."""
    alpha = hyper.alpha * (2 ** 0.5 if hyper.rslora else 2)
    return dataclasses.replace(hyper, rank=2 * hyper.rank, alpha=alpha, init="default")
