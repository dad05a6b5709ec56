"""The benchmark smoke tests run each benchmark script end to end on the real models and data
(up to 5 minutes each, 10-20 minutes together on 2 cores). They run when LORAFIT_BENCH_SMOKE=1,
which CI sets (.ci/run); a developer's plain `python -m pytest -q` skips them to stay quick."""

import os

import pytest

OPT_IN = "LORAFIT_BENCH_SMOKE"


@pytest.fixture(autouse=True)
def _benchmark_smoke_opt_in(request):
    if "smoke" in request.node.name and os.environ.get(OPT_IN) != "1":
        pytest.skip(f"benchmark smoke test: set {OPT_IN}=1 to run it (CI does)")
