"""The ``hessfunc`` command: ``hessfunc demo`` and ``hessfunc analyze``.

``torchrun --nproc-per-node N -m hessfunc analyze ...`` shards the data over N
processes (``hessfunc.app.analyze``; docs/distributed.md).

Bad arguments and input files give a one-line error and exit status 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ._version import __version__
from .errors import HessfuncError

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments in one line and exits with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hessfunc",
        description="Second- and higher-order derivatives of PyTorch models, the functional way.",
    )
    parser.add_argument("--version", action="version", version=f"hessfunc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    demo = sub.add_parser("demo", help="train the seed's example network and report its "
                                       "curvature (figures + report.json)")
    demo.add_argument("--out", type=Path, default=Path("hessfunc-demo"),
                      help="output folder (default: ./hessfunc-demo)")
    demo.add_argument("--epochs", type=_positive, default=1000)
    demo.add_argument("--lr", type=float, default=0.01)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    demo.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    an = sub.add_parser("analyze", help="the curvature report of your model on your data")
    an.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                    help="importable factory returning the nn.Module")
    an.add_argument("--state-dict", metavar="FILE", help="state dict (.pt, tensors only)")
    an.add_argument("--data", required=True, metavar="FILE",
                    help=".pt (dict x/y or (x, y), tensors only) or .npz (arrays x, y)")
    an.add_argument("--loss", default="mse", metavar="mse|cross-entropy|MODULE:FN")
    an.add_argument("--batch-size", type=_positive, default=None)
    an.add_argument("--top-k", type=_positive, default=5)
    an.add_argument("--probes", type=_positive, default=100,
                    help="Hutchinson probes for the stochastic trace (default 100)")
    an.add_argument("--density-probes", type=_positive, default=None,
                    help="probes of the spectral density (default: from 3, one at a time, "
                         "up to 10, until its integrated standard error is at most "
                         "--density-tol)")
    an.add_argument("--density-tol", type=_positive_float, default=0.02,
                    help="the spectral density's integrated standard error to reach when "
                         "--density-probes is not given (default 0.02: 2%% of its mass)")
    an.add_argument("--lanczos-steps", type=_positive, default=40,
                    help="Lanczos steps per density probe (default 40)")
    an.add_argument("--max-eigen-steps", type=_positive, default=None,
                    help="at most this many Lanczos steps for the top eigenvalues")
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--out", type=Path, default=Path("hessfunc-analyze"))
    an.add_argument("--device", default="cpu",
                    help="cpu or cuda[:N]; under torchrun, cuda means cuda:LOCAL_RANK")
    an.add_argument("--timeout", type=_positive, default=1800, metavar="SECONDS",
                    help="under torchrun: how long a rank waits for the others in a "
                         "collective before failing (default 1800)")
    an.epilog = ("Under torchrun --nproc-per-node N, `analyze` shards --data over the N "
                     "processes (gloo on CPU, nccl with --device cuda); rank 0 writes the "
                     "report.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    import torch

    try:
        if args.command == "demo":
            from .app.demo import run_demo

            if args.device.startswith("cuda") and not torch.cuda.is_available():
                raise HessfuncError("--device cuda: no CUDA device is available here")
            run_demo(args.out, epochs=args.epochs, lr=args.lr, seed=args.seed,
                     dtype=getattr(torch, args.dtype), device=args.device)
        else:
            from .app.analyze import run_analyze, torchrun_group

            if args.device.startswith("cuda") and not torch.cuda.is_available():
                raise HessfuncError("--device cuda: no CUDA device is available here")
            with torchrun_group(args.device, args.timeout) as group:
                device = args.device
                if group is not None and device == "cuda":
                    device = f"cuda:{torch.cuda.current_device()}"
                run_analyze(args.model, args.data, args.out, loss=args.loss,
                            state_dict=args.state_dict, batch_size=args.batch_size,
                            top_k=args.top_k, seed=args.seed, device=device,
                            process_group=group, probes=args.probes,
                            density_probes=args.density_probes,
                            density_tol=args.density_tol,
                            lanczos_steps=args.lanczos_steps,
                            max_eigen_steps=args.max_eigen_steps)
    except HessfuncError as exc:
        print(f"hessfunc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
