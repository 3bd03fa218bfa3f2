"""Mutation testing of hessfunc's core modules with mutmut 3, one module group at a time.

    python tools/mutation.py                          # every group (hours on 2 cores)
    python tools/mutation.py reference                # one group
    python tools/mutation.py --list                   # the groups, their files and tests
    python tools/mutation.py --report                 # the table from the last runs only
    python tools/mutation.py chain --survivors        # ... and each survivor's diff
    python tools/mutation.py diagonal_dense --rerun-survivors --with tests/test_surface.py

Each group (:data:`GROUPS`) mutates a few files and runs only the test files that
exercise them, so that a group fits in minutes to an hour on 2 cores. A group runs
in its own scratch project, ``build/mutation/<group>/`` (``build/`` is git-ignored):
a copy of the committed ``hessfunc/``, ``tests/``, ``conftest.py``, ``pyproject.toml``
and the documentation the tests read (``git archive HEAD``; ``--worktree`` copies the working tree
instead), whose ``pyproject.toml`` gets a generated ``[tool.mutmut]`` section, so
the repository's own ``pyproject.toml`` needs none. mutmut then works in
``build/mutation/<group>/mutants/`` as usual; ``--resume`` keeps a group's scratch
project and mutmut's cached verdicts (only mutants without a verdict run again).

Score = killed / (mutants - equivalent), where "killed" counts mutmut's killed and
timeout verdicts, and the equivalent mutants (a mutation that cannot change any
result) are the ones listed, with the reason, in ``tools/mutation_equivalent.txt``.
A listed mutant that no longer survives (or no longer exists) is reported as stale.

mutmut runs under ``nice -n 10`` with ``--max-children 1`` by default (the machine
is shared); ``--jobs N`` uses N workers. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutation"
EQUIVALENT_FILE = ROOT / "tools" / "mutation_equivalent.txt"


@dataclass(frozen=True)
class Group:
    files: tuple[str, ...]   # only_mutate glob patterns, relative to the repository root
    tests: tuple[str, ...]   # the test files that run against each mutant


_GRAPH_TESTS = ("tests/test_graph.py", "tests/test_ggn.py", "tests/test_hessian.py")

GROUPS: dict[str, Group] = {
    # the loop oracle: its own tests (finite differences, closed forms)
    "reference": Group(("hessfunc/reference.py",), ("tests/test_reference.py",)),
    # the diagonal and dense routes
    "diagonal_dense": Group(("hessfunc/diagonal.py", "hessfunc/dense.py"),
                            ("tests/test_hessian.py", "tests/test_frozen_layers.py",
                             "tests/test_surface.py", "tests/test_robustness.py",
                             "tests/test_mutation_kills.py")),
    # the products: hvp, hvp_fn, HVPFunction (route choice, batching)
    "products": Group(("hessfunc/products.py",),
                      ("tests/test_grad_hvp.py", "tests/test_conv_settings.py",
                       "tests/test_operator.py", "tests/test_robustness.py")),
    # the structured products (R-operator rules of Linear/conv chains)
    "chain_products": Group(("hessfunc/graph/chain_products.py",),
                            ("tests/test_grad_hvp.py", "tests/test_conv_settings.py",
                             "tests/test_hessian.py", "tests/test_graph_chain.py",
                             "tests/test_ggn.py", "tests/test_operator.py")),
    # the chain's full Hessian (per-sample Hessian backpropagation)
    "chain": Group(("hessfunc/graph/chain_plan.py",),
                   ("tests/test_hessian.py", "tests/test_graph.py",
                    "tests/test_frozen_layers.py", "tests/test_graph_chain.py",
                    "tests/test_ggn.py")),
    # the captured-graph engine, one file a group (together about 2.5 hours on 2 cores):
    # the per-sample proof, the op rules, the frontier propagation
    "graph_samples": Group(("hessfunc/graph/samples.py",), _GRAPH_TESTS),
    "graph_rules": Group(("hessfunc/graph/rules.py",), _GRAPH_TESTS),
    "graph_curvature": Group(("hessfunc/graph/curvature.py",),
                             (*_GRAPH_TESTS, "tests/test_graph_chain.py")),
    # chains read off the captured graph (the R-operator products of any f)
    "graph_chain": Group(("hessfunc/graph/chain.py",), ("tests/test_graph_chain.py",
                                                       "tests/test_ggn.py")),
    # Gauss-Newton and Fisher: output factors, Fisher columns, GGN routes
    "ggn": Group(("hessfunc/ggn.py",), ("tests/test_ggn.py", "tests/test_solve.py")),
    # the stochastic estimators and their probes
    "hutchinson": Group(("hessfunc/estimators/_probes.py", "hessfunc/estimators/hutchinson.py",
                         "hessfunc/estimators/hutchpp.py"), ("tests/test_estimators.py",)),
    "lanczos": Group(("hessfunc/estimators/lanczos.py",), ("tests/test_estimators.py",)),
    "slq": Group(("hessfunc/estimators/slq.py", "hessfunc/estimators/__init__.py"),
                 ("tests/test_estimators.py",)),
}

# mutmut's exit-code verdicts, grouped for the score
KILLED = {"killed", "timeout", "caught by type check"}
SURVIVED = {"survived"}


def mutmut_section(group: Group) -> str:
    """The ``[tool.mutmut]`` section of a group's scratch ``pyproject.toml``."""
    def toml_list(items: tuple[str, ...] | list[str]) -> str:
        return "[" + ", ".join(f'"{s}"' for s in items) + "]"

    return "\n".join([
        "", "[tool.mutmut]",
        'source_paths = ["hessfunc"]',              # the whole package is copied ...
        f"only_mutate = {toml_list(group.files)}",  # ... and only these files are mutated
        f"pytest_add_cli_args_test_selection = {toml_list(group.tests)}",
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]',  # stop at a kill
        'also_copy = ["conftest.py", "docs", "README.md", "mkdocs.yml"]',
        # a mutant that makes a test loop much longer is a timeout (counted as killed)
        "timeout_multiplier = 10.0",
        "",
    ])


#: Appended to the scratch copy's tests/conftest.py: the same examples as the "ci" profile,
#: but a failing example is not shrunk (shrinking a failure is what makes a killed mutant
#: slow, often slow enough to be a timeout) and no example database carries failures
#: from one mutant to the next.
HYPOTHESIS_PROFILE = """

# ---- added by tools/mutation.py (scratch copy only) ----
from hypothesis import Phase as _Phase  # noqa: E402
from hypothesis import settings as _settings  # noqa: E402

_settings.register_profile(
    "mutation", parent=_settings.get_profile("ci"), database=None, print_blob=False,
    phases=[_Phase.explicit, _Phase.reuse, _Phase.generate])
_settings.load_profile("mutation")
"""


def prepare(name: str, group: Group, worktree: bool) -> Path:
    """A fresh scratch project for ``group`` in ``build/mutation/<name>``."""
    work = WORK / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    # docs, README.md, mkdocs.yml: some tests read them (test_robustness's catalogue check)
    paths = ["hessfunc", "tests", "conftest.py", "pyproject.toml", "docs", "README.md",
             "mkdocs.yml"]
    if worktree:
        for p in paths:
            src = ROOT / p
            if src.is_dir():
                shutil.copytree(src, work / p,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, work / p)
    else:
        archive = work / "head.tar"
        subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), "HEAD", *paths],
                       cwd=ROOT, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        archive.unlink()
    conftest = work / "tests" / "conftest.py"
    if conftest.exists():
        with open(conftest, "a") as fh:
            fh.write(HYPOTHESIS_PROFILE)
    write_section(work, group)
    return work


def write_section(work: Path, group: Group) -> None:
    """(Re)write the scratch ``pyproject.toml``'s ``[tool.mutmut]`` section for ``group``."""
    text = (work / "pyproject.toml").read_text()
    text = re.sub(r"\n\[tool\.mutmut\]\n(?:(?!\n\[).)*", "", text, flags=re.S)  # replace any
    (work / "pyproject.toml").write_text(text.rstrip("\n") + "\n" + mutmut_section(group))


def read_metas(work: Path) -> dict[Path, dict]:
    """mutmut's per-file verdict files (``mutants/**/*.py.meta``, JSON)."""
    return {p: json.loads(p.read_text()) for p in (work / "mutants").rglob("*.py.meta")}


def merge_metas(work: Path, before: dict[Path, dict], rerun: set[str]) -> None:
    """Keep the earlier verdicts, except that a re-run mutant takes its new verdict when
    it has one (killed by the added tests, or still surviving)."""
    for path, old in before.items():
        new = json.loads(path.read_text()) if path.exists() else {}
        codes = dict(old.get("exit_code_by_key", {}))
        for key, code in new.get("exit_code_by_key", {}).items():
            if key in rerun and code is not None:
                codes[key] = code
        path.write_text(json.dumps({**new, **{k: v for k, v in old.items()
                                              if k != "exit_code_by_key"},
                                    "exit_code_by_key": codes}, indent=4))


def run_mutmut(work: Path, jobs: int, log: Path, mutants: list[str] | None = None) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    mutmut = shutil.which("mutmut") or str(Path(sys.executable).with_name("mutmut"))
    cmd = ["nice", "-n", "10", mutmut, "run", "--max-children", str(jobs), *(mutants or [])]
    with open(log, "w") as fh:
        return subprocess.run(cmd, cwd=work, env=env, stdout=fh,
                              stderr=subprocess.STDOUT).returncode


def verdicts(work: Path) -> dict[str, str]:
    """``{mutant name: status}`` from ``mutmut results --all true`` in ``work``."""
    mutmut = shutil.which("mutmut") or str(Path(sys.executable).with_name("mutmut"))
    out = subprocess.run([mutmut, "results", "--all", "true"], cwd=work, capture_output=True,
                         text=True, check=False).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def show(work: Path, mutant: str) -> str:
    mutmut = shutil.which("mutmut") or str(Path(sys.executable).with_name("mutmut"))
    return subprocess.run([mutmut, "show", mutant], cwd=work, capture_output=True, text=True,
                          check=False).stdout


def recheck(work: Path, mutants: list[str], tests: list[str]) -> dict[str, bool]:
    """Run each surviving mutant against more test files (``tests``, as copied into the
    group's scratch project, i.e. from the commit the group ran on): ``{mutant: killed}``.
    mutmut selects a mutant through the ``MUTANT_UNDER_TEST`` variable its trampolines
    read; the files must pass without a mutant first."""
    root = work / "mutants"

    def pytest(mutant: str) -> int:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MUTANT_UNDER_TEST": mutant,
               "PYTHONPATH": str(root)}
        return subprocess.run(["nice", "-n", "10", sys.executable, "-m", "pytest", "-x", "-q",
                               "-p", "no:cacheprovider", *tests], cwd=root, env=env,
                              capture_output=True, text=True).returncode

    clean = pytest("")
    if clean != 0:
        raise SystemExit(f"recheck: {' '.join(tests)} fail without a mutant (pytest rc {clean})")
    killed = {}
    for mutant in mutants:
        rc = pytest(mutant)
        killed[mutant] = rc == 1   # a test failed (a collection error would be rc 2)
        print(f"  recheck {mutant}: {'killed' if killed[mutant] else f'not killed (rc {rc})'}",
              flush=True)
    return killed


def read_equivalent(path: Path = EQUIVALENT_FILE) -> dict[str, str]:
    """``{mutant name: reason}``: lines ``<name> | <reason>``; ``#`` starts a comment."""
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip() if line.lstrip().startswith("#") else line.strip()
        if not line:
            continue
        name, _, reason = line.partition("|")
        out[name.strip()] = reason.strip()
    return out


@dataclass
class Score:
    group: str
    total: int = 0
    killed: int = 0
    survived: int = 0
    equivalent: int = 0
    other: int = 0          # no tests, suspicious, segfault, not checked, ...
    survivors: tuple[str, ...] = ()
    stale: tuple[str, ...] = ()
    minutes: float | None = None

    @property
    def score(self) -> float | None:
        denom = self.total - self.equivalent
        return self.killed / denom if denom > 0 else None


def score(name: str, found: dict[str, str], equivalent: dict[str, str]) -> Score:
    s = Score(name, total=len(found))
    survivors, stale = [], []
    for mutant, status in sorted(found.items()):
        if status in KILLED:
            s.killed += 1
        elif status in SURVIVED:
            if mutant in equivalent:
                s.equivalent += 1
            else:
                s.survived += 1
                survivors.append(mutant)
        else:
            s.other += 1
            survivors.append(f"{mutant} ({status})")
    prefixes = {mutant.split(".x_")[0] for mutant in found}
    for mutant in equivalent:
        if mutant.split(".x_")[0] in prefixes and found.get(mutant) != "survived":
            stale.append(f"{mutant} ({found.get(mutant, 'no such mutant')})")
    s.survivors, s.stale = tuple(survivors), tuple(stale)
    return s


def table(scores: list[Score]) -> str:
    lines = ["| group | mutants | killed | survived | equivalent | other | score | minutes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in scores:
        sc = "—" if s.score is None else f"{100 * s.score:.1f} %"
        mins = "—" if s.minutes is None else f"{s.minutes:.0f}"
        lines.append(f"| {s.group} | {s.total} | {s.killed} | {s.survived} | {s.equivalent} | "
                     f"{s.other} | {sc} | {mins} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="*", help=f"groups to run (default: all): {', '.join(GROUPS)}")
    ap.add_argument("--list", action="store_true", help="list the groups and exit")
    ap.add_argument("--report", action="store_true", help="only tabulate the last runs")
    ap.add_argument("--resume", action="store_true",
                    help="keep the scratch project and mutmut's cached verdicts")
    ap.add_argument("--worktree", action="store_true",
                    help="copy the working tree instead of the committed HEAD")
    ap.add_argument("--jobs", type=int, default=1, help="mutmut --max-children (default 1)")
    ap.add_argument("--survivors", action="store_true",
                    help="print each survivor's diff of the last run (runs nothing: with a "
                         "group alone it would start the group's run afresh)")
    ap.add_argument("--rerun-survivors", action="store_true",
                    help="re-run only the last run's survivors, with the group's current "
                         "test files (after adding tests, or test files to GROUPS)")
    ap.add_argument("--with", dest="with_tests", nargs="+", metavar="TEST_FILE",
                    help="with --rerun-survivors: these test files instead of the group's")
    ap.add_argument("--recheck", nargs="+", metavar="TEST_FILE",
                    help="run each survivor against these (more) test files, without "
                         "running mutmut again; reports which of them would kill it")
    args = ap.parse_args(argv)
    if args.survivors and not (args.rerun_survivors or args.recheck):
        args.report = True  # reading the last run's survivors must not start a new run
    names = args.groups or list(GROUPS)
    for n in names:
        if n not in GROUPS:
            ap.error(f"unknown group {n!r}; choose from {', '.join(GROUPS)}")
    if args.list:
        for n in names:
            print(f"{n}: mutates {', '.join(GROUPS[n].files)}; tests {', '.join(GROUPS[n].tests)}")
        return 0
    equivalent = read_equivalent()
    scores = []
    for n in names:
        work = WORK / n
        minutes = None
        if args.recheck:
            s = score(n, verdicts(work), equivalent)
            recheck(work, [m for m in s.survivors if " " not in m], args.recheck)
            continue
        if args.rerun_survivors:
            # more test files (the group's, or --with): mutmut re-collects which tests cover
            # which function and runs only the named (surviving) mutants; a changed test
            # selection makes mutmut forget every verdict, so they are kept and merged here
            tests = tuple(args.with_tests or GROUPS[n].tests)
            names_ = [m for m in score(n, verdicts(work), equivalent).survivors if " " not in m]
            before = read_metas(work)
            write_section(work, Group(GROUPS[n].files, tests))
            t0 = time.time()
            print(f"[{n}] re-running {len(names_)} survivors with {', '.join(tests)}", flush=True)
            try:
                if names_:
                    run_mutmut(work, args.jobs, work / "mutmut-rerun.log", names_)
            finally:
                merge_metas(work, before, set(names_))
            minutes = (time.time() - t0) / 60
        elif not args.report:
            if not (args.resume and work.exists()):
                work = prepare(n, GROUPS[n], args.worktree)
            t0 = time.time()
            print(f"[{n}] mutmut run in {work.relative_to(ROOT)} (log: mutmut.log)", flush=True)
            rc = run_mutmut(work, args.jobs, work / "mutmut.log")
            minutes = (time.time() - t0) / 60
            if rc != 0:
                print(f"[{n}] mutmut exited with {rc}; see {work / 'mutmut.log'}", flush=True)
        elif not work.exists():
            print(f"[{n}] no run yet", flush=True)
            continue
        s = score(n, verdicts(work), equivalent)
        s.minutes = minutes
        scores.append(s)
        print(f"[{n}] {s.killed}/{s.total - s.equivalent} killed", flush=True)
        for mutant in s.survivors:
            print(f"  not killed: {mutant}")
            if args.survivors:
                print(show(work, mutant.split(" ")[0]))
        for mutant in s.stale:
            print(f"  stale equivalence entry: {mutant}")
    print()
    print(table(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
