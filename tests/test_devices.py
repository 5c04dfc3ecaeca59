"""device: auto means CUDA, or the CPU when the job was given no GPU; a job given a GPU that torch cannot use
fails with the reason instead of training on the CPU."""
from __future__ import annotations

import pytest
import torch

from maskface import devices
from maskface.devices import RESERVING_VARIABLES, DeviceError, describe, gpu_reserved, resolve_device


@pytest.fixture()
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "gpu_device_count", lambda: 0)    # whatever this machine has
    for name in RESERVING_VARIABLES + ("LOCAL_RANK",):
        monkeypatch.setenv(name, "")      # so that undoing restores the variable as it was, even when a claim set it
        monkeypatch.delenv(name)


def test_auto_is_the_cpu_when_no_gpu_was_given(no_cuda, monkeypatch):
    assert resolve_device("auto", "train.device") == "cpu"
    assert resolve_device("cpu", "train.device") == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")        # every GPU hidden on purpose: the CPU
    assert resolve_device("auto", "train.device") == "cpu"
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "0")
    assert resolve_device("auto", "train.device") == "cpu"


@pytest.mark.parametrize("name,value", [("SLURM_JOB_GPUS", "0"), ("SLURM_STEP_GPUS", "2,3"),
                                        ("SLURM_GPUS_ON_NODE", "1"), ("CUDA_VISIBLE_DEVICES", "0")])
def test_auto_refuses_the_cpu_when_the_job_was_given_a_gpu(no_cuda, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert gpu_reserved() == f"{name}={value}"
    with pytest.raises(DeviceError, match=rf"train.device is auto and this job was given a GPU \({name}={value}\)"):
        resolve_device("auto", "train.device")


def test_cuda_without_cuda_names_the_reason(no_cuda, monkeypatch):
    monkeypatch.setattr(devices, "_why_no_cuda", lambda: "torch 9.9 (built for CUDA 13.0): driver too old")
    with pytest.raises(DeviceError, match="align.device is cuda but CUDA cannot be used: .*driver too old"):
        resolve_device("cuda", "align.device")
    with pytest.raises(DeviceError, match="must be auto, cpu or cuda"):
        resolve_device("gpu", "align.device")


def test_a_multi_gpu_run_tells_too_few_gpus_given_from_gpus_cuda_cannot_use(no_cuda, monkeypatch):
    monkeypatch.setattr(devices, "_why_no_cuda", lambda: "torch 9.9 (built for CUDA 13.0): driver too old")
    counts = {"n": 0}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: counts["n"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")       # given 2 (by SLURM, say), CUDA finds none
    with pytest.raises(DeviceError, match=r"train.gpus is 2 and this job was given 2 GPU\(s\) "
                                          r"\(CUDA_VISIBLE_DEVICES=0,1\), but CUDA finds 0: .*driver too old"):
        devices.require_gpus(2, "train.gpus")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")         # given 1 of the 2 it needs
    counts["n"] = 1
    with pytest.raises(DeviceError, match=r"train.gpus is 2 but this job sees 1 GPU\(s\) \(CUDA_VISIBLE_DEVICES=3\): "
                                          r"ask the scheduler for 2 GPUs on one node"):
        devices.require_gpus(2, "train.gpus")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(DeviceError, match=r"sees 1 GPU\(s\) \(CUDA_VISIBLE_DEVICES=unset\)"):
        devices.require_gpus(4, "train.gpus")
    counts["n"] = 0                                         # a workstation's 4 GPUs, none usable by CUDA
    monkeypatch.setattr(devices, "gpu_device_count", lambda: 4)
    with pytest.raises(DeviceError, match=r"this machine has 4 GPU\(s\) \(CUDA_VISIBLE_DEVICES unset\), but CUDA "
                                          r"finds 0: .*driver too old"):
        devices.require_gpus(4, "train.gpus")
    monkeypatch.setenv("SLURM_JOB_ID", "7")                 # a SLURM job given no GPU still sees the device files
    with pytest.raises(DeviceError, match=r"sees 0 GPU\(s\) \(CUDA_VISIBLE_DEVICES=unset\): ask the scheduler"):
        devices.require_gpus(4, "train.gpus")
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "NoDevFiles")   # SLURM's word for no GPU given
    with pytest.raises(DeviceError, match=r"sees 0 GPU\(s\) \(CUDA_VISIBLE_DEVICES=NoDevFiles\): ask the scheduler"):
        devices.require_gpus(2, "train.gpus")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    counts["n"] = 4
    assert devices.require_gpus(4, "train.gpus") == 4


def test_the_real_reason_on_this_machine(no_cuda):
    """Whatever torch says here (a CPU build, or a CUDA build without a driver), it is one line."""
    reason = devices._why_no_cuda()
    assert reason.startswith("torch ") and "\n" not in reason


def test_describe_line():
    line = describe("cpu", amp="none", world_size=1)
    assert line.startswith("device cpu (") and f"torch {torch.__version__}" in line and "world size 1" in line


_CLAIMER = """
import sys
import maskface.devices as d
d.gpu_device_count = lambda: 2          # a workstation with two GPUs
try:
    print(d.claim_gpus(int(sys.argv[1])), flush=True)
except d.DeviceError as exc:
    print("ERROR", exc, flush=True)
    sys.exit(3)
sys.stdin.read()                         # hold the claim until the test closes stdin
"""


def test_jobs_on_a_workstation_claim_different_gpus(tmp_path):
    """Concurrent GPU jobs get different GPUs; one too many stops with the way out; an ended job frees its GPU."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in RESERVING_VARIABLES}
    env["MASKFACE_GPU_LOCKS"] = str(tmp_path)

    def start(n=1):
        return subprocess.Popen([sys.executable, "-c", _CLAIMER, str(n)], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)

    a, b = start(), start()
    ids = {a.stdout.readline().strip(), b.stdout.readline().strip()}
    assert ids == {"0", "1"}
    c = start()
    out, _ = c.communicate(timeout=60)
    assert c.returncode == 3 and "all 2 GPUs of this machine are claimed" in out and "--resources gpu=2" in out
    a.communicate(timeout=60)                 # a ends: its GPU is free again
    d = start()
    assert d.stdout.readline().strip() in ids
    for p in (b, d):
        p.communicate(timeout=60)
    env["CUDA_VISIBLE_DEVICES"] = "1"         # chosen by the user or a scheduler: no claim
    e = start()
    assert e.stdout.readline().strip() == "None"
    e.communicate(timeout=60)


def test_own_claim_is_not_a_gpu_given_by_a_scheduler(no_cuda, monkeypatch, tmp_path):
    """A workstation with two GPUs and a torch that cannot use them: the job's own claim sets
    CUDA_VISIBLE_DEVICES, which must not turn auto into "this job was given a GPU"."""
    monkeypatch.setattr(devices, "gpu_device_count", lambda: 2)
    monkeypatch.setenv("MASKFACE_GPU_LOCKS", str(tmp_path))
    monkeypatch.setattr(devices, "_CLAIMED", [])
    monkeypatch.setattr(devices, "_CLAIMED_IDS", [])
    try:
        assert resolve_device("auto", "demo.device") == "cpu"
        assert devices._CLAIMED_IDS and gpu_reserved() is None
    finally:
        for fh in devices._CLAIMED:
            fh.close()


def test_ranks_of_a_multi_gpu_run_do_not_claim(no_cuda, monkeypatch, tmp_path):
    """torchrun's ranks (LOCAL_RANK set) share the GPUs their parent job claimed or the whole machine."""
    monkeypatch.setattr(devices, "gpu_device_count", lambda: 2)
    monkeypatch.setenv("MASKFACE_GPU_LOCKS", str(tmp_path))
    monkeypatch.setattr(devices, "_CLAIMED", [])
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devices.claim_gpus(1) is None
    assert "CUDA_VISIBLE_DEVICES" not in __import__("os").environ


def test_lock_folder_is_per_user(monkeypatch):
    import os

    monkeypatch.delenv("MASKFACE_GPU_LOCKS", raising=False)
    assert devices.lock_folder().endswith(f"maskface-gpu-locks-{os.getuid()}")


def test_precision_policy():
    """Inference in true fp32 on a GPU; training lets convolutions use TF32, never the (head's) matmuls; the CPU
    is left alone. Only backend flags are set, so this runs without a GPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        assert devices.precision_policy("cpu") == {} and torch.backends.cudnn.allow_tf32
        assert devices.precision_policy("cuda") == {"conv_tf32": False, "matmul_tf32": False}
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert devices.precision_policy(torch.device("cuda", 0), training=True) == {"conv_tf32": True,
                                                                                    "matmul_tf32": False}
        assert torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_gpus_hidden_on_purpose_are_not_counted(monkeypatch):
    monkeypatch.setattr(devices.glob, "glob", lambda pattern: ["/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia1"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.gpu_device_count() == 2
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert devices.gpu_device_count() == 0
