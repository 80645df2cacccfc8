"""Which device a model runs on: ``--device auto|cpu|cuda[:N]|mps``.

``auto`` is a CUDA GPU when torch sees one, else the CPU path (int8 kernels, the C
forward step). On a GPU the fast decoder runs its torch forward with dense weights
in bf16 (fp16 where the GPU has no bf16), the KV cache and sampling on the device.
``mps`` (Apple GPUs) is only taken when asked for.

Importing this module does not import torch (``chatforge --help`` must not pay for
it); the functions do.
"""

from __future__ import annotations

from typing import Any

from chatforge.errors import ChatforgeError

DEVICE_HELP = (
    "Where the model runs: auto (a CUDA GPU when there is one, else the CPU), cpu, "
    "cuda, cuda:N or mps."
)


class DeviceError(ChatforgeError):
    """A device the machine lacks, or a spec that names none (one line, naming --device)."""


def check_device_spec(spec: str | None) -> str:
    """``spec`` normalised (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) without
    asking torch whether the device is there; raises DeviceError for anything else."""
    s = "auto" if spec is None else str(spec).strip().lower()
    if s in ("auto", "cpu", "cuda", "mps"):
        return s
    if s.startswith("cuda:"):
        index = s[5:]
        if index.isdigit():
            return f"cuda:{int(index)}"
    raise DeviceError(f"--device must be auto, cpu, cuda, cuda:N or mps (got {spec!r})")


def resolve_device(spec: str | None = "auto") -> Any:
    """The ``torch.device`` for ``spec``; a DeviceError (one line) when it names a
    device this machine lacks."""
    import torch

    s = check_device_spec(spec)
    if s == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        s = "cuda"  # the current GPU, by its index (the name models info shows)
    if s == "cpu":
        return torch.device("cpu")
    if s == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError("--device mps: this machine has no Apple GPU (MPS) torch can use")
        return torch.device("mps")
    if not torch.cuda.is_available():
        why = (
            "the installed torch is a CPU build"
            if torch.version.cuda is None
            else "torch.cuda.is_available() is False"
        )
        raise DeviceError(f"--device {s}: this machine has no CUDA GPU ({why}); use cpu or auto")
    index = int(s[5:]) if ":" in s else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"--device {s}: this machine has {count} CUDA GPU{'s' if count != 1 else ''} "
            f"(cuda:0 to cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def default_dtype(device: Any) -> str:
    """The activation / weight dtype ``--dtype auto`` picks on ``device`` (short name):
    bf16 on a CUDA GPU that supports it, else fp16 there; fp16 on MPS; the CPU keeps
    its own choice (``loading.AUTO_SETTING``), so "auto" is returned for it."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "mps":
        return "fp16"
    return "auto"


def device_name(device: Any) -> str:
    """``device`` for a user: ``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    import torch

    d = torch.device(device)
    if d.type == "cuda":
        index = d.index if d.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(d)
