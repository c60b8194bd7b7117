from collections import defaultdict

import pytest
import torch

import normkit


@pytest.fixture(autouse=True)
def _seed_and_backend():
    torch.manual_seed(0)
    with normkit.set_backend("auto"):
        yield


BACKENDS = ["eager", "compiled", "inductor"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Time per test file (setup + call + teardown), slowest first, to see where the suite's minutes go."""
    per_file: dict[str, float] = defaultdict(float)
    tests: dict[str, set[str]] = defaultdict(set)
    for reports in terminalreporter.stats.values():
        for rep in reports:
            if getattr(rep, "when", None) in ("setup", "call", "teardown") and hasattr(rep, "duration"):
                path = rep.nodeid.split("::")[0]
                per_file[path] += rep.duration
                tests[path].add(rep.nodeid)
    if len(per_file) < 2:
        return
    terminalreporter.write_sep("=", "time per test file")
    for path, seconds in sorted(per_file.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.1f}s  {len(tests[path]):4d} tests  {path}")
    terminalreporter.write_line(f"{sum(per_file.values()):8.1f}s  {sum(map(len, tests.values())):4d} tests  total")
