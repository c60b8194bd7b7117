"""Command line: ``normkit list``, ``normkit kernels``, ``normkit bench``."""

from __future__ import annotations

import argparse
import sys

from normkit.registry import list_norms, norm_info


def _cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for name in list_norms():
        i = norm_info(name)
        rows.append((
            name, i.family, i.layout, "yes" if i.batch_dependent else "no", "yes" if i.train_eval_differ else "no",
            f"{i.paper.title} ({i.paper.year}), arXiv:{i.paper.arxiv}", ", ".join(i.aliases), i.description,
        ))
    head = ("name", "family", "layout", "batch-dep", "train/eval", "paper", "aliases", "description")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return 0
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None  # noqa: N806
    if Console is None or not sys.stdout.isatty():
        widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
        for r in (head, *rows):
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        return 0
    table = Table(title=f"normkit: {len(rows)} normalization methods")
    for h in head:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*r)
    Console().print(table)
    return 0


def _cmd_kernels(args: argparse.Namespace) -> int:
    import torch

    from normkit.bench import kernels as benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device != "cpu":  # GPU table: torch vs normkit's Triton kernels vs Liger (bench/kernels.run_device)
        return benchmark.device_cli(args)
    norms = args.norms.split(",") if args.norms else None
    if args.defaults:
        from normkit.bench import defaults
        from normkit.kernels import cpu

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; median of {args.reps} rounds; "
              f"normkit default backend {normkit_backend()!r}; {cpu.status()}")
        print(defaults.HEADER)
        defaults.run(norms, reps=args.reps, quick=args.quick)
        return 0
    alloc = "fresh outputs page-faulted in (glibc default)"
    if args.warm_alloc:
        alloc = "warm allocator: kernel time only" if benchmark.warm_allocator() else "warm allocator unavailable (not glibc)"
    from normkit.kernels import cpu

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; median of {args.reps} runs; {alloc}")
    if "compiled" in args.backends.split(","):
        print(cpu.status())
    print(benchmark.HEADER)
    benchmark.run(norms, quick=args.quick, reps=args.reps, backends=tuple(args.backends.split(",")))
    return 0


def normkit_backend() -> str:
    from normkit.backend import get_backend

    return get_backend()


def _cmd_bench(args: argparse.Namespace) -> int:
    from normkit import bench

    return bench.run_cli(args)


def _cmd_models(args: argparse.Namespace) -> int:
    from normkit.bench import e2e

    return e2e.run_cli(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="normkit", description="normalization layers for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="table of the registered normalization methods")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (used for the README)")
    p.set_defaults(fn=_cmd_list)
    p = sub.add_parser("kernels", help="time each norm against torch's native op (same run)")
    p.add_argument("--norms", default="", help="comma-separated subset of norms")
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--backends", default="auto,eager,compiled",
        help="comma-separated: auto (the default backend; the runs column says what it picked), native, eager, "
        "kernels (normkit's CPU kernels, else eager), compiled (CPU kernels + Inductor), inductor (torch.compile only)",
    )
    p.add_argument(
        "--defaults", action="store_true",
        help="normkit's modules on the default backend vs torch's modules, large and small shapes, train/fwd/eval",
    )
    p.add_argument(
        "--warm-alloc", action="store_true",
        help="reuse freed memory (glibc mallopt) so page faults of fresh 32 MiB outputs don't mask kernel time",
    )
    p.add_argument(
        "--device", default="cpu",
        help="cuda: the Triton kernels' GPU table (--widths, --dtypes); interpret: its smoke test on CPU",
    )
    p.add_argument("--widths", default="", help="--device cuda: comma-separated widths (default 256…32768)")
    p.add_argument("--dtypes", default="bf16,fp32", help="--device cuda: comma-separated bf16, fp16, fp32")
    p.set_defaults(fn=_cmd_kernels)
    p = sub.add_parser("bench", help="train small models with each norm on built-in data")
    from normkit import bench

    bench.configure_parser(p)
    p.set_defaults(fn=_cmd_bench)
    p = sub.add_parser("models", help="train-step time of small real models with torch's vs normkit's norms (same run)")
    from normkit.bench import e2e

    e2e.configure_parser(p)
    p.set_defaults(fn=_cmd_models)
    args = parser.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
