"""Per-layer capture of inputs `a` and output cotangents `g` for every Linear, Conv2d and Embedding.

One forward records each tracked layer's input and output; each backward asks autograd for the
gradient with respect to the layer *outputs* only (no parameter gradient is ever formed). For a
layer with weight W (O × I) and, if present, a bias (folded in as a constant-1 input), the
gradient of row r is

    G_r = Σ_p g_{r,p} a_{r,p}ᵀ        (O × I'),  I' = I + 1 with bias

with p over positions (conv: im2col patches; attention: tokens, text tokens for cross-attention
keys and values; plain Linear: P = 1). An Embedding (a class embedding) is the Linear map of the
one-hot class vector: W (O × I) = weightᵀ, a = onehot(c), no bias; so its A factor is the diagonal
of class frequencies. `a` has shape (R, P, I') and `g` (R, P, O). Both the curvature and the
features use this.

A Linear or Embedding called more than once in one forward (a DiT's final layer calls block 0's
timestep-and-class embedding again) contributes the sum of its calls' gradients: its calls are
recorded as extra positions (the inputs concatenated along P, each call's cotangent likewise), so
the per-example gradient is Σ over calls and positions, and the K-FAC factors treat the shared
use as K-FAC-expand does. A convolution called twice is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from attribution.conditions import Cond, denoise

TRACKED = (nn.Linear, nn.Conv2d, nn.Embedding)


def tracked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear, nn.Conv2d and nn.Embedding of `model`, by qualified name, in module order."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, TRACKED)}
    for n, m in layers.items():
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            raise NotImplementedError(f"{n}: grouped or non-zero-padded convolutions are not supported")
        if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.padding_idx is not None):
            raise NotImplementedError(f"{n}: embeddings with max_norm or padding_idx are not supported")
    return layers


def layer_shape(m: nn.Module) -> tuple[int, int]:
    """(O, I') of the layer's gradient matrix, bias column included."""
    if isinstance(m, nn.Embedding):
        return m.weight.shape[1], m.weight.shape[0]
    o = m.weight.shape[0]
    i = m.weight[0].numel()
    return o, i + (1 if m.bias is not None else 0)


def input_columns(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input -> u (R, I, P) without the bias entry: conv im2col columns (F.unfold's own
    layout, no transposed copy), a view of the Linear tokens, or one-hot class vectors."""
    if isinstance(m, nn.Embedding):
        return F.one_hot(x.reshape(x.shape[0], -1), m.num_embeddings).to(m.weight.dtype).transpose(1, 2)
    if isinstance(m, nn.Conv2d):
        return F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
    return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)


def inputs_as_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input -> a (R, P, I'): im2col patches for conv, tokens for Linear, bias ones."""
    a = input_columns(m, x).transpose(1, 2)
    if getattr(m, "bias", None) is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
    return a


def project_inputs(m: nn.Module, x: torch.Tensor, m_in: torch.Tensor) -> torch.Tensor:
    """(a @ m_inᵀ) for every row and position, (R, P, k), without forming a (no im2col copy).

    `m_in` (k, I') acts on the layer input with its bias column on the constant 1: for a conv this
    is itself a convolution with k output channels.
    """
    if isinstance(m, nn.Embedding):
        return F.embedding(x.reshape(x.shape[0], -1), m_in.T)
    w, b = (m_in[:, :-1], m_in[:, -1]) if getattr(m, "bias", None) is not None else (m_in, None)
    if isinstance(m, nn.Conv2d):
        y = F.conv2d(x, w.reshape(-1, *m.weight.shape[1:]), b, m.stride, m.padding, m.dilation)
        return y.flatten(2).transpose(1, 2)
    return F.linear(x.reshape(x.shape[0], -1, x.shape[-1]), w, b)


def example_gradients(m: nn.Module, x: torch.Tensor, g: torch.Tensor, b: int) -> torch.Tensor:
    """G (B, O, I') = Σ_{r,p} g aᵀ over each example's rows, from the raw input x (B·K, ...) and
    g (B·K, P, O). For a conv this is the weight gradient of each example's K rows
    (`conv2d_weight`), so no im2col copy is made; the bias column is the sum of g."""
    if not isinstance(m, nn.Conv2d):
        a = inputs_as_rows(m, x).reshape(b, -1, layer_shape(m)[1])
        return g.reshape(b, -1, g.shape[-1]).transpose(1, 2) @ a
    n, k = x.shape[0], x.shape[0] // b
    out_hw = [
        (size + 2 * pad - dil * (ker - 1) - 1) // st + 1
        for size, pad, dil, ker, st in zip(x.shape[2:], m.padding, m.dilation, m.kernel_size, m.stride)
    ]
    go = g.transpose(1, 2).reshape(n, g.shape[2], *out_hw)
    out = []
    for i in range(b):
        xi, gi = x[i * k : (i + 1) * k], go[i * k : (i + 1) * k]
        w = torch.nn.grad.conv2d_weight(xi, m.weight.shape, gi, m.stride, m.padding, m.dilation, m.groups)
        parts = [w.reshape(w.shape[0], -1)] + ([gi.sum((0, 2, 3))[:, None]] if m.bias is not None else [])
        out.append(torch.cat(parts, dim=1))
    return torch.stack(out)


def outputs_as_rows(m: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output cotangent -> g (R, P, O)."""
    if isinstance(m, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


class Recording:
    """Inputs and outputs of the tracked layers during one forward pass."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.inputs: dict[str, torch.Tensor] = {}  # a layer called n times: its n inputs along P
        self.outputs: dict[str, list[torch.Tensor]] = {}  # every call's output

    def a(self, name: str) -> torch.Tensor:
        """a (R, P, I') of a layer (formed on demand, not kept: im2col copies are large)."""
        return inputs_as_rows(self.layers[name], self.inputs[name].detach())

    def cotangents(
        self, out: torch.Tensor, cotangent: torch.Tensor, retain_graph: bool = False
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Back-propagate `cotangent` (shape of `out`); yields (name, g (R, P, O)) per layer."""
        names = [n for n in self.layers if n in self.outputs]
        flat = [o for n in names for o in self.outputs[n]]
        grads = iter(
            torch.autograd.grad(
                out, flat, grad_outputs=cotangent, retain_graph=retain_graph, allow_unused=True
            )
        )
        for n in names:
            calls = [next(grads) for _ in self.outputs[n]]
            if all(g is None for g in calls):
                continue
            rows = [
                outputs_as_rows(self.layers[n], torch.zeros_like(o) if g is None else g.detach())
                for g, o in zip(calls, self.outputs[n])
            ]
            yield n, rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)

    def backward(
        self, out: torch.Tensor, cotangent: torch.Tensor, retain_graph: bool = False
    ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """Back-propagate `cotangent` (shape of `out`); yields (name, a, g) per layer."""
        for n, g in self.cotangents(out, cotangent, retain_graph):
            yield n, self.a(n), g


@contextmanager
def record(layers: dict[str, nn.Module]) -> Iterator[Recording]:
    """Within the block, every forward of the model fills the returned Recording."""
    rec = Recording(layers)
    handles = []
    for name, m in layers.items():

        def hook(mod, inp, out, name=name):
            if name not in rec.outputs:
                rec.inputs[name], rec.outputs[name] = inp[0], [out]
                return
            if isinstance(mod, nn.Conv2d) or inp[0].shape[0] != rec.inputs[name].shape[0]:
                raise RuntimeError(
                    f"{name} was called twice in one forward; a convolution (or a call on other rows) "
                    "used twice is not supported"
                )
            x, prev = inp[0], rec.inputs[name]
            if isinstance(mod, nn.Embedding):
                x, prev = x.reshape(x.shape[0], -1), prev.reshape(prev.shape[0], -1)
            else:
                x, prev = (
                    x.reshape(x.shape[0], -1, x.shape[-1]),
                    prev.reshape(prev.shape[0], -1, prev.shape[-1]),
                )
            rec.inputs[name] = torch.cat([prev, x], dim=1)  # the calls as extra positions
            rec.outputs[name].append(out)

        handles.append(m.register_forward_hook(hook))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def forward(
    unet: nn.Module, layers: dict[str, nn.Module], x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None
) -> tuple[torch.Tensor, Recording]:
    """The denoiser's output for (x, t) under `cond`, with a Recording of every tracked layer
    (parameters need requires_grad)."""
    with record(layers) as rec:
        with torch.enable_grad():
            out = denoise(unet, x, t, cond)
    return out, rec


@contextmanager
def grad_enabled_params(unet: nn.Module) -> Iterator[None]:
    """Temporarily let parameters require grad so every layer output joins the graph."""
    old = [p.requires_grad for p in unet.parameters()]
    for p in unet.parameters():
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, r in zip(unet.parameters(), old):
            p.requires_grad_(r)
