"""Which device a stage runs on (align, features, train), and the line every job logs about it.

``auto`` means CUDA when torch can use it, else the CPU, except when the job was given a GPU: then a torch
that cannot use it (a CPU-only build, a driver too old for the wheel's CUDA, a device the job cannot see) is an
error that says so, not a silent fall-back that trains on the CPU until the job's time limit.
A job was given a GPU when SLURM says so (``SLURM_JOB_GPUS``, ``SLURM_STEP_GPUS``, ``SLURM_GPUS_ON_NODE``) or
``CUDA_VISIBLE_DEVICES`` names a device (an empty value or ``-1`` hides them all and means the CPU).
"""
from __future__ import annotations

import os
from typing import Optional

RESERVING_VARIABLES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES")


class DeviceError(RuntimeError):
    """The configured device cannot be used."""


def gpu_reserved() -> Optional[str]:
    """``NAME=value`` of the variable that says this job was given a GPU, or None."""
    for name in RESERVING_VARIABLES:
        value = os.environ.get(name, "").strip()
        if not value or value in ("-1", "NoDevFiles") or (name == "SLURM_GPUS_ON_NODE" and value == "0"):
            continue
        return f"{name}={value}"
    return None


def _why_no_cuda() -> str:
    import torch

    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - torch's own reason (no driver, driver too old, ...)
        return f"torch {torch.__version__} (built for CUDA {torch.version.cuda}): {str(exc).strip().splitlines()[0]}"
    return f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no CUDA device"


def resolve(device: str, key: str) -> str:
    """``cuda`` or ``cpu`` for a stage's ``device`` setting (``auto``, ``cpu``, ``cuda``); ``key`` names the
    setting in errors (e.g. ``train.device``)."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"{key} must be auto, cpu or cuda, got {device!r}")
    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise DeviceError(f"{key} is cuda but CUDA cannot be used: {_why_no_cuda()}. Set {key}: auto or cpu.")
    reserved = gpu_reserved()
    if reserved:
        raise DeviceError(f"{key} is auto and this job was given a GPU ({reserved}), but CUDA cannot be used: "
                          f"{_why_no_cuda()}. Refusing to run on the CPU instead; install a torch build for this "
                          f"driver, or set {key}: cpu.")
    return "cpu"


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
    parts += [f"{k.replace('_', ' ')} {v}" for k, v in extra.items()]
    return ", ".join(parts)
