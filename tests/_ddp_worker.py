"""Run under torchrun by tests/test_train_ddp.py: several stage-two runs in one job.

One process group serves every run (train_head joins a group that is already up and leaves it
up), so the test pays torchrun's start-up once. argv[1]: a JSON file with
{"cache": path, "out": folder, "runs": [{"name", "train": {...}, "head": {...}, "wds": header?,
"wds_resample": bool?}]}. A run that raises a PipelineError writes its message to
``out/<name>.err`` and the job goes on; every rank raises the same error at the same point.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cache.errors import PipelineError
from stages.data.wds_split import open_wds_source
from stages.train import TrainCfg, train_head


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = Path(spec["out"])
    for run in spec["runs"]:
        source = spec["cache"]
        if run.get("wds"):
            source = open_wds_source(run["wds"], shuffle=8, resample=bool(run.get("wds_resample")))
        try:
            train_head(source, TrainCfg(**run["train"]), run.get("head", {}), run_dir=out / run["name"],
                       progress=False, log=lambda *a, **k: None)
        except PipelineError as exc:
            if dist.get_rank() == 0:
                (out / f"{run['name']}.err").write_text(str(exc))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
