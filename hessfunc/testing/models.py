"""Small test models with curvature: chains, DAGs, convolutions, tied weights.

Plain ``nn.Module`` classes, usable without hypothesis. Each carries
``input_shape`` (one sample's input shape, or a tuple of them for several inputs)
and ``num_outputs`` so that :func:`hessfunc.testing.strategies.batches` can draw data
for it. Activations are smooth with a non-zero second derivative: a ReLU network has
zero curvature inside its pieces, so a Hessian test on it would prove nothing.

Example:
    >>> model = ResidualMLP(3, width=4, blocks=2, num_outputs=2, activation="tanh")
    >>> model(torch.ones(5, 3)).shape
    torch.Size([5, 2])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "Sin",
    "MLP",
    "ResidualMLP",
    "ConcatNet",
    "ConvNet",
    "NormedMLP",
    "TiedNet",
    "TwoInputNet",
    "build_mlp",
]


class Sin(nn.Module):
    """``sin(x)``: a user-defined elementwise module (no torch class, curvature everywhere)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)


#: Elementwise activations with non-zero second derivatives, by name.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "sin": Sin,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class MLP(nn.Sequential):
    """``Linear -> act -> ... -> Linear``: a chain, the structured engine's home ground."""

    def __init__(self, sizes: list[int], activation: str = "tanh",
                 bias: bool | list[bool] = True):
        biases = bias if isinstance(bias, list) else [bias] * (len(sizes) - 1)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b, bias=biases[i]))
            if i < len(sizes) - 2:
                layers.append(_activation(activation))
        super().__init__(*layers)
        self.input_shape, self.num_outputs = (sizes[0],), sizes[-1]


def build_mlp(sizes: list[int], activation: str = "tanh", seed: int = 0,
              bias: bool | list[bool] = True, dtype: torch.dtype = torch.float64) -> MLP:
    """An :class:`MLP` with weights drawn from ``torch.manual_seed(seed)``, in ``dtype``."""
    torch.manual_seed(seed)
    return MLP(sizes, activation, bias).to(dtype)


class ResidualMLP(nn.Module):
    """``x -> Linear -> [h + act(Linear(h))] * blocks -> Linear``: skip connections (a DAG)."""

    def __init__(self, num_inputs: int, width: int, blocks: int, num_outputs: int,
                 activation: str = "tanh", bias: bool = True):
        super().__init__()
        self.stem = nn.Linear(num_inputs, width, bias=bias)
        self.blocks = nn.ModuleList(nn.Linear(width, width, bias=bias) for _ in range(blocks))
        self.acts = nn.ModuleList(_activation(activation) for _ in range(blocks + 1))
        self.head = nn.Linear(width, num_outputs, bias=bias)
        self.input_shape, self.num_outputs = (num_inputs,), num_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.acts[0](self.stem(x))
        for block, act in zip(self.blocks, self.acts[1:], strict=True):
            h = h + act(block(h))
        return self.head(h)


class ConcatNet(nn.Module):
    """Two branches of the same input, concatenated, then a head: fan-out and a merge."""

    def __init__(self, num_inputs: int, width: int, num_outputs: int,
                 activation: str = "tanh", bias: bool = True):
        super().__init__()
        self.left = nn.Linear(num_inputs, width, bias=bias)
        self.right = nn.Linear(num_inputs, width, bias=bias)
        self.act = _activation(activation)
        self.head = nn.Linear(2 * width, num_outputs, bias=bias)
        self.input_shape, self.num_outputs = (num_inputs,), num_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.act(self.left(x)), torch.sin(self.right(x))], dim=-1)
        return self.head(h)


class NormedMLP(nn.Module):
    """``x -> Linear -> norm -> act -> Linear``, the norm (``norm``) BatchNorm in eval mode
    (``"batch"``: running statistics and affine parameters away from 0 and 1, from the
    global generator), LayerNorm (``"layer"``), RMSNorm (``"rms"``) or a softmax over
    the features (``"softmax"``): a scale broadcast over the batch, or a normalisation
    by the sample's statistics (a map with a closed form) and then a scale."""

    def __init__(self, num_inputs: int, width: int, num_outputs: int,
                 activation: str = "tanh", norm: str = "batch"):
        super().__init__()
        self.first = nn.Linear(num_inputs, width)
        if norm == "batch":
            self.norm: nn.Module = nn.BatchNorm1d(width).eval()
            with torch.no_grad():
                self.norm.running_mean.normal_(0, 0.3)
                self.norm.running_var.uniform_(0.5, 1.5)
        elif norm == "layer":
            self.norm = nn.LayerNorm(width)
        elif norm == "rms":
            self.norm = nn.RMSNorm(width, eps=1e-5)
        elif norm == "softmax":
            self.norm = nn.Softmax(-1)
        else:
            raise ValueError(f"NormedMLP: norm must be 'batch', 'layer', 'rms' or 'softmax', "
                             f"got {norm!r}.")
        with torch.no_grad():
            for name, mean in (("weight", 1.0), ("bias", 0.0)):
                if getattr(self.norm, name, None) is not None:
                    getattr(self.norm, name).normal_(mean, 0.3)
        self.act = _activation(activation)
        self.head = nn.Linear(width, num_outputs)
        self.input_shape, self.num_outputs = (num_inputs,), num_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.norm(self.first(x))))


class TiedNet(nn.Module):
    """An autoencoder whose decoder reuses the encoder's weight (shared parameters)."""

    def __init__(self, d: int, width: int, activation: str = "tanh"):
        super().__init__()
        self.enc = nn.Linear(d, width)
        self.act = _activation(activation)
        self.dec_bias = nn.Parameter(torch.zeros(d))
        self.input_shape, self.num_outputs = (d,), d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(self.enc(x)), self.enc.weight.t(), self.dec_bias)


class TwoInputNet(nn.Module):
    """A model with two inputs: ``mlp(cat(a, b * b))``."""

    def __init__(self, da: int, db: int, width: int, out: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(da + db, width), nn.Tanh(), nn.Linear(width, out))
        self.input_shape, self.num_outputs = ((da,), (db,)), out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([a, b * b], dim=-1))


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class ConvNet(nn.Sequential):
    """``[Conv -> act] * layers -> Flatten -> Linear``, Conv1d or Conv2d.

    ``layers`` lists one dict per convolution with ``out_channels``, ``kernel_size``,
    ``stride``, ``padding``, ``dilation`` (ints or per-dimension tuples, so non-square
    settings are expressible) and ``bias``.
    """

    def __init__(self, in_channels: int, spatial: tuple[int, ...], layers: list[dict],
                 num_outputs: int, activation: str = "tanh"):
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[len(spatial)]
        modules: list[nn.Module] = []
        channels, size = in_channels, list(spatial)
        for spec in layers:
            spec = dict(spec)
            out, bias = spec.pop("out_channels"), spec.pop("bias", True)
            modules += [conv(channels, out, bias=bias, **spec), _activation(activation)]
            tup = {k: (v,) * len(size) if isinstance(v, int) else tuple(v)
                   for k, v in spec.items()}
            size = [_conv_out(size[i], tup["kernel_size"][i], tup.get("stride", (1,) * 3)[i],
                              tup.get("padding", (0,) * 3)[i],
                              tup.get("dilation", (1,) * 3)[i]) for i in range(len(size))]
            if min(size) < 1:
                raise ValueError(f"ConvNet: layer {spec} leaves no output (spatial {size})")
            channels = out
        modules += [nn.Flatten(), nn.Linear(channels * int(torch.tensor(size).prod()),
                                            num_outputs)]
        super().__init__(*modules)
        self.input_shape, self.num_outputs = (in_channels, *spatial), num_outputs
