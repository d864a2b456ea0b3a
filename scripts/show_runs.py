"""Print val/fid, recall, precision and accuracy of every run under a TensorBoard root (default /tmp/sw/runs)."""

import glob
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

root = sys.argv[1] if len(sys.argv) > 1 else "/tmp/sw/runs"
for run in sorted(glob.glob(f"{root}/*/version_*")):
    events = EventAccumulator(run)
    events.Reload()
    if "val/fid" not in events.Tags()["scalars"]:
        print(run, "(no val/fid yet)")
        continue
    rows: dict[int, dict[str, float]] = {}
    for tag in ("val/fid", "val/precision", "val/recall", "val/accuracy"):
        for event in events.Scalars(tag):
            rows.setdefault(event.step, {})[tag.split("/")[1]] = event.value
    print(run)
    for step in sorted(rows):  # the x axis is Lightning's global step, not the generator step
        print(f"  {step:6d}  " + "  ".join(f"{k} {v:.3f}" for k, v in rows[step].items()))
