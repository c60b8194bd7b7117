"""CLI and README: `normkit list`, `normkit kernels`, the README's methods table."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from normkit.bench import kernels as benchmark
from normkit.cli import main
from normkit.registry import list_norms

README = Path(__file__).resolve().parents[1] / "README.md"


def test_list_prints_every_norm(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in list_norms():
        assert name in out


def test_readme_methods_table_is_generated_from_the_registry(capsys):
    main(["list", "--markdown"])
    table = capsys.readouterr().out.strip()
    text = README.read_text()
    block = re.search(r"<!-- methods:start -->\n(.*?)\n<!-- methods:end -->", text, re.S)
    assert block, "README lacks the methods table markers"
    assert block.group(1).strip() == table, "README methods table is stale: run `normkit list --markdown`"


def test_kernels_benchmark_reports_ratios(capsys):
    assert main(["kernels", "--quick", "--reps", "1", "--norms", "rmsnorm,batchnorm"]) == 0
    out = capsys.readouterr().out
    assert "vs native" in out
    rows = [line for line in out.splitlines() if line.startswith(("rmsnorm", "batchnorm"))]
    assert len(rows) == 8  # torch, auto, eager, compiled for each
    rows = benchmark.run(["layernorm", "rmsnorm"], quick=True, reps=1, echo=None)
    assert [r.impl for r in rows] == ["torch", "auto", "eager", "compiled"] * 2
    assert rows[0].vs_native == pytest.approx(1.0)
    assert all(r.fwdbwd_ms > 0 for r in rows)
    # normkit's own paths save one input-sized tensor; at this tiny size "auto" runs ATen's op, which may save two
    assert all(r.saved_x <= (2.1 if r.impl in ("torch", "auto") else 1.1) for r in rows)
    assert rows[3].compile_s is not None
    assert (rows[1].runs, rows[5].runs) == ("native", "native")  # what "auto" chose at 256x64, named in the table


def test_kernels_warm_alloc_flag_runs_in_its_own_process():
    # the allocator setting is process-wide, so it is checked in a child process
    code = "from normkit.cli import main; raise SystemExit(main(['kernels', '--quick', '--reps', '1', "
    code += "'--norms', 'scalenorm', '--backends', 'eager', '--warm-alloc']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "warm allocator: kernel time only" in out.stdout  # glibc here; "unavailable" would be a failure
    assert sum(line.startswith("scalenorm") for line in out.stdout.splitlines()) == 2  # torch, eager


def test_readme_python_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    # a block that needs several processes (torchrun) says so on its first line
    blocks = [b for b in blocks if "not run by the README test" not in b.splitlines()[0]]
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert "y" in namespace
