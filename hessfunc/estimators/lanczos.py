"""The Lanczos process and the extreme eigenvalues of a symmetric operator.

From a unit vector ``q_1`` the Lanczos process builds an orthonormal basis
``Q_m = [q_1, ..., q_m]`` of the Krylov space
``span{q_1, A q_1, ..., A^(m-1) q_1}``, one product ``A q_j`` per step, in which
``A`` is tridiagonal:

    A Q_m = Q_m T_m + beta_m q_(m+1) e_m^T,
    alpha_j = q_j^T A q_j,
    beta_j q_(j+1) = A q_j - alpha_j q_j - beta_(j-1) q_(j-1),

with ``T_m`` symmetric tridiagonal, ``alpha`` on its diagonal and
``beta_1 .. beta_(m-1)`` beside it. An eigenpair ``(theta, y)`` of ``T_m`` gives
the Ritz pair ``(theta, Q_m y)`` of ``A`` with residual

    ||A Q_m y - theta Q_m y|| = beta_m |e_m^T y|,

and some eigenvalue of ``A`` lies within that distance of ``theta``. The extreme
Ritz values converge first, fastest where the spectrum has a gap.

In floating point the basis loses orthogonality as Ritz values converge, which
brings spurious copies of them; here every new vector is orthogonalised against
the whole basis, twice (classical Gram-Schmidt, "twice is enough").

References:
    C. Lanczos, "An iteration method for the solution of the eigenvalue problem
    of linear differential and integral operators", J. Res. Nat. Bur. Standards
    45, 1950.

    B. N. Parlett, "The Symmetric Eigenvalue Problem", SIAM, 1998 (ch. 13).

    L. Giraud, J. Langou and M. Rozloznik, "The loss of orthogonality in the
    Gram-Schmidt orthogonalization process", Computers & Mathematics with
    Applications 50, 2005.

Example (a diagonal matrix with eigenvalues 1, ..., 10)::

    >>> import torch
    >>> d = torch.arange(1.0, 11.0, dtype=torch.float64)
    >>> result = lanczos_eigenvalues(lambda V: d[:, None] * V, 10, k=2,
    ...                              generator=torch.Generator().manual_seed(0),
    ...                              dtype=torch.float64)
    >>> [round(x, 8) for x in result.eigenvalues.tolist()], result.converged
    ([10.0, 9.0], True)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from hessfunc.errors import ArgumentError
from hessfunc.estimators._probes import (
    Matmat,
    Operator,
    check_choice,
    check_int,
    check_positive_float,
)

__all__ = ["LanczosResult", "EigenResult", "lanczos", "lanczos_eigenvalues"]

_WHICH = ("largest", "magnitude", "smallest")


class LanczosResult(NamedTuple):
    """The outcome of ``m`` Lanczos steps: ``A Q = Q T + residual_norm q_(m+1) e_m^T``.

    Attributes:
        alphas: ``(m,)``, the diagonal of ``T``.
        betas: ``(m - 1,)``, its off-diagonal; an exact 0 marks a restart after
            an invariant subspace (see the note in :func:`lanczos`).
        residual_norm: 0-dim, ``beta_m``, the norm of the last residual.
        basis: ``(size, m)``, the orthonormal Krylov basis ``Q``, or ``None``.
    """

    alphas: torch.Tensor
    betas: torch.Tensor
    residual_norm: torch.Tensor
    basis: torch.Tensor | None

    def tridiagonal(self) -> torch.Tensor:
        """The dense ``(m, m)`` tridiagonal matrix ``T``."""
        return torch.diag(self.alphas) + torch.diag(self.betas, 1) + torch.diag(self.betas, -1)


class EigenResult(NamedTuple):
    """Extreme eigenpairs found by :func:`lanczos_eigenvalues`.

    Attributes:
        eigenvalues: ``(k,)``; descending for ``"largest"``, descending in
            absolute value for ``"magnitude"``, ascending for ``"smallest"``.
        eigenvectors: ``(size, k)`` unit columns matching ``eigenvalues``, or ``None``.
        num_matvecs: operator-vector products spent (= Lanczos steps).
        converged: whether every wanted Ritz value met the tolerance (always
            true once the Krylov space reached ``size``, where results are exact).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    num_matvecs: int
    converged: bool


def lanczos(
    matmat: Matmat,
    size: int,
    *,
    num_steps: int,
    start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reorthogonalize: bool = True,
    return_basis: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LanczosResult:
    """Run ``num_steps`` steps of the Lanczos process on the symmetric operator ``A``.

    Args:
        matmat: maps a ``(size, k)`` tensor ``V`` to ``A @ V``; called with one
            column per step.
        size: the operator's side length ``n``.
        num_steps: ``m`` in ``[1, size]``.
        start: ``(size,)`` starting vector (normalised here); ``None``: a random
            Gaussian one drawn from ``generator``. Its dtype and device are the
            defaults of ``dtype`` and ``device``.
        generator: source of the random start and of restart vectors.
        reorthogonalize: orthogonalise each new vector against the whole basis
            (twice), at ``O(size * m)`` memory; ``False`` keeps only the
            three-term recurrence and loses orthogonality as Ritz values converge.
        return_basis: also return the ``(size, m)`` basis.
        dtype: of the vectors; default from ``start``, else torch's default dtype.
        device: of the vectors; default from ``start``, else the generator's.

    Returns:
        :class:`LanczosResult`.

    NOTE [invariant subspaces]: a ``beta_j`` at rounding level means the Krylov
    space is invariant under ``A``; its Ritz values are then eigenvalues. The run
    continues from a fresh random vector orthogonal to the basis (to the last
    vector only without reorthogonalisation) and records ``beta_j = 0``, so ``T``
    is block diagonal and each block's eigenvalues are eigenvalues of ``A``.
    """
    caller = "lanczos"
    op = Operator.from_args(
        caller,
        matmat,
        size,
        dtype=dtype,
        device=device,
        generator=generator,
        like=start,
        like_name="start",
        like_shape=f"({size},)",
    )
    num_steps = check_int(num_steps, "num_steps", caller, maximum=op.size)
    if start is None:
        first = _unit_columns(op.probes(1, "gaussian", generator), (op.size, 1), "start", caller)
    else:
        first = _unit_columns(start, (op.size,), "start", caller).unsqueeze(1)
    run = _LanczosRun(
        op,
        first,
        reorthogonalize=reorthogonalize,
        keep_basis=return_basis,
        generator=generator,
        capacity=num_steps,
    )
    for _ in range(num_steps):
        run.step()
    alphas, offdiag, residual = run.coefficients()
    basis = run.basis()[0].T if return_basis else None
    return LanczosResult(alphas[:, 0], offdiag[:, 0], residual[0], basis)


def lanczos_eigenvalues(
    matmat: Matmat,
    size: int,
    *,
    k: int = 1,
    which: str = "largest",
    tol: float = 1e-8,
    max_steps: int | None = None,
    return_vectors: bool = False,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> EigenResult:
    """The ``k`` extreme eigenvalues (and eigenvectors) of the symmetric operator ``A``.

    Runs the reorthogonalised Lanczos process (fully with ``return_vectors``, else
    semi-orthogonally, NOTE [semi-orthogonality]; for one eigenvalue alone the plain
    recurrence, NOTE [one eigenvalue]) from a random start, one product ``A q`` at a
    time, growing the Krylov space until the ``k`` wanted Ritz values converge.

    Args:
        matmat: maps a ``(size, k)`` tensor ``V`` to ``A @ V``; called with one column.
        size: the operator's side length ``n``.
        k: how many eigenvalues, in ``[1, size - 1]`` (for all of them use
            ``torch.linalg.eigvalsh`` on the dense matrix).
        which: ``"largest"`` (algebraic), ``"magnitude"`` (absolute value) or
            ``"smallest"`` (algebraic).
        tol: relative tolerance on the residual ``||A v - theta v|| / |theta|``, which
            bounds the eigenvalue's error; see the note below.
        max_steps: cap on the Krylov dimension, ``>= k``; ``None`` or anything
            above ``size`` means ``size``, where the space is complete and the
            results exact. Memory is ``(size, steps)``.
        return_vectors: also return the ``(size, k)`` Ritz vectors.
        generator: source of the random start (and of restart vectors).
        dtype: of the vectors; default torch's default dtype.
        device: of the vectors; default the generator's device.

    Returns:
        :class:`EigenResult`; ``converged`` is false when ``max_steps`` ran out first.

    NOTE [convergence test]: a wanted Ritz value ``theta`` with Ritz vector
    ``Q y`` has converged once ``beta_m |e_m^T y| <= tol |theta| + r``, with
    ``r = sqrt(size) eps ||T||`` the rounding floor (``eps`` of ``dtype``), so
    that eigenvalues near zero can converge too. Then some eigenvalue of ``A``
    lies within the bound of ``theta``, and ``||A v - theta v||`` is the bound.
    (The sharper ``r^2 / gap`` estimate was tried and dropped: the gap to the
    other Ritz values says nothing of an eigenvalue Lanczos has not resolved yet,
    and with two eigenvalues ``1e-5`` apart it declared convergence at 1e3 times
    ``tol``; the residual grows with such a mixture, so this test does not.)
    After a restart (note in :func:`lanczos`) the newest block's own extreme
    Ritz value must also converge, and an exhausted block must not hold values
    beyond the ``k``-th wanted one, since the rest of the space can only repeat
    them.

    NOTE [one eigenvalue]: for ``k = 1`` without its eigenvector (and fewer steps than
    ``size``) the run keeps no basis and never reorthogonalises: the plain three-term
    recurrence. Its loss of orthogonality is in the directions of converged Ritz
    vectors and brings only copies of their Ritz values, while every Ritz value with
    a small bound ``beta_m |e_m^T y|`` stays within that bound (plus rounding) of an
    eigenvalue of ``A`` (C. C. Paige, "Accuracy and effectiveness of the Lanczos
    algorithm for the symmetric eigenproblem", Linear Algebra Appl. 34, 1980): a copy
    of the one wanted value changes nothing, and the test above stands. Measured on
    clustered, indefinite, geometric and uniform spectra (float32 and float64, all
    three ``which``): the same steps and errors as the semi-orthogonal run. It saves
    the basis (memory and the per-step estimate); for ``k > 1`` copies of the first
    value would crowd out the next ones, and a run that fills the space needs the
    basis for its answer to be exact.

    NOTE [repeated eigenvalues]: a single start vector meets each eigenspace in
    one direction, so until the Krylov space becomes invariant an eigenvalue
    of multiplicity ``p > 1`` shows up once, not ``p`` times. Exactly repeated
    extreme eigenvalues are found with their multiplicity only when the space
    runs into an invariant subspace first (e.g. few distinct eigenvalues);
    otherwise the ``k``-list skips the copies.
    """
    caller = "lanczos_eigenvalues"
    op = Operator.from_args(caller, matmat, size, dtype=dtype, device=device, generator=generator)
    k = check_int(k, "k", caller, maximum=op.size - 1)
    which = check_choice(which, "which", _WHICH, caller)
    tol = check_positive_float(tol, "tol", caller)
    limit = op.size
    if max_steps is not None:
        limit = min(check_int(max_steps, "max_steps", caller, minimum=k), op.size)

    check_at = min(limit, max(2 * k, k + 6))
    # NOTE [one eigenvalue]: the plain recurrence, no basis
    plain = k == 1 and not return_vectors and limit < op.size
    run = _LanczosRun(
        op,
        _unit_columns(op.probes(1, "gaussian", generator), (op.size, 1), "start", caller),
        reorthogonalize=False if plain else "semi" if not return_vectors else True,
        keep_basis=not plain,
        generator=generator,
        capacity=_initial_capacity(limit, check_at, op.size, op.dtype),
    )
    last: tuple[int, float] | None = None
    while True:
        run.step()
        # check on a schedule, and whenever an invariant subspace ends a block
        if run.num_steps < check_at and not (run.exhausted and run.num_steps >= k):
            continue
        eigenvalues, ritz, ratio = _wanted_ritz_pairs(run, k, which, tol)
        converged = ratio <= 1
        if converged or run.num_steps == limit:
            break
        if run.num_steps >= check_at:
            check_at = min(limit, run.num_steps + _steps_to_next_check(run.num_steps, ratio, last))
            last = (run.num_steps, ratio)

    eigenvectors = None
    if return_vectors:
        eigenvectors = run.basis()[0].T @ ritz.to(device=op.device, dtype=op.dtype)
        eigenvectors = eigenvectors / torch.linalg.vector_norm(eigenvectors, dim=0)
    return EigenResult(
        eigenvalues.to(device=op.device, dtype=op.dtype),
        eigenvectors,
        run.num_steps,
        converged or run.num_steps == op.size,
    )


def _steps_to_next_check(m: int, ratio: float, last: tuple[int, float] | None) -> int:
    """Steps until the next convergence check.

    NOTE [check schedule]: a check (a dense eigh of ``T``) costs ``O(m^3)``, as much
    as a cheap product once ``m`` is a few dozen, so checks are spaced out. The
    error estimates fall about geometrically with the steps; from the last two
    checks the schedule extrapolates when ``ratio`` (the largest wanted residual
    bound over its tolerance) reaches 1, and checks then, at least one and at
    most ``max(1, m / 4)`` steps ahead (that far before there is a rate).
    """
    cap = max(1, m // 4)
    if last is None or not (0 < ratio < last[1] < math.inf):
        return cap
    rate = math.log(ratio / last[1]) / (m - last[0])    # log-decrease per step, < 0
    return max(1, min(cap, math.ceil(math.log(ratio) / -rate)))


def _ordering_key(theta: np.ndarray, which: str) -> np.ndarray:
    """A key whose largest values are the wanted end of the spectrum."""
    if which == "largest":
        return theta
    if which == "smallest":
        return -theta
    return np.abs(theta)


def _wanted_ritz_pairs(
    run: _LanczosRun, k: int, which: str, tol: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The ``k`` wanted Ritz values, their ``(m, k)`` eigenvectors of ``T`` (float64), and
    the largest ratio of a wanted residual bound to its tolerance (converged when at most
    1). All on the host: ``T`` is small."""
    alphas, offdiag, beta = run.host_coefficients()
    theta, ritz = _host_tridiagonal_eigh(alphas, offdiag)
    key = _ordering_key(theta, which)
    order = np.argsort(-key, kind="stable")[:k]
    floor = _roundoff(run.size, run.dtype) * float(np.abs(theta).max())
    bounds = beta * np.abs(ritz[-1, order])         # residual norms of the wanted pairs
    allowed = tol * np.abs(theta[order]) + floor
    # 0 where met (also 0 <= 0 for a zero operator), inf where nothing is allowed
    over = np.divide(bounds, allowed, out=np.full_like(bounds, np.inf), where=allowed > 0)
    ratio = float(np.where(bounds <= allowed, 0.0, over).max())

    def small(bound: float, value: float) -> bool:
        return bool(bound <= tol * abs(value) + floor)

    restarts = np.flatnonzero(offdiag == 0)
    block = int(restarts[-1]) + 1 if len(restarts) else 0
    if ratio <= 1 and (block > 0 or run.exhausted):
        block_theta, block_vectors = _host_tridiagonal_eigh(alphas[block:], offdiag[block:])
        block_key = _ordering_key(block_theta, which)
        if run.exhausted:
            kth = key[order[-1]]
            done = small(block_key.max() - kth, kth)
        else:
            top = int(block_key.argmax())
            done = small(beta * abs(block_vectors[-1, top]), block_theta[top])
        ratio = ratio if done else math.inf
    return torch.from_numpy(theta[order].copy()), torch.from_numpy(ritz[:, order]), ratio


def _tridiagonal_eigh(
    alphas: torch.Tensor, offdiag: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of symmetric tridiagonal matrices, in float64.

    ``alphas`` is ``(..., m)`` and ``offdiag`` ``(..., m - 1)``; returns ascending
    eigenvalues ``(..., m)`` and eigenvectors ``(..., m, m)`` as columns.
    """
    matrix = torch.diag_embed(alphas.double())
    matrix.diagonal(1, -2, -1).copy_(offdiag)
    matrix.diagonal(-1, -2, -1).copy_(offdiag)
    return torch.linalg.eigh(matrix)


def _host_tridiagonal_eigh(alphas: np.ndarray, offdiag: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of one symmetric tridiagonal matrix given on the host (float64):
    ascending eigenvalues ``(m,)`` and eigenvectors ``(m, m)`` as columns. numpy's LAPACK
    call costs less than torch's up to a few dozen rows (the convergence checks of short
    runs, measured 55 against 77 us at m = 10), torch's less above (283 against 474 us at
    m = 77)."""
    m = alphas.shape[0]
    if m > 32:
        theta, vectors = _tridiagonal_eigh(torch.from_numpy(alphas), torch.from_numpy(offdiag))
        return theta.numpy(), vectors.numpy()
    matrix = np.zeros((m, m))
    matrix.flat[:: m + 1] = alphas
    matrix.flat[1 :: m + 1] = offdiag
    matrix.flat[m :: m + 1] = offdiag
    return np.linalg.eigh(matrix)


def _initial_capacity(limit: int, first_check: int, size: int, dtype: torch.dtype) -> int:
    """Rows to allocate for the basis up front (it grows by doubling).

    NOTE [basis allocation]: a block above 32 MiB is mapped fresh from the
    operating system on every run, and its first touch costs a page fault per 4 KiB
    (measured 0.2 ms per 136 KiB row); below that the allocator reuses freed memory.
    So the basis starts at the largest row count within 16 MiB (at least the first
    check's), and doubling copies it only for long runs.
    """
    rows = max(first_check, (16 * 2**20) // (size * torch.finfo(dtype).bits // 8))
    return max(1, min(limit, rows))


def _roundoff(size: int, dtype: torch.dtype) -> float:
    """Relative size of rounding errors in an orthogonalised vector of length ``size``."""
    return size**0.5 * torch.finfo(dtype).eps


def _breakdown_tol(dtype: torch.dtype) -> float:
    """Relative size below which a Lanczos residual counts as zero.

    NOTE [breakdown threshold]: once the Krylov space is invariant, the residual
    is rounding noise from the product and the orthogonalisation, measured at
    100 to 1000 ``eps`` of ``||A||`` in float64 and 10 to 100 ``eps`` in float32.
    ``eps^(2/3)`` (4e-11 in float64, 2e-5 in float32) sits above that noise;
    zeroing a true ``beta`` that small perturbs ``T``, hence the Ritz values, by
    at most as much.
    """
    return torch.finfo(dtype).eps ** (2 / 3)


def _unit_columns(
    vectors: torch.Tensor, shape: tuple[int, ...], name: str, caller: str
) -> torch.Tensor:
    """``vectors`` of the given shape, each column (or the vector) scaled to unit norm."""
    if tuple(vectors.shape) != shape:
        raise ArgumentError(
            f"{caller}(): expected {name} of shape {shape}, got {tuple(vectors.shape)}. "
            f"Pass vectors of the operator's size."
        )
    norms = torch.linalg.vector_norm(vectors, dim=0)
    if not bool(torch.isfinite(norms).all() & (norms > 0).all()):
        raise ArgumentError(
            f"{caller}(): expected every {name} vector to be finite and non-zero, got "
            f"norms {norms.tolist()}. Pass non-zero finite vectors."
        )
    return vectors / norms


class _LanczosRun:
    """``b`` independent Lanczos processes, advanced together one step at a time.

    The starting vectors are the unit columns of a ``(size, b)`` tensor; each
    :meth:`step` calls the operator once on a ``(size, b)`` block. The basis is
    stored as ``(b, steps, size)`` when ``reorthogonalize`` or ``keep_basis``.
    ``reorthogonalize``: ``True`` (against the whole basis at every step),
    ``"semi"`` (when Simon's estimate asks for it, NOTE [semi-orthogonality]) or
    ``False`` (the three-term recurrence alone).
    """

    def __init__(
        self,
        op: Operator,
        start: torch.Tensor,
        *,
        reorthogonalize: bool | str,
        keep_basis: bool,
        generator: torch.Generator | None,
        capacity: int,
    ) -> None:
        self.size, width = start.shape
        self.dtype = start.dtype
        self.num_steps = 0
        self._op = op
        self._generator = generator
        self._reorthogonalize = reorthogonalize
        self._basis = None
        if reorthogonalize or keep_basis:
            self._basis = start.new_empty((width, max(1, capacity), self.size))
        self._estimate = (_OrthogonalityEstimate(width, torch.finfo(self.dtype).eps, capacity)
                          if reorthogonalize == "semi" else None)
        self._breakdown_tol = _breakdown_tol(self.dtype)
        self._tiny = torch.finfo(self.dtype).eps ** 0.5
        self._start = start
        self._current = start
        self._residual = start
        # the coefficients, on the host in float64 (each step brings them there anyway);
        # column c + 1 holds step c and column 0 is a zero pad (beta_(-1) = 0), the layout
        # the orthogonality estimate reads them in
        self._alphas = np.zeros((width, max(1, capacity) + 1))
        self._betas = np.zeros((width, max(1, capacity) + 1))
        self._beta = start.new_zeros(width)           # the last beta, on the device
        self._last_beta = np.zeros(width)
        self._scale = np.zeros(width)                 # running estimate of ||A||
        self._breakdown = np.zeros(width, dtype=bool)

    @property
    def exhausted(self) -> bool:
        """Whether the last step hit an invariant subspace (in any of the processes)."""
        return bool(self._breakdown.any())

    def step(self) -> None:
        """One Lanczos step: one product with the operator, one more basis vector each."""
        j = self.num_steps
        if j == 0:
            vector, beta_prev = self._start, None
        else:
            vector, beta_prev = self._next_vector()
        self._store(j, vector)
        product = self._op(vector)
        alpha = torch.linalg.vecdot(vector, product, dim=0)
        residual = product.addcmul(vector, alpha, value=-1)
        if beta_prev is not None:
            residual.addcmul_(self._current, beta_prev, value=-1)
        if self._reorthogonalize is True:
            residual = _project_out(residual, self._basis[:, : j + 1])
        elif self._reorthogonalize == "semi" and self._estimate is None:  # after a restart
            residual = _project_out(residual, self._basis[:, : j + 1], semi=True)
        beta = torch.linalg.vector_norm(residual, dim=0)
        # the coefficients on the host (one synchronisation): the scale, the breakdown
        # test and the orthogonality estimate are a few scalars per process
        a, b = np.array(alpha.tolist()), np.array(beta.tolist())
        self._scale = np.maximum(self._scale, np.abs(a) + b + self._last_beta)
        if self._estimate is not None and self._estimate.advance(
                a, b, self._scale, self._alphas, self._betas):
            residual = _project_out(residual, self._basis[:, : j + 1])
            beta = torch.linalg.vector_norm(residual, dim=0)
            b = np.array(beta.tolist())
            self._estimate.reorthogonalized(b, self._scale)
        self._breakdown = b <= self._breakdown_tol * self._scale
        self._last_beta = b
        self._current, self._residual, self._beta = vector, residual, beta
        if j + 1 == self._alphas.shape[1]:
            self._alphas, self._betas = (np.concatenate([c, np.zeros_like(c)], axis=1)
                                         for c in (self._alphas, self._betas))
        self._alphas[:, j + 1], self._betas[:, j + 1] = a, b
        self.num_steps += 1

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``alphas (m, b)``, off-diagonal ``betas (m - 1, b)`` and residual norms ``(b,)``,
        in the run's dtype and on its device."""
        m = self.num_steps
        alphas, betas = (torch.from_numpy(c[:, 1 : m + 1].T.copy()).to(
            device=self._start.device, dtype=self.dtype) for c in (self._alphas, self._betas))
        return alphas, betas[:-1], betas[-1]

    def host_coefficients(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Of the first process: ``alphas (m,)``, ``betas (m - 1,)`` and ``beta_m``, float64."""
        m = self.num_steps
        return self._alphas[0, 1 : m + 1], self._betas[0, 1:m], float(self._betas[0, m])

    def basis(self) -> torch.Tensor:
        """The ``(b, m, size)`` orthonormal bases (rows), if kept."""
        return self._basis[:, : self.num_steps]

    def _next_vector(self) -> tuple[torch.Tensor, torch.Tensor]:
        beta = self._beta
        if not self.exhausted:
            return self._residual / beta, beta
        broken = torch.as_tensor(self._breakdown, device=beta.device)
        beta = torch.where(broken, torch.zeros_like(beta), beta)
        self._betas[self._breakdown, self.num_steps] = 0.0
        self._last_beta = np.where(self._breakdown, 0.0, self._last_beta)
        vector = self._residual / torch.where(broken, torch.ones_like(beta), beta)
        if self._reorthogonalize:
            against = self._basis[broken, : self.num_steps]
        else:
            against = self._current[:, broken].T.unsqueeze(1)
        for _ in range(3):  # a draw inside the basis's span (a generator replaying the
            # start vector's draw) leaves rounding noise: draw again
            drawn = self._op.probes(int(broken.sum()), "gaussian", self._generator)
            fresh = _project_out(drawn, against)
            norms = torch.linalg.vector_norm(fresh, dim=0)
            if bool((norms > self._tiny * torch.linalg.vector_norm(drawn, dim=0)).all()):
                break
        vector[:, broken] = fresh / norms
        # the new sequence loses orthogonality against the converged old block faster
        # than Simon's estimate follows: measure it from here on (NOTE [semi-orthogonality])
        self._estimate = None
        return vector, beta

    def _store(self, j: int, vector: torch.Tensor) -> None:
        if self._basis is None:
            return
        basis = self._basis
        if j == basis.shape[1]:
            width, capacity, size = basis.shape
            grown = basis.new_empty((width, min(2 * capacity, size), size))
            grown[:, :capacity] = basis
            basis = self._basis = grown
        for i in range(basis.shape[0]):  # 1-d copies: a (1, n) view of an (n, 1) column
            basis[i, j].copy_(vector[:, i])  # copies 20x slower on CPU (torch 2.13)


class _OrthogonalityEstimate:
    """Simon's estimate of the loss of orthogonality ``omega_(j,k) = q_j^T q_k`` of ``b``
    Lanczos processes, from their coefficients alone.

    ``advance`` takes step ``j``'s ``alpha_j``, ``beta_j`` (``(b,)`` arrays), the
    running ``||A||`` estimate and the run's coefficients of the earlier steps,
    computes the row ``omega_(j+1, .)`` of the next vector and says whether it must
    be reorthogonalised: when some ``|omega_(j+1,k)|``, ``k < j``, exceeds
    ``sqrt(eps)``, and at the step after such a reorthogonalisation (the next vector
    inherits the previous one's components).

    NOTE [semi-orthogonality]: a basis orthogonal to ``sqrt(eps)`` (semi-orthogonal)
    gives a tridiagonal ``T`` whose Ritz values, and the Gauss rules of stochastic
    Lanczos quadrature, are accurate to rounding as with full orthogonality (H. D.
    Simon, "The Lanczos algorithm with partial reorthogonalization", Math. Comp. 42,
    1984). Simon's recurrence follows ``omega`` from the three-term recurrence itself:
    taking ``q_k^T`` of ``beta_j q_(j+1) = A q_j - alpha_j q_j - beta_(j-1) q_(j-1)``
    and using the symmetry of ``A``,

        beta_j w_(j+1,k) = beta_k w_(j,k+1) + (alpha_k - alpha_j) w_(j,k)
                           + beta_(k-1) w_(j,k-1) - beta_(j-1) w_(j-1,k) + rounding,

    with the rounding counted at ``eps ||A||`` against orthogonality and the local
    level ``w_(j+1,j)`` at ``eps ||A|| / beta_j``. That costs ``O(j)`` scalars per
    step instead of reading the ``(j, size)`` basis, which was most of a step's own
    cost on a large operator; the basis is read only when the estimate passes
    ``sqrt(eps)``, twice then. After a reorthogonalisation the estimate restarts at
    ``eps ||A|| / beta_j`` (measured: ``eps`` is too optimistic next to a small
    ``beta_j``, where one step then loses all orthogonality). Checked against the
    measured ``|Q^T q|`` on uniform, geometric, clustered and indefinite spectra in
    float32 and float64: the basis stayed within ``sqrt(eps)`` and the estimate was
    at or above the measurement up to a factor 5 at levels far below the threshold;
    on the 102k-parameter benchmark Hessian's top eigenvalue (77 steps, float32) it
    reorthogonalised twice. Eigenvalue runs without eigenvectors and the density use
    it; eigenvectors and ``lanczos``'s returned basis keep full orthogonality.

    After a restart (NOTE [invariant subspaces] in :func:`lanczos`) the estimate is
    dropped and the run measures ``Q^T r`` at every step instead (reorthogonalising
    when a coefficient passes ``sqrt(eps) ||r||``): every Ritz value of the old block
    has converged, and the new sequence loses orthogonality against it faster than
    the recurrence follows (a review measured 7-10x a step against the estimate's 4x
    on an operator with 20 distinct eigenvalues, and densities with nodes outside the
    spectrum). Restarts need an invariant Krylov space, so this is the rare case.
    """

    def __init__(self, width: int, eps: float, capacity: int) -> None:
        self._eps = eps
        self._tolerance = eps**0.5
        self._steps = 0
        # column c + 1 holds index c; column 0 is a zero pad, so that w_(j,-1) is 0 and
        # every term of the recurrence is one slice (the coefficients come that way)
        columns = max(capacity, 2) + 3
        self._previous = np.zeros((width, columns))  # w_(j-1, .)
        self._current = np.zeros((width, columns))   # w_(j, .)
        self._current[:, 1] = 1.0
        self._pending = False

    def advance(self, alpha: np.ndarray, beta: np.ndarray, scale: np.ndarray,
                a: np.ndarray, b: np.ndarray) -> bool:
        """Row ``j + 1`` from rows ``j`` and ``j - 1``; True: reorthogonalise now.

        ``a`` and ``b`` hold ``alpha_k`` and ``beta_k`` of the steps ``k < j`` in column
        ``k + 1``, column 0 zero (the run's host coefficients)."""
        j = self._steps
        if j + 3 > self._current.shape[1]:
            self._grow()
        w, row = self._current, self._previous
        noise = self._eps * scale    # rounding of one step, counted against orthogonality
        regular = bool((beta > 0).all())   # else a breakdown: reorthogonalise, restart
        lost = False
        if j > 0:
            # beta_j w_(j+1,k) = beta_k w_(j,k+1) + (alpha_k - alpha_j) w_(j,k)
            #                    + beta_(k-1) w_(j,k-1) - beta_(j-1) w_(j-1,k) + rounding
            t = b[:, 1 : j + 1] * w[:, 2 : j + 2]
            t += (a[:, 1 : j + 1] - alpha[:, None]) * w[:, 1 : j + 1]
            t += b[:, :j] * w[:, :j]
            t -= b[:, j : j + 1] * row[:, 1 : j + 1]   # row still holds w_(j-1, .)
            t += np.copysign(noise[:, None], t)
            if regular:
                np.divide(t, beta[:, None], out=row[:, 1 : j + 1])
            else:
                row[:, 1 : j + 1] = np.inf
            lost = float(np.abs(row[:, 1 : j + 1]).max()) > self._tolerance
        # the three-term recurrence's own level
        row[:, j + 1] = noise / beta if regular else np.inf
        row[:, j + 2] = 1.0
        self._previous, self._current = w, row
        self._steps = j + 1
        forced = self._pending
        self._pending = lost and not forced
        return forced or lost

    def reorthogonalized(self, beta: np.ndarray, scale: np.ndarray) -> None:
        """The new vector was orthogonalised against the whole basis; ``beta`` is its new
        norm. What is left is the rounding of the recurrence, ``eps ||A|| / beta``: near
        a breakdown (small ``beta``) that is far above ``eps``, and the estimate then asks
        for reorthogonalisation at every step."""
        j = self._steps
        level = np.divide(self._eps * scale, beta, out=np.full_like(beta, np.inf),
                          where=beta > 0)
        self._current[:, 1 : j + 1] = np.maximum(level, self._eps)[:, None]

    def _grow(self) -> None:
        for name in ("_previous", "_current"):
            old = getattr(self, name)
            new = np.zeros((old.shape[0], 2 * old.shape[1]))
            new[:, : old.shape[1]] = old
            setattr(self, name, new)


def _project_out(vectors: torch.Tensor, against: torch.Tensor, *, semi: bool = False
                 ) -> torch.Tensor:
    """Remove from each column of ``vectors (n, b)`` its part in the rows of ``against (b, c, n)``.

    Classical Gram-Schmidt, ``r - Q (Q^T r)``, with the Daniel-Gragg-Kaufman-Stewart
    criterion: a second pass runs when the first one shrank a column below
    ``1/sqrt(2)`` of its norm (heavy cancellation), which restores orthogonality to
    rounding level. With ``semi`` the columns are left as they are when every
    coefficient ``Q^T r`` is below ``sqrt(eps) ||r||`` (semi-orthogonality measured,
    NOTE [semi-orthogonality]).
    """
    # rows (b, 1, n) against the basis in its stored (b, c, n) layout: both products
    # stream the basis contiguously (4x faster than column products on a 100k basis)
    rows = vectors.T.unsqueeze(1)
    before = torch.linalg.vector_norm(rows, dim=2)
    coefficients = torch.bmm(rows, against.mT)
    tolerance = torch.finfo(vectors.dtype).eps ** 0.5
    if semi and bool((coefficients.abs().amax(dim=2) <= tolerance * before).all()):
        return vectors
    rows = rows - torch.bmm(coefficients, against)
    after = torch.linalg.vector_norm(rows, dim=2)
    if bool((after < _DGKS * before).any()):
        rows = rows - torch.bmm(torch.bmm(rows, against.mT), against)
    return rows.squeeze(1).T.contiguous()


_DGKS = 2 ** -0.5
