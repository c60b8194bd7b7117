"""``normkit bench``: train small models with every normalization method on built-in data.

Programmatic use::

    from normkit.bench import run
    results = run("quick", out_dir="normkit-bench")   # leaderboard on stdout, files in out_dir

Add a suite with :func:`register_suite` (see :mod:`normkit.bench.suites`).
"""

from normkit.bench import (
    suites_adapt,  # noqa: F401  (registers tta, normonly)
    suites_continual,  # noqa: F401  (registers continual)
    suites_convert,  # noqa: F401  (registers convert)
    suites_optim,  # noqa: F401  (registers optim)
    suites_zoo,  # noqa: F401  (registers microbatch, transformer, selfnorm)
)
from normkit.bench.runner import configure_parser, run, run_cli
from normkit.bench.suites import (
    SUITES,
    Job,
    Suite,
    SuiteConfig,
    claim_line,
    digits_jobs,
    get_suite,
    mean_acc,
    norms_with_layout,
    register_suite,
)

__all__ = [
    "SUITES",
    "Job",
    "Suite",
    "SuiteConfig",
    "claim_line",
    "configure_parser",
    "digits_jobs",
    "get_suite",
    "mean_acc",
    "norms_with_layout",
    "register_suite",
    "run",
    "run_cli",
]
