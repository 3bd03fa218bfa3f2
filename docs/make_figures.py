"""Run the documentation's code and draw the figures the pages show.

    python docs/make_figures.py            # writes docs/figures/*.png

Every figure is drawn from the namespace left behind by executing a page's
```python blocks (the same code the reader sees and ``tests/test_docs.py``
runs), so a figure cannot show something the page's code does not compute.
The PNGs are committed; rerun this script after changing a page's code.

``python_blocks`` and ``run_page`` are also what ``tests/test_docs.py`` uses to
execute the pages.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
FIGURES = DOCS / "figures"

#: A fenced ```python block, possibly indented (inside an admonition or a list).
_FENCE = re.compile(
    r"^(?P<indent>[ ]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ```python blocks of a Markdown text, in order, as ``(first_line, code)``.

    ``first_line`` is the 1-based line number of the block's first code line.
    Blocks fenced as ```text, ```bash etc. are not returned.
    """
    blocks = []
    for m in _FENCE.finditer(text):
        first_line = text.count("\n", 0, m.start("body")) + 1
        blocks.append((first_line, textwrap.dedent(m.group("body"))))
    return blocks


def run_page(path: Path | str) -> dict[str, Any]:
    """Execute a page's ```python blocks in order in one fresh namespace and return it.

    Each block is compiled under the page's path with its own line numbers, so a
    failing block's traceback points at the line of the Markdown file.
    """
    path = Path(path)
    namespace: dict[str, Any] = {"__name__": f"docs_page_{path.stem.replace('-', '_')}"}
    for first_line, code in python_blocks(path.read_text(encoding="utf-8")):
        exec(compile("\n" * (first_line - 1) + code, str(path), "exec"), namespace)
    return namespace


# --------------------------------------------------------------------- figures
def _save(fig: Any, name: str) -> None:
    FIGURES.mkdir(exist_ok=True)
    fig.savefig(FIGURES / name, dpi=80, metadata={"Software": None})
    print(f"wrote {FIGURES / name} ({(FIGURES / name).stat().st_size // 1024} KiB)")


def fig_autograd_graph(plt: Any) -> None:
    """The graph autograd recorded for the seed's ``o2 = w2(w1(a))``."""
    ns = run_page(DOCS / "tutorials" / "01-autograd-graph.md")
    root = ns["o2"].grad_fn
    params = {id(p): n for n, p in [("w1.weight", ns["w1"].weight), ("w1.bias", ns["w1"].bias),
                                    ("w2.weight", ns["w2"].weight), ("w2.bias", ns["w2"].bias)]}
    levels: dict[int, list[Any]] = {}
    edges = []
    seen: dict[Any, tuple[int, int]] = {}

    def visit(node: Any, depth: int) -> tuple[int, int]:
        if node in seen:
            return seen[node]
        row = levels.setdefault(depth, [])
        row.append(node)
        seen[node] = (depth, len(row) - 1)
        for child, _ in node.next_functions:
            if child is not None:
                edges.append((node, child))
                visit(child, depth + 1)
        return seen[node]

    visit(root, 0)

    def label(node: Any) -> str:
        name = type(node).__name__
        if name == "AccumulateGrad":
            return f"AccumulateGrad\n({params.get(id(node.variable), '?')})"
        if node is root:
            return f"{name}\n(o2.grad_fn)"
        if node is ns["o1"].grad_fn:
            return f"{name}\n(o1.grad_fn)"
        return name

    def xy(node: Any) -> tuple[float, float]:
        depth, i = seen[node]
        n = len(levels[depth])
        return (i - (n - 1) / 2) * 2.6, -depth * 1.25

    fig, ax = plt.subplots(figsize=(8, 4.6))
    for parent, child in edges:
        (x0, y0), (x1, y1) = xy(parent), xy(child)
        ax.annotate("", xy=(x1, y1 + 0.28), xytext=(x0, y0 - 0.28),
                    arrowprops=dict(arrowstyle="->", color="0.4"))
    for node in seen:
        x, y = xy(node)
        leaf = type(node).__name__ == "AccumulateGrad"
        ax.text(x, y, label(node), ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="round", fc="#e8f1fb" if not leaf else "#fdf1dc", ec="0.5"))
    ax.set_xlim(-5.5, 5.5)
    ax.set_ylim(-len(levels) * 1.25 + 0.6, 0.6)
    ax.set_title("o2.grad_fn and everything reachable through next_functions", fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    _save(fig, "autograd-graph.png")
    plt.close(fig)


def fig_training(plt: Any) -> None:
    """Loss curve and fit of the pure-function training loop."""
    ns = run_page(DOCS / "tutorials" / "02-training.md")
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(9, 3.4))
    a0.semilogy(ns["losses"], color="C3")
    a0.set_xlabel("epoch")
    a0.set_ylabel("MSE loss")
    a0.set_title("params <- params - lr * hf.grad(f)(params, x, y)", fontsize=9)
    x, y = ns["x"], ns["y"]
    pred = ns["f"].output(ns["params"], x).detach()
    a1.plot(x.squeeze(), y.squeeze(), label="target", color="C0")
    a1.plot(x.squeeze(), pred.squeeze(), label=f"after {len(ns['losses']) - 1} epochs", color="C3")
    a1.set_xlabel("x")
    a1.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, "training.png")
    plt.close(fig)


def fig_derivatives(plt: Any) -> None:
    """tanh and its first four derivatives from ``hf.derivative``."""
    ns = run_page(DOCS / "tutorials" / "04-higher-order.md")
    t, curves = ns["t"], ns["tanh_derivatives"]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(t, t.tanh(), label="tanh", color="k")
    for n, c in enumerate(curves, start=1):
        ax.plot(t, c, label=f"order {n}")
    ax.axhline(0, color="0.8", lw=0.8)
    ax.set_xlabel("x")
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, 1.16), frameon=False)
    fig.tight_layout()
    _save(fig, "tanh-derivatives.png")
    plt.close(fig)


def fig_blocks(plt: Any) -> None:
    """The full Hessian with the per-parameter blocks outlined."""
    ns = run_page(DOCS / "tutorials" / "06-hessian-blocks.md")
    H, offsets = ns["H"], ns["offsets"]
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(9, 4.2),
                                 gridspec_kw=dict(width_ratios=[1.0, 0.85]))
    lim = float(H.abs().max()) ** 0.5

    def show(ax: Any, M: Any, title: str) -> Any:
        signed_sqrt = M.sign() * M.abs().sqrt()          # a readable colour range
        im = ax.imshow(signed_sqrt, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        return im

    show(a0, H, "hf.hessian(f, flat=True): all 141 x 141 entries")
    for lo, hi in offsets.values():
        a0.add_patch(plt.Rectangle((lo - 0.5, lo - 0.5), hi - lo, hi - lo, fill=False,
                                   ec="k", lw=0.8))
    im = show(a1, ns["blocks"]["2.weight"], 'hessian_blocks(f)(...)["2.weight"]: 100 x 100')
    fig.colorbar(im, ax=a1, fraction=0.046, label="sign(h) sqrt|h|")
    fig.tight_layout()
    _save(fig, "hessian-blocks.png")
    plt.close(fig)


def fig_per_sample(plt: Any) -> None:
    """Per-sample curvature and the network's second input derivative along x."""
    ns = run_page(DOCS / "tutorials" / "07-hessian-diagonal.md")
    x = ns["X"].squeeze()
    per_sample_trace = sum(d.reshape(d.shape[0], -1).sum(1) for d in ns["per_sample"].values())
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(9, 3.2))
    a0.plot(x, per_sample_trace, ".", ms=3, color="C3")
    a0.set_xlabel("x_n")
    a0.set_title("sum of diag(H_n): curvature of each sample's loss", fontsize=9)
    a1.plot(x, ns["input_diag"].squeeze(), color="C0")
    a1.set_xlabel("x")
    a1.set_title("d^2 u / dx^2 of the network, per point (argnums=1)", fontsize=9)
    for ax in (a0, a1):
        ax.axhline(0, color="0.8", lw=0.8)
    fig.tight_layout()
    _save(fig, "per-sample-diagonal.png")
    plt.close(fig)


def fig_spectrum(plt: Any) -> None:
    """SLQ density against the exact eigenvalues of the dense Hessian."""
    ns = run_page(DOCS / "tutorials" / "08-spectra.md")
    sd, exact = ns["density"], ns["all_eigenvalues"]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(sd.grid, sd.density, color="C0", label="H.spectral_density() (SLQ)")
    ax.vlines(exact, 0, 4e-4, color="k", lw=0.6, label="eigenvalues of H.to_dense()")
    for v in ns["top"]:
        ax.axvline(float(v), color="C3", ls=":", lw=1)
    ax.plot([], [], color="C3", ls=":", label="H.eigenvalues(k=3) (Lanczos)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, "spectrum.png")
    plt.close(fig)


FIGURES_BY_NAME = {
    "autograd-graph": fig_autograd_graph,
    "training": fig_training,
    "tanh-derivatives": fig_derivatives,
    "hessian-blocks": fig_blocks,
    "per-sample-diagonal": fig_per_sample,
    "spectrum": fig_spectrum,
}


def main(names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in names or list(FIGURES_BY_NAME):
        FIGURES_BY_NAME[name](plt)


if __name__ == "__main__":
    main(sys.argv[1:])
