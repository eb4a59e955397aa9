"""The CLI: `python -m ayt.bench [step|switches|mfd|ray|fid|roofline|front_door|report_scale|numerics|all|gpu] [--out FILE]`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import ayt.bench as bench
from ayt.bench import ALL, EXTRA, Options
from ayt.errors import ConfigError


def parse_args(argv: list[str] | None) -> tuple[list[str], Options, str | None]:
    parser = argparse.ArgumentParser(prog="python -m ayt.bench", description=bench.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", default=["all"], choices=[*ALL, *EXTRA, "all"], metavar="which",
                        help=f"benchmarks to run: {', '.join(ALL)} or all (default); {', '.join(EXTRA)} "
                             "(a CUDA GPU; not in all)")
    parser.add_argument("--out", help="also write the records here: FILE.json one JSON list, else JSON lines")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=Options.repeats, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=Options.warmup, help="untimed calls per variant first")
    parser.add_argument("--device", default=Options.device, help="auto (default) | cpu | cuda | mps")
    parser.add_argument("--quick", action="store_true", help="tiny networks and batches: checks the harness only")
    parser.add_argument("--compile", action="store_true", help="switches: also torch.compile (minutes)")
    parser.add_argument("--lpips-weights", help="VGG16.pth,LPIPS_VGG.pth: time the LPIPS loss too")
    parser.add_argument("--ray-iterations", type=int, default=Options.ray_iterations,
                        help="optimizer steps of the ray benchmark's trial")
    parser.add_argument("--ray-threads", type=int, default=Options.ray_threads,
                        help="cpu_threads of the ray benchmark's trials (both paths)")
    parser.add_argument("--front-door-args", action="append", default=[], metavar="OVERRIDES",
                        help="front_door: overrides appended to the study command, e.g. "
                             "'study.budget.amount=640 study.axes.batch_size=[32]' (repeatable; the targets "
                             "apply to the default work only)")
    parser.add_argument("--front-door-timeout", type=float, default=None, metavar="SECONDS",
                        help="front_door: stop the study after this long (default: no limit)")
    args = parser.parse_args(argv)
    which = list(ALL) if "all" in args.which else list(dict.fromkeys(args.which))
    lpips = tuple(args.lpips_weights.split(",")) if args.lpips_weights else None
    if lpips is not None and len(lpips) != 2:
        parser.error("--lpips-weights takes two comma-separated paths: VGG16.pth,LPIPS_VGG.pth")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    front_door_args = tuple(a for text in args.front_door_args for a in shlex.split(text))
    opts = Options(repeats=args.repeats, warmup=args.warmup, threads=args.threads, device=args.device,
                   quick=args.quick, compile=args.compile, lpips_weights=lpips, ray_iterations=args.ray_iterations,
                   ray_threads=args.ray_threads, front_door_args=front_door_args,
                   front_door_timeout_s=args.front_door_timeout)
    return which, opts, args.out


def main(argv: list[str] | None = None) -> int:
    from ayt.bench.harness import run_benchmark, write_records   # torch: not needed to parse the flags
    which, opts, out = parse_args(sys.argv[1:] if argv is None else argv)
    records = []
    for name in which:
        try:
            record = run_benchmark(name, opts)
        except ConfigError as err:        # a benchmark that cannot run here (gpu without CUDA): one line
            print(f"ayt.bench {name}: {err}", file=sys.stderr)
            return 2
        records.append(record)
        print(json.dumps(record), flush=True)
        print(f"ayt.bench {name}: {record.get('headline', '')} ({record['wall_s']:.0f} s)", file=sys.stderr,
              flush=True)
        if out:
            write_records(records, out)     # after each one: a later failure keeps what was measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
