"""The library's exceptions.

Every error hessfunc raises on purpose derives from :class:`HessfuncError`, so
research code can catch the library's refusals without catching torch's own.
Messages follow one pattern: the call, the argument, what was expected, what was
got, and the fix.
"""

from __future__ import annotations

__all__ = ["HessfuncError", "ArgumentError", "DenseMemoryError", "NonFiniteError",
           "DistributedError"]


class HessfuncError(Exception):
    """Base class of every error raised by hessfunc itself."""


class ArgumentError(HessfuncError, ValueError, TypeError):
    """A bad argument: wrong type, dtype, shape, structure or value.

    Subclasses both ``ValueError`` and ``TypeError`` so that code written
    against either keeps working.
    """


class DenseMemoryError(HessfuncError, MemoryError):
    """A dense result (or chunk of tangents) would exceed the memory limit.

    Raised *before* anything is allocated; the message gives the estimate and
    the ways around it (``chunk_size``, ``hessian_blocks``, ``hessian_diag`` or
    :class:`hessfunc.HessianOperator`).
    """


class NonFiniteError(HessfuncError, FloatingPointError):
    """``check_finite=True`` found NaN/Inf; the message names the first parameter or sample."""


class DistributedError(HessfuncError, RuntimeError):
    """A collective over the process group failed, or another rank failed in the same step.

    The message names this rank, the step, and torch's error or the other rank's.
    """
