"""Bench orchestration: expand a suite into runs, train them, report, write files; plus the CLI glue.

Every run is isolated: an exception while building or training one norm becomes an
``error`` row and the bench moves on, so one broken method never hides the others' results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from normkit.bench import report
from normkit.bench.suites import SUITES, Job, Suite, SuiteConfig, get_suite
from normkit.bench.train import planned_steps, torch_threads, train_run
from normkit.registry import norm_info

DEFAULT_OUT = "normkit-bench"


# --------------------------------------------------------------------------- progress


class _Progress:
    """No-op progress (``progress=False``); base of the two real ones."""

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def start(self, index: int, total: int, label: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self, index: int, total: int, label: str, row: dict[str, Any]) -> None:
        pass


def _summary(row: dict[str, Any]) -> str:
    if row["status"] == "error":
        return f"ERROR {row['error']}"
    extra = "" if row["status"] == "ok" else f" [{row['status']}: {row['error']}]"

    def f(key: str, spec: str) -> str:  # a job's own run function may leave a field out (None): "-"
        v = row.get(key)
        return "-" if v is None else format(v, spec)

    return (
        f"acc {f('test_acc', '.1%')}  loss {f('train_loss', '.4f')}  {f('ms_per_step', '.2f')} ms/step  "
        f"({f('train_time_s', '.1f')}s){extra}"
    )


class _TextProgress(_Progress):
    """One line per finished run with the remaining-time estimate: readable in CI logs and without rich.

    The estimate extrapolates the time per optimizer step so far over the steps left.
    """

    def __init__(self, total_steps: int = 0) -> None:
        self._total, self._done, self._t0 = total_steps, 0, time.perf_counter()

    def advance(self, n: int) -> None:
        self._done += n

    def finish(self, index: int, total: int, label: str, row: dict[str, Any]) -> None:
        eta = ""
        if self._total and self._done:
            elapsed = time.perf_counter() - self._t0
            left = elapsed / self._done * max(0, self._total - self._done)
            eta = f"  [{self._done / self._total:.0%} of steps, {elapsed:.0f}s elapsed, ~{left:.0f}s left]"
        print(f"[{index + 1}/{total}] {label}: {_summary(row)}{eta}", flush=True)


class _RichProgress(_Progress):
    """A rich progress bar over all optimizer steps of the suite, with a line per finished run.

    Step advances are batched (every 50 ms) so drawing costs nothing next to training.
    """

    def __init__(self, total_steps: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            TimeElapsedColumn(), TimeRemainingColumn(),
        )  # fmt: skip
        self._task = self._bar.add_task("bench", total=total_steps)
        self._pending = 0
        self._last = 0.0

    def __enter__(self) -> _RichProgress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._flush()
        self._bar.__exit__(None, None, None)

    def _flush(self) -> None:
        if self._pending:
            self._bar.advance(self._task, self._pending)
            self._pending = 0
        self._last = time.perf_counter()

    def start(self, index: int, total: int, label: str) -> None:
        self._bar.update(self._task, description=f"[{index + 1}/{total}] {label}")

    def advance(self, n: int) -> None:
        self._pending += n
        if time.perf_counter() - self._last > 0.05:
            self._flush()

    def finish(self, index: int, total: int, label: str, row: dict[str, Any]) -> None:
        self._flush()
        self._bar.console.print(f"[{index + 1}/{total}] {label}: {_summary(row)}", markup=False, highlight=False)


def _make_progress(enabled: bool, steps: int) -> _Progress:
    if not enabled:
        return _Progress()
    try:
        from rich.console import Console
    except ImportError:
        return _TextProgress(steps)
    # A live bar only makes sense on a terminal; redirected output gets plain lines.
    return _RichProgress(steps) if Console().is_terminal else _TextProgress(steps)


# --------------------------------------------------------------------------- running


def _canonical(norm: str) -> str:
    try:
        return norm_info(norm).name
    except ValueError:
        return norm.lower()


def _filter_jobs(jobs: list[Job], norms: Sequence[str] | None, suite: str) -> list[Job]:
    """Keep the jobs whose norm is in ``norms`` (names or aliases); unmatched names are an error."""
    if not norms:
        return jobs
    wanted = {_canonical(n) for n in norms}
    available = {_canonical(j.norm) for j in jobs}
    missing = wanted - available
    if missing:
        raise ValueError(
            f"norm(s) {', '.join(sorted(missing))} not in suite {suite!r}; its norms: {', '.join(sorted(available))}"
        )
    return [j for j in jobs if _canonical(j.norm) in wanted]


def _environment(suite: Suite, **extra: Any) -> dict[str, Any]:
    from normkit import __version__

    return {
        "normkit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "suite": suite.name,
        "suite_description": suite.description,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def _run_one(job: Job, seed: int, scale: float, progress: _Progress, steps: int) -> dict[str, Any]:
    """Train one run; any exception becomes an ``error`` row (progress still reaches its end)."""
    done = 0

    def on_step(n: int) -> None:
        nonlocal done
        done += n
        progress.advance(n)

    cpu0 = time.process_time()
    try:
        train = job.run if job.run is not None else train_run
        row = dict(train(job, seed, scale=scale, on_step=on_step))
    except Exception as e:  # noqa: BLE001 - a broken norm must not abort the bench
        progress.advance(max(0, steps - done))
        message = (str(e).strip().splitlines() or [""])[0]
        row = {"status": "error", "error": f"{type(e).__name__}: {message}"[:300], "traceback": traceback.format_exc()}
    row["cpu_s"] = round(time.process_time() - cpu0, 3)  # this process's CPU time for the run (data, train, eval)
    return row


def _base_row(suite: str, job: Job, seed: int, scale: float) -> dict[str, Any]:
    return {
        "suite": suite, "task": job.task, "model": job.model, "norm": job.norm,
        "batch_size": job.batch_size, "seed": seed, "epochs": job.epochs * scale, "lr": job.lr,
        "weight_decay": job.weight_decay, "steps": 0, "epochs_done": 0.0, "test_acc": None,
        "train_loss": None, "ms_per_step": None, "train_time_s": None, "params": None,
        **dict(job.extra),
    }  # fmt: skip


def _worker(task: tuple[str, str, bool, int, int, int, float, int | None]) -> dict[str, Any]:
    """One run in a worker process: the job is rebuilt from the suite registry (jobs hold closures)."""
    import importlib

    import normkit.bench  # noqa: F401  (registers the built-in suites in a spawned process)

    suite, module, full, base_seed, index, seed, scale, threads = task
    importlib.import_module(module)  # a suite registered outside normkit.bench registers on import
    job = list(get_suite(suite).jobs(SuiteConfig(full=full, seed=base_seed)))[index]
    with torch_threads(threads):
        row = _run_one(job, seed, scale, _Progress(), planned_steps(job, scale))
    # The worker's CPU time so far (imports included): the runner reports the busiest worker's total.
    row["worker"], row["worker_cpu_s"] = os.getpid(), round(time.process_time(), 3)
    return row


def _importable(spec: Suite) -> bool:
    """Whether a spawned worker can rebuild the suite's jobs: its job function is a module-level name
    (registered when its module is imported). Suites registered at run time (closures, tests) run serially."""
    fn = spec.jobs
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    return module is not None and getattr(module, getattr(fn, "__qualname__", ""), None) is fn


def _run_parallel(tasks: list[Any], rows: list[dict[str, Any]], steps: list[int], bar: _Progress, workers: int) -> None:
    """Train ``tasks`` in ``workers`` spawned processes; the bar advances by each finished run's steps.

    Runs are submitted longest first (by planned steps): with few workers, a long run started last
    would leave the other cores idle at the end (longest-processing-time-first scheduling).
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    order = sorted(range(len(tasks)), key=lambda i: -steps[i])
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_worker, tasks[i]): i for i in order}
        for done, future in enumerate(as_completed(futures)):
            i = futures[future]
            try:
                rows[i].update(future.result())
            except Exception as e:  # noqa: BLE001 - a crashed worker is one error row
                rows[i].update({"status": "error", "error": f"{type(e).__name__}: {e}"[:300]})
            bar.advance(steps[i])
            label = f"{rows[i]['task']}/{rows[i]['model']}/{rows[i]['norm']}/bs{rows[i]['batch_size']} seed={rows[i]['seed']}"
            bar.finish(done, len(tasks), label, rows[i])


def resolve_parallelism(
    workers: int | None, threads: int | None, runs: int = 1 << 30, max_workers: int | None = None
) -> tuple[int, int | None]:
    """``(workers, threads)`` for ``runs`` runs; ``None`` means "what the machine affords".

    The bench's models are small: one torch thread per run is as fast per core as two (intra-op
    threads have little to split in a 3-conv CNN at batch 2), so independent runs in parallel
    processes use the cores best. Defaults: ``threads`` 1 and ``workers`` = cores // threads when
    both are None; the given one fixes the other (``workers`` given: cores // workers threads each).
    ``workers`` never exceeds ``runs`` nor the suite's ``max_workers`` (suites whose claims are
    timings run one process at a time).
    """
    cores = os.cpu_count() or 1
    for name, v in (("workers", workers), ("threads", threads)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be an int >= 1 or None, got {v!r}")
    if workers is None:
        workers = max(1, cores // (threads or 1))
        if max_workers is not None:
            workers = min(workers, max_workers)
    if threads is None:
        threads = max(1, cores // workers) if workers > 1 else min(2, cores)
    return max(1, min(workers, runs)), threads


def run(
    suite: str = "quick",
    *,
    full: bool = False,
    out_dir: str | Path = DEFAULT_OUT,
    seed: int = 0,
    norms: list[str] | None = None,
    progress: bool = True,
    scale: float = 1.0,
    threads: int | None = None,
    seeds: int | None = None,
    workers: int | None = None,
) -> list[dict[str, Any]]:
    """Run a bench suite, print its leaderboard and claims, write results.{csv,json,png} to ``out_dir``.

    Every job runs over the same paired seeds ``seed, seed + 1, …``: ``seeds`` of them, by default
    the suite's ``seeds`` (``full_seeds`` with ``full``), so the claims get paired-seed verdicts.
    ``full`` trains longer; ``norms``
    restricts the suite to those methods; ``scale`` multiplies the training length (tests use
    ~0.02); ``threads`` sets torch's intra-op threads for the duration (small models are
    fastest on few threads, and it makes timings comparable across machines; None keeps the
    current setting). ``workers`` > 1 trains runs in that many processes (each with ``threads``
    threads): runs are independent and seeded, so results equal the sequential ones with the same
    ``threads`` (tested). By default (both None) the machine's cores are used: one worker per core,
    one thread each (see :func:`resolve_parallelism`). Returns one dict per run (job × seed), as in
    ``results.csv``.
    """
    spec = get_suite(suite)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    start, start_cpu = time.perf_counter(), time.process_time()
    jobs = _filter_jobs(list(spec.jobs(SuiteConfig(full=full, seed=seed))), norms, suite)
    if not jobs:
        raise ValueError(f"suite {suite!r} has no jobs")
    n_seeds = seeds if seeds is not None else spec.full_seeds if full else spec.seeds
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {n_seeds!r}")
    seed_list = [seed + i for i in range(n_seeds)]
    workers, threads = resolve_parallelism(workers, threads, len(jobs) * n_seeds, spec.max_workers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    with torch_threads(threads):
        runs = [(job, s) for job in jobs for s in seed_list]
        steps = [planned_steps(job, scale) for job, _ in runs]
        rows = [_base_row(suite, job, s, scale) for job, s in runs]
        with _make_progress(progress, sum(steps)) as bar:
            if workers > 1 and len(runs) > 1 and _importable(spec):
                index = {j.key: i for i, j in enumerate(spec.jobs(SuiteConfig(full=full, seed=seed)))}
                tasks = [(suite, spec.jobs.__module__, full, seed, index[job.key], s, scale, threads) for job, s in runs]
                _run_parallel(tasks, rows, steps, bar, workers)
            else:
                for i, ((job, s), n_steps) in enumerate(zip(runs, steps)):
                    label = f"{job.key} seed={s}"
                    bar.start(i, len(runs), label)
                    rows[i].update(_run_one(job, s, scale, bar, n_steps))
                    bar.finish(i, len(runs), label, rows[i])
        results = rows
        env = _environment(spec, full=full, seed=seed, seeds=seed_list, scale=scale, norms=norms, workers=workers)
        env["threads"] = threads
        env["lrs"] = learning_rates(jobs)
        env.update(cpu_summary(results, time.process_time() - start_cpu, workers))

    _report(spec, results, out, env, start)
    return results


def learning_rates(jobs: Sequence[Job]) -> dict[str, list[float]]:
    """Per task/model, the learning rates its jobs use (one value: shared by all methods; several: a grid or a
    per-batch-size rule), for the report: no rate is tuned per claim or per method."""
    lrs: dict[str, set[float]] = {}
    for job in jobs:
        lrs.setdefault(f"{job.task} {job.model}", set()).add(float(job.lr))
    return {k: sorted(v) for k, v in lrs.items()}


def cpu_summary(results: list[dict[str, Any]], parent_cpu_s: float, workers: int) -> dict[str, float]:
    """CPU seconds of a suite: ``cpu_s`` (parent + every worker process, imports included), ``cpu_busiest_s``
    (the busiest process) and ``idle_estimate_s`` = max(busiest, cpu_s / workers).

    On a machine shared with other jobs the wall time says little; CPU time does not depend on the
    load (much), and the estimate is the wall time the suite would take with its ``workers`` cores to
    itself — perfect balance bounded by the busiest process.
    """
    per_worker: dict[Any, float] = {}
    for r in results:
        if "worker" in r:
            per_worker[r["worker"]] = max(per_worker.get(r["worker"], 0.0), float(r.get("worker_cpu_s") or 0.0))
    busiest = max([parent_cpu_s, *per_worker.values()])
    total = parent_cpu_s + sum(per_worker.values())
    return {
        "cpu_s": round(total, 1),
        "cpu_busiest_s": round(busiest, 1),
        "idle_estimate_s": round(max(busiest, total / max(1, workers)), 1),
    }


def _report(spec: Suite, results: list[dict[str, Any]], out: Path, env: dict[str, Any], start: float) -> None:
    """Leaderboard + claims on stdout, then the three files."""
    board = report.leaderboard(results)
    claims: list[str] = []
    if spec.claims is not None:
        try:
            claims = list(spec.claims(results))
        except Exception as e:  # noqa: BLE001 - a buggy claim must not lose the results
            claims = [f"[error] claims hook of suite {spec.name!r} failed: {type(e).__name__}: {e}"]
    env["total_time_s"] = round(time.perf_counter() - start, 2)
    title = f"normkit bench: suite {spec.name!r}{' (full)' if env.get('full') else ''}"
    report.print_leaderboard(board, title)
    if claims:
        print("\nClaims:")
        for line in claims:
            print(f"  {line}")
    report.write_csv(out / "results.csv", results)
    payload = {"env": env, "runs": results, "leaderboard": board, "claims": claims, "scope": spec.scope}
    report.write_json(out / "results.json", payload)
    written = [out / "results.csv", out / "results.json"]
    if report.plot(out / "results.png", board, title):
        written.append(out / "results.png")
        if report.plot_curves(out / "curves.png", results, title + ": training loss"):
            written.append(out / "curves.png")
        if spec.plots is not None:
            try:
                written += list(spec.plots(results, out))
            except Exception as e:  # noqa: BLE001 - a buggy plot must not lose the results
                print(f"plots hook of suite {spec.name!r} failed: {type(e).__name__}: {e}")
    else:
        print("matplotlib is not installed: skipped results.png (pip install 'normkit[bench]')")
    failed = sum(r["status"] != "ok" for r in results)
    print(
        f"\n{len(results)} runs ({failed} not ok) in {env['total_time_s']:.1f}s wall, {env['cpu_s']:.0f}s CPU "
        f"({env['workers']} worker(s) × {env['threads']} thread(s); busiest process {env['cpu_busiest_s']:.0f}s CPU, "
        f"so ~{env['idle_estimate_s']:.0f}s on {env['workers']} idle core(s)); wrote " + ", ".join(str(p) for p in written)
    )


# --------------------------------------------------------------------------- one report over suites


def report_sections(out: Path, suites: list[str]) -> list[dict[str, Any]]:
    """Sections for :func:`normkit.bench.report.write_html` from ``out/<suite>/results.json`` and its PNGs."""
    sections = []
    for name in suites:
        folder = out / name
        path = folder / "results.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        spec = SUITES.get(name)
        sections.append({
            "suite": name,
            "description": spec.description if spec else data["env"].get("suite_description", ""),
            "scope": data.get("scope", ""),
            "claims": data.get("claims", []),
            "leaderboard": data.get("leaderboard", []),
            "images": sorted(folder.glob("*.png"), key=lambda p: (p.name != "results.png", p.name)),
            "env": data.get("env", {}),
        })  # fmt: skip
    return sections


def run_report(suites: list[str], *, out_dir: str | Path = DEFAULT_OUT, **kwargs: Any) -> tuple[Path, list[dict[str, Any]]]:
    """Run every suite in ``suites`` into ``out_dir/<suite>/`` and write ``out_dir/report.html`` over all of them.

    ``kwargs`` go to :func:`run`. Returns the report's path and all result rows.
    """
    out = Path(out_dir)
    results: list[dict[str, Any]] = []
    for name in suites:
        get_suite(name)  # unknown names fail before anything runs
    t0 = time.perf_counter()
    for k, name in enumerate(suites):
        print(f"\n=== suite {name} ({k + 1}/{len(suites)}, {time.perf_counter() - t0:.0f}s elapsed) ===", flush=True)
        results += run(name, out_dir=out / name, **kwargs)
    path = report.write_html(out / "report.html", report_sections(out, suites))
    print(f"\nwrote {path}")
    return path, results


# --------------------------------------------------------------------------- CLI glue


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add the ``normkit bench`` options to ``p`` (called by :mod:`normkit.cli`)."""
    p.add_argument("--suite", default=None, help="suite to run, or 'all' (default: quick; with --report: all; see --list-suites)")
    p.add_argument("--report", action="store_true", help="write one self-contained HTML report (report.html) over the suites run")
    p.add_argument(
        "--workers", type=int, default=None, help="train runs in this many processes (default: one per core, with 1 thread each)"
    )
    p.add_argument("--full", action="store_true", help="longer training and more paired seeds")
    p.add_argument("--seeds", type=int, default=None, help="paired seeds per job (default: the suite's, enough for its claims)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder for results.csv/json/png (default: {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0, help="base seed; --full uses seed, seed+1, ... (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-run lines")
    p.add_argument("--norms", default=None, help="comma-separated subset of the suite's norms, e.g. batchnorm,groupnorm")
    p.add_argument("--list-suites", action="store_true", help="list the registered suites and exit")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the training length (e.g. 0.05 for a smoke test)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per run (default: cores // workers; 1 with the default workers)",
    )


def run_cli(args: argparse.Namespace) -> int:
    """Run ``normkit bench`` from parsed ``args``: 0 if every run is ok, 1 if some failed, 2 on bad arguments."""
    if getattr(args, "list_suites", False):
        for name in sorted(SUITES):
            spec = SUITES[name]
            print(f"{name:12s} seeds {spec.seeds} (full {spec.full_seeds})  {spec.description}")
        return 0
    norms = [n.strip() for n in args.norms.split(",") if n.strip()] if getattr(args, "norms", None) else None
    report_mode = getattr(args, "report", False)
    suite = args.suite or ("all" if report_mode else "quick")
    kwargs: dict[str, Any] = {
        "full": args.full, "seed": args.seed, "norms": norms, "progress": not args.no_progress,
        "scale": getattr(args, "scale", 1.0), "threads": getattr(args, "threads", None), "seeds": getattr(args, "seeds", None),
        "workers": getattr(args, "workers", None),
    }  # fmt: skip
    try:
        if report_mode or suite == "all":
            names = sorted(SUITES) if suite == "all" else [s.strip() for s in suite.split(",")]
            _, results = run_report(names, out_dir=args.out, **kwargs)
        else:
            results = run(suite, out_dir=args.out, **kwargs)
    except ValueError as e:
        print(f"normkit bench: error: {e}", file=sys.stderr)
        return 2
    return 0 if all(r["status"] == "ok" for r in results) else 1
