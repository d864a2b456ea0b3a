"""Write a sweep copy of configs/mnist/dimo.yaml: only the EMA, checkpoint and FIDMonitor callbacks, logs elsewhere.

    python scripts/sweep_config.py /tmp/sw          # writes /tmp/sw/sweep.yaml, logs to /tmp/sw/runs
    OMP_NUM_THREADS=1 dimo fit --config /tmp/sw/sweep.yaml --trainer.logger.init_args.name=N \
        --model.init_args.targets.divergence_beta=0.0      # one variant (the sweeps ran two at a time, a thread each)

jsonargparse cannot override single entries of the callback list from the command line, hence the copy.
"""

import sys
from pathlib import Path

import yaml

KEEP = ("StudentEMA", "ModelCheckpoint", "FIDMonitor")

out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sw")
out.mkdir(parents=True, exist_ok=True)
config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/mnist/dimo.yaml").read_text())
trainer = config["trainer"]
trainer["callbacks"] = [c for c in trainer["callbacks"] if c["class_path"].rsplit(".", 1)[-1] in KEEP]
trainer["logger"]["init_args"]["save_dir"] = str(out / "runs")
trainer["enable_progress_bar"] = False
(out / "sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
print(out / "sweep.yaml")
