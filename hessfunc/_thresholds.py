"""The thresholds at which a route or a backend switches, in one place.

Each is a measured choice (the NOTE named beside it gives the measurement and the
reasoning; docs/benchmarks.md the figures), tested on both sides of it. Modules read
them from here at call time, so that a test can move one with ``monkeypatch``.
"""

from __future__ import annotations

from fractions import Fraction

#: NOTE [convolutions as matrix products] (``graph/chain_products.py``): a convolution
#: whose channels times kernel size are at most ``PATCH_WIDTH`` on both sides and whose
#: patches fit in ``PATCH_BYTES``, on the CPU, has its products with the cached input
#: and output gradient done as matrix products on patches; else aten's convolutions.
PATCH_WIDTH = 48
PATCH_BYTES = 16 * 2**20

#: NOTE [batched or looped products] (``products.py``): columns of the first batched
#: pass timed against single products, for the cached graph and (at most) for the
#: R-operator, whose first pass also takes at most ``CHAIN_PROBE_BYTES`` of its widest
#: value's tangents (at least 2 columns): wider, its elementwise passes fall out of cache.
PROBE_COLUMNS = 2
CHAIN_PROBE_COLUMNS = 8
CHAIN_PROBE_BYTES = 8 * 2**20

#: Output widths up to which the columns of the output Hessian are plain backward passes
#: (``graph/chain_plan.py``; on the CPU a batched pass costs about three or four plain ones).
PLAIN_COLUMNS = 2

#: NOTE [data span] (``operators/hessian.py``): spectra run on the Hessian restricted to
#: the span of the first layer's inputs when the data set has at most this fraction of
#: samples per input of that layer.
DATA_SPAN_RATIO = Fraction(7, 10)
