"""device: auto means CUDA, or the CPU when the job was given no GPU; a job given a GPU that torch cannot use
fails with the reason instead of training on the CPU."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from maskface import devices
from maskface.devices import RESERVING_VARIABLES, DeviceError, describe, gpu_reserved, resolve_device

GPU_DEVICE_COUNT = devices.gpu_device_count     # the real one, before the fixture's stand-in


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


def _claimer(locks, n: int = 1, **env) -> subprocess.Popen:
    """A job on a two-GPU workstation claiming ``n`` GPUs (locks in ``locks``), with nothing in its environment
    that chose the GPUs for it (plus ``env``); it prints the ids and holds them until its stdin is closed."""
    base = {k: v for k, v in os.environ.items() if k not in RESERVING_VARIABLES + ("LOCAL_RANK",)}
    return subprocess.Popen([sys.executable, "-c", _CLAIMER, str(n)], env={**base, "MASKFACE_GPU_LOCKS": str(locks),
                                                                           **env},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_jobs_on_a_workstation_claim_different_gpus(tmp_path):
    """Concurrent GPU jobs get different GPUs; one too many stops with the way out; an ended job frees its GPU."""
    def start(**env):
        return _claimer(tmp_path, **env)

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
    e = start(CUDA_VISIBLE_DEVICES="1")       # chosen by the user or a scheduler: no claim
    assert e.stdout.readline().strip() == "None"
    e.communicate(timeout=60)


def test_own_claim_is_not_a_gpu_given_by_a_scheduler(no_cuda, monkeypatch, tmp_path):
    """A workstation with two GPUs and a torch that cannot use them: the job's own claim sets
    CUDA_VISIBLE_DEVICES, which must not turn auto into "this job was given a GPU"; the job stops because the
    machine has GPUs that CUDA cannot use (it used to run on the CPU instead)."""
    monkeypatch.setattr(devices, "gpu_device_count", lambda: 2)
    monkeypatch.setenv("MASKFACE_GPU_LOCKS", str(tmp_path))
    monkeypatch.setattr(devices, "_CLAIMED", [])
    monkeypatch.setattr(devices, "_CLAIMED_IDS", [])
    try:
        with pytest.raises(DeviceError, match=r"demo.device is auto and this machine has 2 NVIDIA GPU\(s\) "
                                              r"\(CUDA_VISIBLE_DEVICES=0, claimed by this job\)"):
            resolve_device("auto", "demo.device")
        assert devices._CLAIMED_IDS and gpu_reserved() is None
    finally:
        for fh in devices._CLAIMED:
            fh.close()


@pytest.mark.parametrize("files", [1, 2])
def test_auto_refuses_the_cpu_on_a_workstation_whose_gpus_cuda_cannot_use(no_cuda, monkeypatch, tmp_path, files):
    """No scheduler, GPU device files, nothing hiding them, and a torch that cannot use CUDA (a driver too old
    for the wheel): auto stops with the GPUs seen, torch's reason and the way out, where it used to train on
    the CPU for days. A SLURM job given no GPU, GPUs hidden on purpose and no device files stay on the CPU."""
    monkeypatch.setattr(devices, "gpu_device_count", GPU_DEVICE_COUNT)
    monkeypatch.setattr(devices.glob, "glob", lambda pattern: [f"/dev/nvidia{k}" for k in range(files)]
                        + ["/dev/nvidiactl", "/dev/nvidia-uvm"])
    monkeypatch.setattr(devices, "_why_no_cuda", lambda: "torch 9.9 (built for CUDA 13.0): driver too old")
    monkeypatch.setenv("MASKFACE_GPU_LOCKS", str(tmp_path))
    monkeypatch.setattr(devices, "_CLAIMED", [])
    monkeypatch.setattr(devices, "_CLAIMED_IDS", [])
    seen = "CUDA_VISIBLE_DEVICES unset" if files == 1 else "CUDA_VISIBLE_DEVICES=0, claimed by this job"

    def release():                                   # end of a job: its claim and CUDA_VISIBLE_DEVICES go
        for fh in devices._CLAIMED:
            fh.close()
        devices._CLAIMED.clear()
        devices._CLAIMED_IDS.clear()
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    try:
        with pytest.raises(DeviceError) as err:
            resolve_device("auto", "train.device")
        msg = str(err.value)
        assert "\n" not in msg
        assert msg == (f"train.device is auto and this machine has {files} NVIDIA GPU(s) ({seen}), but CUDA cannot "
                       f"be used: torch 9.9 (built for CUDA 13.0): driver too old. Refusing to run on the CPU "
                       f"instead; install a torch build for this driver, set train.device: cpu, or export "
                       f"CUDA_VISIBLE_DEVICES= (empty) for the CPU in every stage."), msg
        assert resolve_device("cpu", "train.device") == "cpu"
        release()
        monkeypatch.setenv("SLURM_JOB_ID", "7")      # a SLURM job given no GPU sees the node's device files
        assert resolve_device("auto", "train.device") == "cpu"
    finally:
        release()
    monkeypatch.delenv("SLURM_JOB_ID")
    for hidden in ("", "-1"):                        # hidden on purpose by the user
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert resolve_device("auto", "train.device") == "cpu"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(devices.glob, "glob", lambda pattern: [])
    assert resolve_device("auto", "train.device") == "cpu"


def test_a_job_that_needs_every_gpu_claims_them_all(tmp_path):
    """train.gpus equal to the machine's GPUs: the job claims all of them and stops, with the way out, while
    another job holds one; a job needing more GPUs than there are claims nothing (require_gpus says so)."""
    def start(n):
        return _claimer(tmp_path, n)

    a = start(1)
    assert a.stdout.readline().strip() == "0"
    b = start(2)                              # overlapped a's GPU before
    out, _ = b.communicate(timeout=60)
    assert b.returncode == 3, out
    assert "needs 2 GPU(s) but GPU(s) 0 of this machine's 2 are claimed by other maskface jobs" in out
    assert "--resources gpu=2" in out
    a.communicate(timeout=60)
    c = start(2)
    assert c.stdout.readline().strip() == "0,1"
    d = start(1)                              # c holds both
    out, _ = d.communicate(timeout=60)
    assert d.returncode == 3 and "all 2 GPUs of this machine are claimed" in out, out
    e = start(3)                              # more than the machine has: left to require_gpus
    assert e.stdout.readline().strip() == "None"
    for p in (c, e):
        p.communicate(timeout=60)


def test_a_claim_of_every_gpu_then_require_gpus(no_cuda, monkeypatch, tmp_path):
    """launch's order for train.gpus 2 on a two-GPU workstation: the claim sets CUDA_VISIBLE_DEVICES to both,
    require_gpus then names them as this machine's GPUs claimed by the job (not as given by a scheduler); a
    one-GPU machine claims nothing."""
    monkeypatch.setattr(devices, "_why_no_cuda", lambda: "torch 9.9 (built for CUDA 13.0): driver too old")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("MASKFACE_GPU_LOCKS", str(tmp_path))
    monkeypatch.setattr(devices, "_CLAIMED", [])
    monkeypatch.setattr(devices, "_CLAIMED_IDS", [])
    monkeypatch.setattr(devices, "gpu_device_count", lambda: 1)
    assert devices.claim_gpus(1) is None and "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setattr(devices, "gpu_device_count", lambda: 2)
    try:
        assert devices.claim_gpus(2) == "0,1" and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
        with pytest.raises(DeviceError, match=r"train.gpus is 2 and this machine has 2 GPU\(s\) \(CUDA_VISIBLE"
                                              r"_DEVICES=0,1, claimed by this job\), but CUDA finds 0: .*too old"):
            devices.require_gpus(2, "train.gpus")
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
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_lock_folder_is_per_user(monkeypatch):
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


def _plugin_requirements():
    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    reqs = [Requirement(r) for extra in meta["project"]["optional-dependencies"].values() for r in extra]
    return [r for r in reqs if r.name == "snakemake-executor-plugin-slurm"]


def test_the_slurm_plugin_is_one_that_adds_no_task_per_gpu_by_default():
    """snakemake-executor-plugin-slurm 1.0 to 2.7.0 add --ntasks-per-gpu to every GPU job unless told not to
    (1.0 to 1.5: always), which splits a train.gpus: N job into N one-GPU tasks; 2.7.1 adds it only on request."""
    reqs = _plugin_requirements()
    assert len(reqs) == 2, reqs               # the test and slurm extras
    for req in reqs:
        assert req.specifier.contains("2.7.1") and req.specifier.contains("2.8.0"), req
        assert not any(req.specifier.contains(v) for v in ("1.0.0", "1.5.0", "1.9.2", "2.7.0")), req
