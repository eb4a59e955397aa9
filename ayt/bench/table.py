"""`python -m ayt.bench.table RESULTS.json [--update README.md]`: the markdown table of the
benchmark records (what `python -m ayt.bench ... --out RESULTS.json` wrote).

Every figure of the table is read from the records: nothing is typed by hand. `--update`
rewrites the block between `<!-- bench-table:start -->` and `<!-- bench-table:end -->` of a
markdown file with it (tests/test_bench.py checks that studies/benchmarks/README.md holds
exactly what this prints for the committed results.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
LOSS_NAMES = {"pseudo_huber": "pseudo-Huber", "l2": "L2", "l1": "L1", "mfd": "MFD", "lpips": "LPIPS"}
TARGET_NAMES = {
    "mfd_step_over_pseudo_huber_cpu": "MFD step / pseudo-Huber step",
    "optimised_mfd_speedup_cpu": "naive / optimised MFD time",
    "ray_train_per_step_overhead": "Ray Train per-step overhead",
    "study_wall_ratio_over_local": "study wall / plain-loop wall",
    "wall_s": "wall s",
    "training_share": "training share",
}

Row = tuple[str, str, str, str]        # benchmark, figure, target, met


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """A `.json` list, or JSON lines."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


def _x(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}×"


def _pct(value: float, digits: int = 0) -> str:
    return f"{100 * value:.{digits}f}%"


def _yes(flag: Any) -> str:
    return "yes" if flag is True else "no" if flag is False else "–"


def _targets(record: dict[str, Any], names: list[str] | None = None) -> tuple[str, str]:
    """(target text, met text) of the record's targets (all, or `names`)."""
    targets = record.get("targets") or {}
    keys = [k for k in (names if names is not None else list(targets)) if k in targets]
    if not keys:
        return "–", "–"
    text = "; ".join(f"{TARGET_NAMES.get(k, k)} {_bound(targets[k]['target'])} (is {_num(targets[k]['value'])})"
                     for k in keys)
    return text, "; ".join(_yes(targets[k].get("met")) for k in keys)


def _bound(text: str) -> str:
    return str(text).replace("<=", "≤").replace(">=", "≥")


def _num(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _image(shape: list[int]) -> str:
    channels, height, width = shape
    return f"{height}×{width}×{channels}"


def _step_rows(record: dict[str, Any]) -> list[Row]:
    results = record["results"]
    rows = []
    for preset, label in (("cpu", "CPU preset"), ("cifar_small", "CIFAR-sized preset")):
        r = results.get(preset)
        if not r:
            continue
        losses = {k: v for k, v in r["losses"].items() if "median_s" in v}
        parts = []
        for name, stats in losses.items():
            part = f"{LOSS_NAMES.get(name, name)} {_ms(stats['median_s'])}"
            if name != "pseudo_huber":
                part += f" ({_x(r['ratio_to_pseudo_huber'][name])})"
            parts.append(part)
        skipped = [LOSS_NAMES.get(k, k) for k, v in r["losses"].items() if "skipped" in v]
        figure = ", ".join(parts) + (f"; {', '.join(skipped)} not measured" if skipped else "")
        name = (f"step, {label} ({r['unet_parameters'] / 1e6:.2f}M-param U-Net, {_image(r['image'])}, "
                f"batch {r['batch_size']})")
        target, met = _targets(record) if preset == "cpu" else ("–", "–")
        rows.append((name, figure, target, met))
    syncs = results.get("host_syncs")
    if syncs:
        counts = {k: v["device_syncs"] for k, v in syncs.items()}
        figure = ", ".join(f"{n} for {LOSS_NAMES.get(k, k)}" for k, n in counts.items())
        rows.append(("host-device syncs in one step (TorchDispatchMode scan)", figure, "0 syncs",
                     _yes(all(n == 0 for n in counts.values()))))
    return rows


def _switches_rows(record: dict[str, Any]) -> list[Row]:
    results = record["results"]
    parts = []
    for name, r in results.items():
        if name == "default":
            continue
        parts.append(f"{name} {_x(r['speedup_vs_default'])}" if "speedup_vs_default" in r
                     else f"{name} not measured")
    helps = [k for k, v in (record.get("helps_here") or {}).items() if v]
    figure = (f"speed-up over the default ({_ms(results['default']['median_s'])}): " + ", ".join(parts)
              + f"; helps here: {', '.join(helps) or 'none'}")
    return [(f"switches, CPU preset, MFD step (batch {record['config']['batch_size']})", figure, "–", "–")]


def _mfd_rows(record: dict[str, Any]) -> list[Row]:
    results = record["results"]
    cpu = results["cpu"]
    figure = (f"optimised {_ms(cpu['optimised']['median_s'])} vs naive {_ms(cpu['naive']['median_s'])}: "
              f"{_x(cpu['speedup'])} faster at the CPU preset")
    if "cifar_small" in results:
        figure += f", {_x(results['cifar_small']['speedup'])} at the CIFAR-sized preset"
    equal = all(r.get("gradients_equal") for r in results.values())
    figure += (f"; gradients {'equal' if equal else 'DIFFER'} (max abs diff "
               f"{max(r['max_abs_diff'] for r in results.values()):.1e})")
    target, met = _targets(record)
    return [("MFD: optimised (frozen map, input gradient only) vs naive", figure, target, met)]


def _ray_rows(record: dict[str, Any]) -> list[Row]:
    r = record["results"]
    figure = (f"Ray {r['ray']['s_per_step']:.3f} s per step; plain loop {r['local_first']['s_per_step']:.3f} s "
              f"(first run) and {r['local_second']['s_per_step']:.3f} s (after Ray); recorded ratio "
              f"{_x(r['per_step_ratio_ray_over_local'], 3)}; fixed cost per run {r['ray_fixed_overhead_s']:.1f} s; "
              f"ray.init {r['ray_init_s']:.1f} s")
    iterations = r["ray"]["iterations"]
    rows = [(f"Ray Train, 1 worker vs the plain loop ({iterations} steps)", figure,
             *_targets(record, ["ray_train_per_step_overhead"]))]
    study = r.get("study") or {}
    if "wall_ratio_study_over_local" in study:
        figure = (f"wall {study['study_wall_s']:.0f} s vs {study['local_wall_s_sum']:.0f} s: "
                  f"{_x(study['wall_ratio_study_over_local'])}; {study['study_overhead_s_per_trial']:.1f} s "
                  f"overhead per trial; training time {_x(study['train_seconds_ratio_study_over_local'])}")
        rows.append((f"Ray Tune study of {study['trials']} small trials vs the same trials in a Python loop",
                     figure, *_targets(record, ["study_wall_ratio_over_local"])))
    return rows


def _fid_rows(record: dict[str, Any]) -> list[Row]:
    r, config = record["results"], record["config"]
    cached, uncached = r["cached"], r["uncached"]
    sampling = cached.get("generation", cached.get("sampling"))        # records before the probe split it
    figure = (f"{cached['total']['median_s']:.1f} s with cached reference statistics, "
              f"{uncached['total']['median_s']:.1f} s uncached; sampling "
              f"{_pct(sampling['median_s'] / cached['total']['median_s'])} of it; "
              f"{_pct(r['fid_fraction_of_wall'], 1)} of the wall time at eval_every {r['eval_every']}")
    rows = [(f"FID evaluation ({config['num_samples']} samples, 1- and 2-step)", figure, "–", "–")]
    if "workers" in r:
        w = r["workers"]
        rows.append(("The same evaluation on 2 Ray Train workers vs 1",
                     f"{w['2']['total']['median_s']:.2f} s vs {w['1']['total']['median_s']:.2f} s: "
                     f"{_x(w['ratio_2_over_1'])}", "–", "–"))
    return rows


def _roofline_rows(record: dict[str, Any]) -> list[Row]:
    r = record["results"]
    ph, mfd, peak = r["pseudo_huber"], r["mfd"], r["matmul_peak"]
    figure = (f"{ph['achieved_gflops']:.0f} GFLOP/s pseudo-Huber, {mfd['achieved_gflops']:.0f} GFLOP/s MFD (the "
              f"feature map adds {mfd['flops_per_step']['feature_map_mfd'] / 1e9:.1f} of "
              f"{mfd['gflop_per_step']:.1f} GFLOP per step) against an fp32 matmul peak of "
              f"{peak['peak_gflops']:.0f} GFLOP/s: {_pct(mfd['fraction_of_matmul_peak'])}")
    return [(f"roofline, CPU preset step (batch {record['config']['batch_size']})", figure, "–", "–")]


def _front_door_rows(record: dict[str, Any]) -> list[Row]:
    r, config = record["results"], record["config"]
    figure = (f"`{config['command']}`: {r['wall_s']:.0f} s wall, {r['trials']} trials, "
              f"{_pct(r['training_share'])} of {r['cores']} cores' time in training + FID, "
              f"{r['overhead_per_trial_s']:.0f} core-s overhead per trial")
    if not config.get("default_work", True):
        figure += " (not the default work: the targets do not apply)"
    return [("front door: the batch-size sweep from an empty out_dir", figure, *_targets(record))]


def _numerics_rows(record: dict[str, Any]) -> list[Row]:
    """One row per compared precision: its worst t-bin mean cosine against fp32 and the verdict."""
    config, rows = record["config"], []
    for precision, v in record["verdicts"].items():
        worst = v["worst"]
        cosines = {q: min(b["mean"] for b in stats["cosine"])
                   for q, stats in record["results"][worst["setting"]][precision].items()}
        figure = (f"worst t-bin mean cosine {worst['value']:.3f} ({worst['quantity']}, {worst['setting']} weights, "
                  f"t-bin {worst['bin']} of 0–{len(config['t_bin_edges']) - 2}: t in "
                  f"[{config['t_bin_edges'][worst['bin']]:g}, {config['t_bin_edges'][worst['bin'] + 1]:g}]); "
                  f"worst bin of each quantity ({worst['setting']} weights): "
                  + ", ".join(f"{q} {c:.3f}" for q, c in cosines.items()))
        emulated = " (emulated)" if precision == "tf32" and "emulated" in str(config.get("tf32", "")) else ""
        rows.append((f"numerics: {precision}{emulated} vs fp32, D(x_t,t) - D(x_r,r) and loss gradients at q = 256, "
                     "cifar10_paper's network, random weights", figure,
                     f"every t-bin mean cosine ≥ {v['threshold']}", _yes(v["keeps_direction"])))
    return rows


def _gpu_rows(record: dict[str, Any]) -> list[Row]:
    """One row per variant (step time, throughput, TFLOP/s, MFU, memory), one for the evaluation."""
    device, rows = record["config"]["device_name"], []
    for name, r in record["results"].items():
        if "median_s" not in r:
            rows.append((f"gpu, {device}: {name}", f"not measured ({r.get('skipped', '?')})", "–", "–"))
            continue
        mfu = "–" if r.get("mfu") is None else _pct(r["mfu"], 1)
        memory = "–" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.1f} GiB"
        figure = (f"{_ms(r['median_s'])} per step, {r['images_per_s']:.0f} img/s, {r['achieved_tflops']:.1f} TFLOP/s, "
                  f"MFU {mfu} ({r['peak_source']}), peak memory {memory}")
        if name.endswith("+compile"):
            figure += f"; first {r['first_calls']} calls {r['first_calls_s']:.0f} s (compilation)"
        rows.append((f"gpu, {device}: {name}, cifar10_paper step, batch {r['batch_size']}", figure, "–", "–"))
    fid = record["fid_evaluation"]
    rows.append((f"gpu, {device}: one evaluation of {fid['num_samples']} samples ({fid['precision']})",
                 f"{fid['total_s']:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in fid["phases_s"].items()),
                 "–", "–"))
    return rows


ROWS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "step": _step_rows, "switches": _switches_rows, "mfd": _mfd_rows, "ray": _ray_rows, "fid": _fid_rows,
    "roofline": _roofline_rows, "front_door": _front_door_rows, "numerics": _numerics_rows, "gpu": _gpu_rows}


def _threads(record: dict[str, Any]) -> str:
    t = record.get("torch") or {}
    text = str(t.get("threads", "?"))
    timed = [n for n in t.get("threads_timed") or [] if n != t.get("threads")]
    text += f" (timed at {', '.join(map(str, timed))})" if timed else ""
    end = t.get("threads_end")
    return text + (f" ({end} at its end)" if end is not None and end != t.get("threads") else "")


def _load(value: Any) -> float | None:
    """The 1-minute load average of a record (a dict by name, or the older [1, 5, 15] list)."""
    if isinstance(value, dict):
        return value.get("1min")
    if isinstance(value, list) and value:
        return value[0]
    return None


def _load_text(record: dict[str, Any]) -> str:
    machine = record.get("machine") or {}
    start, end = _load(machine.get("loadavg_start")), _load(machine.get("loadavg_end"))
    return "–" if start is None or end is None else f"{start:.1f} → {end:.1f}"


def _preamble(records: list[dict[str, Any]]) -> str:
    commits = {(r.get("git") or {}).get("commit") for r in records}
    dirty = any((r.get("git") or {}).get("dirty") for r in records)
    if commits == {None}:
        commit = "commit not recorded"
    else:
        commit = "commit " + ", ".join(f"`{c[:7]}`" for c in sorted(c for c in commits if c)) + \
                 (" (work tree with uncommitted changes)" if dirty else "")
        unrecorded = [r.get("benchmark", "?") for r in records if not (r.get("git") or {}).get("commit")]
        if unrecorded:
            commit += f" ({', '.join(unrecorded)}: an earlier run that recorded no commit)"
    first = records[0]
    machine, torch_ = first.get("machine") or {}, first.get("torch") or {}
    device = torch_.get("gpu") or f"{torch_.get('device', '?')}, no GPU"
    minutes = sum(r.get("wall_s", 0) for r in records) / 60
    return (f"Records of {commit}; {machine.get('cpu_model', '?')}, {machine.get('cpus_usable', '?')} usable CPUs, "
            f"{machine.get('memory_gib', '?')} GiB, {device}, torch {torch_.get('version', '?')}; "
            f"{len(records)} benchmarks in {minutes:.1f} min (started {first.get('started', '?')}). "
            "Threads: torch intra-op threads of the benchmark's process (restored after each benchmark); "
            "load: the 1-minute load average at the benchmark's start and end.")


def render(records: list[dict[str, Any]]) -> str:
    """The markdown block: a line on commit and machine, then one row per figure."""
    lines = [_preamble(records), "", "| benchmark | figure | target | met | threads | load |",
             "|---|---|---|---|---|---|"]
    for record in records:
        rows = ROWS.get(record["benchmark"], lambda r: [(r["benchmark"], r.get("headline", ""), "–", "–")])(record)
        for name, figure, target, met in rows:
            cells = [name, figure, target, met, _threads(record), _load_text(record)]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def markers(block: str | None = None) -> tuple[str, str]:
    """The start and end markers of the default block, or of a named one (`gpu`)."""
    return (START, END) if not block else (f"<!-- bench-table:{block}:start -->", f"<!-- bench-table:{block}:end -->")


def readme_block(text: str, block: str | None = None) -> str:
    """What lies between the markers of a markdown text (stripped)."""
    start, end = markers(block)
    if start not in text or end not in text:
        raise ValueError(f"no {start} ... {end} block")
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def update(path: str | Path, table: str, block: str | None = None) -> None:
    """Rewrite the block; a named block the file does not have yet is appended to it."""
    text = Path(path).read_text()
    start, end = markers(block)
    if block and start not in text:
        text = text.rstrip("\n") + f"\n\n{start}\n{end}\n"
    readme_block(text, block)
    head, rest = text.split(start, 1)
    Path(path).write_text(f"{head}{start}\n{table}\n{end}{rest.split(end, 1)[1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ayt.bench.table", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="records written by python -m ayt.bench --out")
    parser.add_argument("--update", metavar="MARKDOWN", help="rewrite the bench-table block of this file")
    parser.add_argument("--block", help="a named block (<!-- bench-table:NAME:start -->), e.g. gpu for "
                                        "gpu.json; appended if the file has none")
    args = parser.parse_args(argv)
    table = render(load_records(args.results))
    if args.update:
        update(args.update, table, args.block)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
