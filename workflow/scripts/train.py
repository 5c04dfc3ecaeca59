"""Rule train: one run; several GPUs -> torchrun with DistributedDataParallel (maskface.train)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from maskface.smk import logged
from maskface.train import train_run

with logged(snakemake) as log:
    spec = dict(snakemake.params.spec)
    out = Path(snakemake.output.model).parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
    gpus = int(spec["train"]["gpus"])
    if gpus > 1 and spec["train"]["device"] != "cpu":
        from maskface.devices import claim_gpus

        claim_gpus(gpus)                   # a workstation: free GPUs for the ranks (a cluster has chosen already)
        import torch

        seen = torch.cuda.device_count()   # before torchrun: a rank without its own GPU would fail mid-start
        if seen < gpus:
            raise RuntimeError(f"train.gpus is {gpus} but this job sees {seen} GPU(s) (CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): ask the scheduler for {gpus} "
                               f"GPUs on one node, or lower train.gpus")
    if gpus > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", "maskface.train", "run", "--spec", str(out / "spec.json")]
        log.info("launching %s", " ".join(cmd))
        subprocess.run(cmd, check=True, stdout=sys.stdout, stderr=sys.stderr)
    else:
        log.info("run %s: %s", spec["run"], json.dumps(train_run(spec, out), default=str))
