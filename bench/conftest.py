"""pytest set-up of the benchmark suites: CPU mode, the case matrix, the results file.

By default the suites run the ``cpu`` matrix of tiny shapes, which CI runs on its CPU as
``pytest bench --benchmark-disable`` so they never rot: without CUDA the Triton kernels run
under the interpreter and every result is labelled as measured on the CPU. The GPU matrices
(``--bench-matrix check|extra|full``) are chosen explicitly.
"""

import os

import pytest
import torch

# The interpreter must be chosen before any @triton.jit kernel is defined (DESIGN.md §5).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import harness  # noqa: E402
from bench.cases import MATRICES, kernel_cases, model_cases  # noqa: E402
from bench.models import Workbench  # noqa: E402

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dinov2_fast benchmarks")
    group.addoption(
        "--bench-matrix",
        choices=MATRICES,
        default=None,
        help="cases to run (bench/cases.py); the default, 'cpu', is tiny shapes on any device",
    )
    group.addoption(
        "--bench-results",
        default=None,
        help="results JSON to write, added to when it exists (default: "
        "bench/results/<gpu-slug>-<date>.json, or a temporary file for the 'cpu' matrix)",
    )


def _matrix(config: pytest.Config) -> str:
    matrix = config.getoption("--bench-matrix") or "cpu"
    if matrix != "cpu" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--bench-matrix {matrix} needs a GPU; without one use 'cpu'")
    return matrix


def pytest_report_header(config: pytest.Config) -> str:
    matrix = _matrix(config)
    if torch.cuda.is_available():
        return f"dinov2_fast bench: matrix {matrix} on {torch.cuda.get_device_name()}"
    return (
        f"dinov2_fast bench: matrix {matrix} on the CPU (tiny shapes, Triton interpreter): "
        "CPU timings, no claim about any GPU"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for name, cases in (("model_case", model_cases), ("kernel_case", kernel_cases)):
        if name in metafunc.fixturenames:
            selected = cases(_matrix(metafunc.config))
            metafunc.parametrize(name, selected, ids=[case.id for case in selected])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # pytest-benchmark's rounds then end only when the GPU work they queued is done.
    timer = pytest.mark.benchmark(timer=harness.synchronized_clock)
    for item in items:
        if str(item.path).startswith(_BENCH_DIR):
            item.add_marker(timer)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session):
    """Drop benchmarks that never finished a round (a run stopped by SIGINT mid-case, as the
    GPU check's time budgets do): pytest-benchmark would fail on their empty statistics and
    write neither its JSON nor its table."""
    benchmarks = getattr(getattr(session.config, "_benchmarksession", None), "benchmarks", None)
    if benchmarks is not None:
        benchmarks[:] = [bench for bench in benchmarks if bench]
    yield


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def results(
    request: pytest.FixtureRequest, device: torch.device, tmp_path_factory: pytest.TempPathFactory
) -> harness.ResultsFile:
    """This run's results file, with the card's peaks measured once per file."""
    env = harness.environment(device)
    path = request.config.getoption("--bench-results")
    if path is None:
        path = harness.default_results_path(env)
        if _matrix(request.config) == "cpu":
            # Tiny shapes prove the suites run; their numbers never go to bench/results.
            path = tmp_path_factory.mktemp("bench-results") / path.name
    results = harness.ResultsFile(path, env)
    if results.peaks["copy_gbps"] is None:
        results.set_peaks(harness.measure_peaks(device))
    return results


@pytest.fixture(scope="session")
def workbench(device: torch.device) -> Workbench:
    bench = Workbench(device)
    yield bench
    bench.clear()
