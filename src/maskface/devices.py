"""Which device a stage runs on (align, features, train), and the line every job logs about it.

``auto`` means CUDA when torch can use it, else the CPU, except when the job was given a GPU or, outside
SLURM, the machine has one that nothing hides: then a torch that cannot use it (a CPU-only build, a driver too
old for the wheel's CUDA, a device the job cannot see) is an error that says so, not a silent fall-back that
trains on the CPU until the job's time limit.
A job was given a GPU when SLURM says so (``SLURM_JOB_GPUS``, ``SLURM_STEP_GPUS``, ``SLURM_GPUS_ON_NODE``) or
``CUDA_VISIBLE_DEVICES`` names a device (an empty value or ``-1`` hides them all and means the CPU). A SLURM job
given no GPU sees the node's device files too, and runs on the CPU.

Several GPUs on one workstation: Snakemake's local executor counts the ``gpu`` resource but assigns no device,
so every job would land on GPU 0. Where neither SLURM nor the user has set ``CUDA_VISIBLE_DEVICES``, a job
that may use CUDA claims free GPUs itself (:func:`claim_gpus`): an exclusive lock on one file per GPU in
``$MASKFACE_GPU_LOCKS`` (default: ``maskface-gpu-locks`` in the system's temporary folder), held until the
process ends (a crash releases it), and ``CUDA_VISIBLE_DEVICES`` set to the claimed ones before CUDA starts.
A job that needs every GPU of the machine claims them all, so that it never shares one with another job's
claim; on a machine with one GPU nothing is claimed (no job has a choice, so none claims).
The processes of a multi-GPU run (torchrun's ranks, ``LOCAL_RANK`` set) never claim: their parent job claimed
the run's GPUs, or the user or a scheduler chose them. The lock folder is per user (locks of other users'
jobs cannot be opened, and their jobs are a scheduler's business).
Run with ``--resources gpu=N`` (N = the machine's GPUs) so that Snakemake never starts more GPU jobs than there
are GPUs; a job that finds every GPU claimed stops with that advice.
"""
from __future__ import annotations

import glob
import os
import re
import tempfile
from typing import Optional

RESERVING_VARIABLES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES")


class DeviceError(RuntimeError):
    """The configured device cannot be used."""


_CLAIMED: list = []    # open lock files: held for the life of the process
_CLAIMED_IDS: list = []  # the CUDA_VISIBLE_DEVICES value this process set by claiming


def gpu_reserved() -> Optional[str]:
    """``NAME=value`` of the variable that says this job was given a GPU (by a scheduler or the user, not by
    this process's own claim), or None."""
    for name in RESERVING_VARIABLES:
        value = os.environ.get(name, "").strip()
        if not value or value in ("-1", "NoDevFiles") or (name == "SLURM_GPUS_ON_NODE" and value == "0"):
            continue
        if name == "CUDA_VISIBLE_DEVICES" and value in _CLAIMED_IDS:
            continue
        return f"{name}={value}"
    return None


def lock_folder() -> str:
    """Where the GPU claims of this user's jobs are: ``$MASKFACE_GPU_LOCKS``, else a per-user folder in the
    system's temporary folder."""
    return os.environ.get("MASKFACE_GPU_LOCKS") or os.path.join(tempfile.gettempdir(),
                                                                f"maskface-gpu-locks-{os.getuid()}")


def gpu_device_count() -> int:
    """NVIDIA GPUs on this machine, from the device files (without starting CUDA, which would fix the set of
    visible devices before a claim); 0 when ``CUDA_VISIBLE_DEVICES`` hides them all ("", -1)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1", "NoDevFiles"):
        return 0
    return len([p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p)])


def claim_gpus(n: int = 1) -> Optional[str]:
    """Claim ``n`` free GPUs of this machine for this process and its children (``CUDA_VISIBLE_DEVICES``), unless
    the scheduler or the user has already chosen (:func:`gpu_reserved`, or the variable set at all), this is a
    rank of a multi-GPU run (``LOCAL_RANK``: its parent claimed), the machine has fewer than ``n`` GPUs
    (:func:`require_gpus` says so) or just one (no job has a choice, so none claims). A job that needs all of
    the machine's GPUs claims them all. Raises :class:`DeviceError` when fewer than ``n`` are free. Returns the
    claimed ids ("1" or "0,2"), or None."""
    import fcntl

    if _CLAIMED or "CUDA_VISIBLE_DEVICES" in os.environ or "LOCAL_RANK" in os.environ or gpu_reserved():
        return None
    total = gpu_device_count()
    if total < n or total <= 1:
        return None
    folder = lock_folder()
    os.makedirs(folder, exist_ok=True)
    got = []
    for k in range(total):
        fh = None
        try:
            fh = open(os.path.join(folder, f"gpu-{k}.lock"), "a+")
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:      # claimed by another job (or a lock file this user cannot open)
            if fh is not None:
                fh.close()
            continue
        got.append((k, fh))
        if len(got) == n:
            break
    if len(got) < n:
        free = {k for k, _ in got}
        for _, fh in got:
            fh.close()
        taken = ",".join(str(k) for k in range(total) if k not in free)
        which = f"GPU(s) {taken} of this machine's {total} are" if free else f"all {total} GPUs of this machine are"
        raise DeviceError(f"this job needs {n} GPU(s) but {which} claimed by other maskface jobs (locks in "
                          f"{folder}): run Snakemake with --resources gpu={total} so that it never starts more GPU "
                          f"jobs than there are GPUs")
    _CLAIMED.extend(fh for _, fh in got)
    ids = ",".join(str(k) for k, _ in got)
    _CLAIMED_IDS.append(ids)
    os.environ["CUDA_VISIBLE_DEVICES"] = ids
    return ids


def _why_no_cuda() -> str:
    import torch

    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - torch's own reason (no driver, driver too old, ...)
        return f"torch {torch.__version__} (built for CUDA {torch.version.cuda}): {str(exc).strip().splitlines()[0]}"
    return f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no CUDA device"


def require_gpus(n: int, key: str) -> int:
    """Check, before a multi-GPU run starts its ranks, that CUDA finds at least ``n`` GPUs (``key`` names the
    setting, e.g. ``train.gpus``); returns the count. The error tells the two cases apart: the job was given
    fewer GPUs than it needs (ask the scheduler for more), or it was given enough and CUDA cannot use them (a
    torch build too new for the driver, say)."""
    import torch

    seen = torch.cuda.device_count()
    if seen >= n:
        return seen
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    listed = [d for d in (given or "").split(",") if d.strip() and d.strip() not in ("-1", "NoDevFiles")]
    present, which = _unhidden_gpus()
    if present >= n:
        raise DeviceError(f"{key} is {n} and this machine has {present} GPU(s) ({which}), but CUDA finds {seen}: "
                          f"{_why_no_cuda()}. Install a torch build for this driver, or run on the CPU (device: "
                          f"cpu, {key}: 1).")
    if len(listed) >= n:
        raise DeviceError(f"{key} is {n} and this job was given {len(listed)} GPU(s) (CUDA_VISIBLE_DEVICES={given}), "
                          f"but CUDA finds {seen}: {_why_no_cuda()}. Install a torch build for this driver, or "
                          f"run on the CPU (device: cpu, {key}: 1).")
    raise DeviceError(f"{key} is {n} but this job sees {seen} GPU(s) (CUDA_VISIBLE_DEVICES="
                      f"{'unset' if given is None else given}): ask the scheduler for {n} GPUs on one node, or "
                      f"lower {key}")


def _unhidden_gpus() -> tuple[int, str]:
    """(GPUs, how they are seen) of a machine whose GPUs nothing hides and no scheduler chose: outside SLURM (a
    SLURM job without GPUs sees the node's device files too), ``CUDA_VISIBLE_DEVICES`` unset or this job's own
    claim; (0, "") otherwise."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    own = given is not None and given in _CLAIMED_IDS
    if "SLURM_JOB_ID" in os.environ or not (given is None or own):
        return 0, ""
    return gpu_device_count(), (f"CUDA_VISIBLE_DEVICES={given}, claimed by this job" if own
                                else "CUDA_VISIBLE_DEVICES unset")


def resolve_device(device: str, key: str, rank: Optional[int] = None) -> str:
    """The one device resolution of every stage: ``cpu`` or ``cuda`` (``cuda:<rank>`` for a rank of a
    multi-GPU run) for a stage's ``device`` setting (``auto``, ``cpu``, ``cuda``); ``key`` names the setting in
    errors (e.g. ``train.device``). ``auto`` is CUDA when it can be used; when the job was given a GPU, or runs
    outside SLURM on a machine with a GPU that nothing hides (``CUDA_VISIBLE_DEVICES`` unset or set by this
    job's own claim), and CUDA cannot be used, it fails with the reason instead of running on the CPU. A SLURM
    job given no GPU, GPUs hidden on purpose (``CUDA_VISIBLE_DEVICES`` empty or -1) and a machine without GPU
    device files mean the CPU."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"{key} must be auto, cpu or cuda, got {device!r}")
    if device == "cpu":
        return "cpu"
    claim_gpus(1)     # a workstation with several GPUs: a free one, before CUDA starts (ranks never claim)
    if torch.cuda.is_available():
        if rank is None:
            return "cuda"
        if rank >= torch.cuda.device_count():
            raise DeviceError(f"rank {rank} needs cuda:{rank} but this job sees {torch.cuda.device_count()} "
                              f"GPU(s): ask for as many GPUs as train.gpus")
        return f"cuda:{rank}"
    if device == "cuda":
        raise DeviceError(f"{key} is cuda but CUDA cannot be used: {_why_no_cuda()}. Set {key}: auto or cpu.")
    reserved = gpu_reserved()
    if reserved:
        raise DeviceError(f"{key} is auto and this job was given a GPU ({reserved}), but CUDA cannot be used: "
                          f"{_why_no_cuda()}. Refusing to run on the CPU instead; install a torch build for this "
                          f"driver, or set {key}: cpu.")
    present, which = _unhidden_gpus()
    if present:
        # a workstation's GPU(s), unhidden: not using them is not a choice anyone made
        raise DeviceError(f"{key} is auto and this machine has {present} NVIDIA GPU(s) ({which}), but CUDA cannot "
                          f"be used: {_why_no_cuda()}. Refusing to run on the CPU instead; install a torch build "
                          f"for this driver, set {key}: cpu, or export CUDA_VISIBLE_DEVICES= (empty) for the CPU "
                          f"in every stage.")
    return "cpu"


def precision_policy(device: str | object, training: bool = False) -> dict:
    """The float precision of a job on a GPU, set before its first kernel, and returned for its log line and
    provenance. Ampere and later GPUs may run fp32 convolutions and matmuls in TF32 (10-bit mantissa); cuDNN
    does so for convolutions by default, which makes GPU features differ from the CPU's by about 1e-3.

    - inference (alignment, features, the demo, a trained model's fold evaluation): true fp32 throughout, so
      that GPU and CPU results agree to float rounding;
    - training: the backbone's convolutions may use TF32 (as they may use bf16 under ``amp``); matmuls, among
      them the margin head's cos(m theta) logits, stay true fp32.

    On the CPU nothing is set and the policy is empty."""
    import torch

    dev = torch.device(device) if isinstance(device, str) else device
    if getattr(dev, "type", "cpu") != "cuda":
        return {}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = bool(training)
    return {"conv_tf32": bool(training), "matmul_tf32": False}


def describe(device: str | object, **extra: object) -> str:
    """One line for a job's log: the device (GPU name and memory), torch, CUDA and cuDNN versions, and
    ``extra`` (e.g. amp, world_size)."""
    import torch

    dev = torch.device(device) if isinstance(device, str) else device
    parts = [f"device {dev}"]
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        parts[0] += f" ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        parts[0] += f" ({torch.get_num_threads()} threads)"
    parts.append(f"torch {torch.__version__}")
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    if dev.type == "cuda" and torch.backends.cudnn.is_available():
        parts.append(f"cuDNN {torch.backends.cudnn.version()}")
    if dev.type == "cuda":
        parts.append(f"TF32 conv {'on' if torch.backends.cudnn.allow_tf32 else 'off'}, matmul "
                     f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}")
    parts += [f"{k.replace('_', ' ')} {v}" for k, v in extra.items()]
    return ", ".join(parts)
