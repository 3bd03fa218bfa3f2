"""The hessfunc command: demo and analyze end to end, and their one-line errors."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hessfunc as hf
from hessfunc.app.demo import SimpleNet, target_function
from hessfunc.cli import main


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--epochs", "50", "--out", str(out), "--dtype", "float64"]) == 0
    return out


def test_demo_writes_every_file(demo_out):
    for name, size in [("fit.png", (800, 500)), ("spectrum.png", (800, 500)),
                       ("diagonal.png", (900, 500))]:
        assert _png_size(demo_out / name) == size
    report = json.loads((demo_out / "report.json").read_text())
    for key in ("loss", "grad_norm", "top_eigenvalues", "trace_exact", "trace_hutchinson",
                "diagonal", "blocks", "spectral_density", "training", "diagonal_speedup"):
        assert key in report, key
    assert report["num_params"] == 141 and report["num_samples"] == 1000


def test_demo_report_agrees_with_direct_library_calls(demo_out):
    report = json.loads((demo_out / "report.json").read_text())
    torch.manual_seed(0)
    model = SimpleNet().double()
    x = torch.linspace(-10, 10, 1000, dtype=torch.float64).view(-1, 1)
    y = target_function(x)
    f, params = hf.functionalize(model, nn.MSELoss())
    for _ in range(50):
        g = hf.grad(f)(params, x, y)
        params = {k: p - 0.01 * g[k] for k, p in params.items()}
    assert report["loss"] == pytest.approx(float(f(params, x, y)), rel=1e-12)
    g = torch.cat([t.reshape(-1) for t in hf.grad(f)(params, x, y).values()])
    assert report["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-10)
    diag = hf.hessian_diag(f)(params, x, y)
    for name, values in report["diagonal"].items():
        np.testing.assert_allclose(values, diag[name].reshape(-1).numpy(), rtol=1e-10,
                                   atol=1e-12)
    assert report["trace_exact"] == pytest.approx(float(sum(d.sum() for d in diag.values())),
                                                  rel=1e-10)
    H = hf.hessian(f, flat=True)(params, x, y)
    evals = torch.linalg.eigvalsh(H).flip(0)[:5]
    np.testing.assert_allclose(report["top_eigenvalues"], evals.numpy(), rtol=1e-7)
    assert report["diagonal_max_rel_error"] < 1e-10
    blocks = hf.hessian_blocks(f)(params, x, y)
    for name, b in report["blocks"].items():
        assert b["frobenius_norm"] == pytest.approx(float(blocks[name].norm()), rel=1e-10)
    assert report["density_integral"] == pytest.approx(1.0, abs=1e-3)
    assert report["training"][0]["loss"] > report["final_loss"]


MODEL_FILE = textwrap.dedent("""
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))

    def broken():
        raise RuntimeError("factory failed")

    def loss(out, y):
        return ((out - y) ** 2).mean()
""")


@pytest.fixture()
def user_files(tmp_path, monkeypatch):
    (tmp_path / "usermodels.py").write_text(MODEL_FILE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 3, generator=g), torch.randn(40, 2, generator=g)
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    torch.save({"x": torch.randn(5, 4), "y": torch.randn(5, 2)}, tmp_path / "wrong.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    torch.manual_seed(5)
    sd = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).state_dict()
    torch.save(sd, tmp_path / "weights.pt")
    return tmp_path, x, y, sd


@pytest.mark.parametrize("data", ["data.pt", "data.npz"])
def test_analyze_report_matches_library(user_files, data):
    tmp, x, y, sd = user_files
    out = tmp / "out"
    code = main(["analyze", "--model", "usermodels:make", "--data", data, "--loss",
                 "usermodels:loss", "--batch-size", "16", "--state-dict", "weights.pt",
                 "--top-k", "3", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    model.load_state_dict(sd)
    H = hf.HessianOperator.from_model(model, lambda o, t: ((o - t) ** 2).mean(), (x, y))
    np.testing.assert_allclose(report["top_eigenvalues"],
                               torch.linalg.eigvalsh(H.to_dense()).flip(0)[:3].numpy(),
                               rtol=1e-4)
    assert report["trace_exact"] == pytest.approx(float(H.trace()), rel=1e-4)
    # the density's probes by default: from 3 until its standard error is below 2 %
    runs, error = report["density_probes_run"], report["density_standard_error"]
    assert report["density_probes"] is None and 3 <= runs <= 10
    assert error <= 0.02 or runs == 10
    for name in ("spectrum.png", "diagonal.png"):
        assert _png_size(out / name) in {(800, 500), (900, 500)}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["analyze", "--model", "nosuchmodule:make", "--data", "data.pt"], "cannot import"),
        (["analyze", "--model", "usermodels:nothing", "--data", "data.pt"], "no attribute"),
        (["analyze", "--model", "usermodels", "--data", "data.pt"], "MODULE:NAME"),
        (["analyze", "--model", "usermodels:broken", "--data", "data.pt"], "factory raised"),
        (["analyze", "--model", "usermodels:make", "--data", "missing.pt"], "no such file"),
        (["analyze", "--model", "usermodels:make", "--data", "garbage.pt"], "cannot read"),
        (["analyze", "--model", "usermodels:make", "--data", "wrong.pt"], "do not fit"),
        (["analyze", "--model", "usermodels:make", "--data", "data.pt", "--state-dict",
          "data.pt"], "cannot load"),
        (["analyze", "--model", "usermodels:make", "--data", "data.pt", "--batch-size", "0"],
         "positive integer"),
        (["demo", "--epochs", "-3"], "positive integer"),
        (["demo", "--dtype", "float16"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(user_files, args, message, capsys):
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0]


def test_bad_argument_in_a_real_process_has_no_traceback(user_files):
    proc = subprocess.run([sys.executable, "-m", "hessfunc", "analyze", "--model",
                           "usermodels:make", "--data", "wrong.pt"], capture_output=True,
                          text=True, cwd=user_files[0], timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "do not fit the model" in proc.stderr


def test_version_and_help():
    proc = subprocess.run([sys.executable, "-m", "hessfunc", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"hessfunc {hf.__version__}"
    proc = subprocess.run([sys.executable, "-m", "hessfunc", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "demo" in proc.stdout and "analyze" in proc.stdout


def test_analyze_progress_options_and_table(user_files, capsys):
    """One progress line per stage with the time left for the whole run; --probes,
    --density-probes and --lanczos-steps reach the report; no table value is cut and
    times are in the unit a person reads."""
    tmp, *_ = user_files
    out = tmp / "out2"
    code = main(["analyze", "--model", "usermodels:make", "--data", "data.pt", "--loss",
                 "usermodels:loss", "--top-k", "5", "--probes", "7", "--density-probes", "2",
                 "--lanczos-steps", "5", "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    stages = [ln for ln in captured.err.splitlines() if ln.startswith("[")]
    assert [ln.split("]")[0] for ln in stages] == [f"[{i}/5" for i in range(1, 6)], stages
    assert all("left" in ln for ln in stages[1:]) and "elapsed" in stages[0]
    report = json.loads((out / "report.json").read_text())
    assert report["density_probes"] == 2 and report["density_steps"] == 5
    assert report["density_probes_run"] == 2
    assert report["hutchinson_samples"] == 7
    eig_line = next(ln for ln in captured.out.splitlines() if "top eigenvalues" in ln)
    assert all(f"{v:.5g}" in eig_line for v in report["top_eigenvalues"])
    assert " ms" in captured.out and "000.00 ms" not in captured.out


def test_format_duration():
    from hessfunc.app.report import format_duration

    assert format_duration(2.5e-4) == "250 us"
    assert format_duration(0.01234) == "12.3 ms"
    assert format_duration(4.567) == "4.57 s"
    assert format_duration(222.1) == "3 min 42 s"
    assert format_duration(7300) == "2 h 1 min"


def test_report_estimates_diagonal_and_trace_from_one_set_of_probes(monkeypatch):
    """Where the diagonal is a Hutchinson estimate, the report's Hutchinson trace uses
    the same probes (one pass of products, not two); both equal the estimators run on
    the dense oracle Hessian with the same seed, and the density (as many probes: a
    product of that width for other probes) is not answered from them."""
    from hessfunc.app import report as rp
    from hessfunc.estimators import hutchinson_diagonal, hutchinson_trace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    x, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    f, params = hf.functionalize(model, nn.MSELoss())
    monkeypatch.setattr(rp, "GENERIC_DIAG_MAX_PARAMS", 0)
    monkeypatch.setattr(rp, "_structured_diagonal", lambda *args: False)
    widths = []
    real = hf.HessianOperator.matmat
    monkeypatch.setattr(hf.HessianOperator, "matmat",
                        lambda self, V: widths.append(V.shape[1]) or real(self, V))
    before_density = []
    density_of = hf.HessianOperator.spectral_density
    monkeypatch.setattr(hf.HessianOperator, "spectral_density",
                        lambda self, **kw: before_density.append(len(widths))
                        or density_of(self, **kw))
    rep = rp.curvature_report(f, params, (x, y), top_k=1, hutchinson_samples=7,
                              density_probes=7, density_steps=3, compare_oracle=False)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    H = hf.reference.hessian(f(leaves, x, y), list(leaves.values()))
    P = H.shape[0]
    trace = hutchinson_trace(lambda V: H @ V, P, num_samples=7, dtype=H.dtype,
                             generator=torch.Generator().manual_seed(0))
    diag = hutchinson_diagonal(lambda V: H @ V, P, num_samples=7, dtype=H.dtype,
                               generator=torch.Generator().manual_seed(0))
    density = hf.HessianOperator(f, params, (x, y)).spectral_density(num_probes=7, num_steps=3,
                                                                     seed=0)
    np.testing.assert_allclose(rep.density, density.density.numpy(), rtol=1e-8, atol=1e-10)
    assert widths[:before_density[0]].count(7) == 1
    assert rep.numbers["trace_hutchinson"] == pytest.approx(float(trace.estimate), rel=1e-10)
    assert rep.numbers["trace_hutchinson_std_error"] == pytest.approx(float(trace.std_error),
                                                                      rel=1e-10)
    got = torch.cat([rep.diagonal[k].reshape(-1) for k in params])
    torch.testing.assert_close(got, diag, rtol=1e-10, atol=1e-12)
