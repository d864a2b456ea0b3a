"""Plot FID (or another metric) against training wall time from one or more Di[M]O runs.

    python scripts/plot_time_to_quality.py runs/mnist_dimo/version_0 [more runs ...] --output ttq.png \
        [--metric fid] [--teacher-fid 3.94] [--target-factor 1.05]

Each run is a run directory (its ``fid_vs_time.csv``, written by ``FIDMonitor``), a CSV path, or, for runs without
the CSV, a directory of TensorBoard event files with the ``val_vs_seconds/<metric>`` scalars.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read_curve(source: Path, metric: str = "fid") -> list[tuple[float, float]]:
    """(seconds, value) pairs of ``metric`` from a CSV file, a run directory with one, or TensorBoard events."""
    csv_path = source if source.suffix == ".csv" else source / "fid_vs_time.csv"
    if csv_path.is_file():
        with csv_path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if rows and metric not in rows[0]:
            raise SystemExit(f"{csv_path} has no column {metric!r} (columns: {', '.join(rows[0])})")
        # The CSV rounds seconds to 0.1 s: evaluations that close together keep their step order (not their value's).
        rows.sort(key=lambda r: (float(r["seconds"]), int(float(r.get("generator_step") or 0))))
        return [(float(r["seconds"]), float(r[metric])) for r in rows]
    if not source.is_dir():
        raise SystemExit(f"not a run directory or CSV file: {source}")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tag = f"val_vs_seconds/{metric}"
    points: list[tuple[float, float, float]] = []
    for events in sorted(source.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            points += [(float(e.step), e.wall_time, float(e.value)) for e in accumulator.Scalars(tag)]
    if not points:
        raise SystemExit(f"{source}: no fid_vs_time.csv and no TensorBoard scalar {tag}")
    # The x-axis is whole seconds: evaluations within one second share a step, so they keep their logged order.
    return [(step, value) for step, _, value in sorted(points)]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories, CSV files or event-file directories")
    parser.add_argument("--output", type=Path, default=Path("time_to_quality.png"))
    parser.add_argument("--metric", default="fid")
    parser.add_argument("--teacher-fid", type=float, default=None, help="draw the teacher's best value")
    parser.add_argument("--target-factor", type=float, default=1.05, help="also draw factor x teacher (default 1.05)")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    # Label each curve by its folder name, or by the whole path when two runs share a name (version_0, ...).
    names = [run.name for run in args.runs]
    unique = len(set(names)) == len(names)
    for run in args.runs:
        points = read_curve(run, args.metric)
        axis.plot([s / 60 for s, _ in points], [v for _, v in points], marker="o",
                  label=run.name if unique else run.as_posix())
    if args.teacher_fid is not None:
        axis.axhline(args.teacher_fid, color="black", linestyle="--", label=f"teacher best {args.teacher_fid:g}")
        target = args.teacher_fid * args.target_factor
        axis.axhline(target, color="grey", linestyle=":", label=f"{args.target_factor:g} x teacher = {target:.2f}")
    axis.set_xlabel("training wall time (minutes)")
    axis.set_ylabel(args.metric)
    axis.set_title(f"time to quality: student {args.metric} vs wall time")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output)
    print(f"wrote {args.output}")
    return args.output


if __name__ == "__main__":
    main()
