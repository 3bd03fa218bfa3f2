"""``hessfunc analyze``: the curvature report of a user's model on a user's data file.

Loading is safe: state dicts and ``.pt`` data go through ``torch.load(...,
weights_only=True)`` (tensors and plain containers only, never arbitrary
objects), ``.npz`` through ``numpy.load(allow_pickle=False)``.

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` set) each rank joins the default
process group (gloo on CPU, nccl with ``--device cuda``, one GPU per rank by
``LOCAL_RANK``) and reads its shard: the ``{rank}``-th file when ``--data`` names one per
rank (``shard-{rank}.pt``), else the ``rank``-th of ``N`` contiguous, near-equal slices of
the one file (``.pt`` files are memory-mapped, so a rank reads its rows only). Every
number is of the whole data set; rank 0 prints and writes the report, which states the
world size. A rank that fails (a missing file, say) makes every rank stop with an error.
"""

from __future__ import annotations

import datetime
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._distributed import Group
from ..errors import HessfuncError
from ..functional import functionalize
from . import plots
from .report import DENSITY_TOL, curvature_report


class CLIError(HessfuncError):
    """A bad command-line argument or input file (printed in one line, exit status 2)."""


def _import_object(spec: str, what: str) -> Any:
    if ":" not in spec:
        raise CLIError(f"{what} must look like MODULE:NAME (e.g. mypkg.models:make_model), "
                       f"got {spec!r}")
    module_name, _, attr = spec.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of the user's module
        raise CLIError(f"cannot import module {module_name!r} for {what}: "
                       f"{type(exc).__name__}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise CLIError(f"module {module_name!r} has no attribute {attr!r} ({what})") from None


def load_model(spec: str, state_dict: str | None) -> nn.Module:
    factory = _import_object(spec, "--model")
    if not callable(factory):
        raise CLIError(f"--model {spec}: {factory!r} is not callable")
    try:
        model = factory()
    except Exception as exc:
        raise CLIError(f"--model {spec}: the factory raised {type(exc).__name__}: {exc}") \
            from None
    if not isinstance(model, nn.Module):
        raise CLIError(f"--model {spec}: the factory returned {type(model).__name__}, "
                       "expected a torch.nn.Module")
    if state_dict is not None:
        path = Path(state_dict)
        if not path.is_file():
            raise CLIError(f"--state-dict {state_dict}: no such file")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(sd)
        except Exception as exc:
            raise CLIError(f"--state-dict {state_dict}: cannot load it "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return model


def _pick(container: Any, keys: tuple[str, ...], path: Path) -> Any:
    for k in keys:
        if k in container:
            return container[k]
    raise CLIError(f"--data {path}: expected arrays named {' or '.join(keys)}; found "
                   f"{sorted(container)}")


def _load_pt(path: Path) -> Any:
    """``torch.load`` memory-mapped where the file allows it (slices then read their pages
    only), else read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not in the zip format that mmap needs
        return torch.load(path, map_location="cpu", weights_only=True)


def load_data(path_str: str) -> tuple[torch.Tensor, torch.Tensor]:
    path = Path(path_str)
    if not path.is_file():
        raise CLIError(f"--data {path_str}: no such file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                x = np.asarray(_pick(z, ("x", "inputs"), path))
                y = np.asarray(_pick(z, ("y", "targets"), path))
            return torch.from_numpy(x), torch.from_numpy(y)
        if path.suffix in (".pt", ".pth"):
            obj = _load_pt(path)
        else:
            raise CLIError(f"--data {path_str}: expected a .pt or .npz file")
    except CLIError:
        raise
    except Exception as exc:
        raise CLIError(f"--data {path_str}: cannot read it ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0]})") from None
    if isinstance(obj, dict):
        x, y = _pick(obj, ("x", "inputs"), path), _pick(obj, ("y", "targets"), path)
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = obj
    else:
        raise CLIError(f"--data {path_str}: expected a dict with x/y (or inputs/targets) or an "
                       f"(x, y) pair, got {type(obj).__name__}")
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise CLIError(f"--data {path_str}: x and y must be tensors")
    return x, y


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"mse": F.mse_loss,
                                                  "cross-entropy": F.cross_entropy}


def load_loss(spec: str) -> Callable[..., torch.Tensor]:
    if spec in LOSSES:
        return LOSSES[spec]
    fn = _import_object(spec, "--loss")
    if not callable(fn):
        raise CLIError(f"--loss {spec}: {fn!r} is not callable")
    return fn


@contextmanager
def torchrun_group(device: str = "cpu", timeout_s: float = 1800.0) -> Iterator[Any]:
    """The default process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1), else
    None: nccl when ``device`` is CUDA (this rank's GPU is ``cuda:LOCAL_RANK``), gloo on
    CPU, with collectives that give up after ``timeout_s`` seconds; destroyed on exit."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    dist = torch.distributed
    if world <= 1 or dist.is_initialized():
        yield dist.group.WORLD if dist.is_initialized() else None
        return
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise CLIError("--device cuda: no CUDA device is available here")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise CLIError(f"cannot join the process group of {world} ranks (RANK="
                       f"{os.environ.get('RANK')}): {type(exc).__name__}: {exc}") from None
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def shard_rows(n: int, rank: int, world: int) -> slice:
    """Rows of rank ``rank``'s contiguous shard of ``n`` samples (sizes differ by at most 1)."""
    return slice(n * rank // world, n * (rank + 1) // world)


def _load(model_spec: str, data_path: str, loss: str, state_dict: str | None,
          batch_size: int | None, device: str, rank: int, world: int) -> dict[str, Any]:
    """This rank's model, loss, samples and batches, checked to fit each other."""
    model = load_model(model_spec, state_dict).to(device)
    per_rank = "{rank}" in data_path
    path = data_path.format(rank=rank) if per_rank else data_path
    x, y = load_data(path)
    loss_fn = load_loss(loss)
    if (x.shape[0] == 0 and (per_rank or world == 1)) or x.shape[0] != y.shape[0]:
        raise CLIError(f"--data {path}: x has {x.shape[0]} samples and y {y.shape[0]}; "
                       "they must be equal and non-zero")
    if not per_rank and world > 1:
        rows = shard_rows(x.shape[0], rank, world)
        x, y = x[rows].clone(), y[rows].clone()
    first = next((p for p in model.parameters()), None)
    dtype = first.dtype if first is not None else torch.float32
    x = x.to(dtype=dtype if x.is_floating_point() else None, device=device)
    y = y.to(dtype=dtype if y.is_floating_point() else None, device=device)
    if loss == "cross-entropy" and not y.is_floating_point():
        y = y.long()
    if x.shape[0] > 0:
        try:
            with torch.no_grad():
                probe = loss_fn(model(x[:2]), y[:2])
        except Exception as exc:
            raise CLIError(f"the data do not fit the model: x {tuple(x.shape)}, y "
                           f"{tuple(y.shape)} -> {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0]}") from None
        if not isinstance(probe, torch.Tensor) or probe.dim() != 0:
            raise CLIError(f"--loss {loss}: must return a scalar, got "
                           f"{getattr(probe, 'shape', type(probe).__name__)}")
    if batch_size is not None and batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {batch_size}")
    if batch_size is None or batch_size >= x.shape[0]:
        data: Any = (x, y)
    else:
        data = [(x[i:i + batch_size], y[i:i + batch_size])
                for i in range(0, x.shape[0], batch_size)]
    return {"model": model, "loss_fn": loss_fn, "x": x, "y": y, "data": data}


def run_analyze(model_spec: str, data_path: str, out: Path, *, loss: str = "mse",
                state_dict: str | None = None, batch_size: int | None = None, top_k: int = 5,
                seed: int = 0, device: str = "cpu", process_group: Any = None,
                log: Any = print, probes: int = 100, density_probes: int | None = None,
                lanczos_steps: int = 40, max_eigen_steps: int | None = None,
                density_tol: float = DENSITY_TOL
                ) -> dict[str, Any]:
    """The report of the model on the data; with ``process_group`` (under ``torchrun``)
    every rank its shard, rank 0 printing and writing (module docstring)."""
    group = Group(process_group, "hessfunc analyze")
    rank, world = group.rank, group.size
    if rank != 0:
        def log(*args: Any, **kwargs: Any) -> None:
            return None
    loaded: dict[str, Any] = {}

    def load() -> int:
        loaded.update(_load(model_spec, data_path, loss, state_dict, batch_size, device, rank,
                            world))
        return int(loaded["x"].shape[0])

    counts = group.exchange("loading the model and this rank's data", load)
    model, x, y = loaded["model"], loaded["x"], loaded["y"]
    f, params = functionalize(model, loaded["loss_fn"])
    P = sum(t.numel() for t in params.values())
    shards = f" in {world} shards ({', '.join(f'{n:,}' for n in counts)} samples)" \
        if world > 1 else ""
    log(f"Analysing {type(model).__name__} ({P:,} parameters) on {sum(counts):,} samples "
        f"from {data_path}{shards}, loss {loss}")
    rep = curvature_report(f, params, loaded["data"], top_k=top_k, seed=seed, progress=True,
                           process_group=process_group, hutchinson_samples=probes,
                           density_probes=density_probes, density_steps=lanczos_steps,
                           density_tol=density_tol,
                           eigen_max_steps=max_eigen_steps)
    rep.numbers.update(model=model_spec, data=data_path, loss_function=loss)
    fit = None
    if world == 1 and x.dim() == 2 and x.shape[1] == 1 and y.is_floating_point() \
            and y.numel() == y.shape[0]:
        order = x[:, 0].argsort()
        fit = (x[order], y[order], f.output(params, x[order]))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        plots.write_outputs(out, rep, log, fit)
    return rep.numbers
