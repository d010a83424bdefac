"""Small helpers that let the same stage code run on a laptop CPU, one GPU, or many GPUs.

The stages never branch on the launcher. Under ``accelerate launch`` and ``torchrun`` every
process gets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` in its environment before any process group
exists, so rank checks read the environment first and only then ``torch.distributed``. Torch is
imported lazily: if nobody imported it yet, no process group can exist either.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

ATTN_ENV = "HIPPO_ATTN_IMPLEMENTATION"  # forces an attention kernel (e.g. "eager" to debug)


def _dist():
    """``torch.distributed`` when a process group is up, else None (never imports torch itself)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    return torch.distributed


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.lstrip("-").isdigit() else None


def rank() -> int:
    """Global rank: the process group's, else ``RANK`` (set by accelerate/torchrun), else 0."""
    dist = _dist()
    if dist is not None:
        return dist.get_rank()
    env = _env_int("RANK")
    return env if env is not None else (_env_int("LOCAL_RANK") or 0)


def local_rank() -> int:
    """Rank within this node (``LOCAL_RANK``); 0 outside a launcher."""
    return _env_int("LOCAL_RANK") or 0


def world_size() -> int:
    """Number of processes in the job: the process group's, else ``WORLD_SIZE``, else 1."""
    dist = _dist()
    if dist is not None:
        return dist.get_world_size()
    return _env_int("WORLD_SIZE") or 1


def is_main_process() -> bool:
    """True on global rank 0 only: the process that writes manifests, reports and merged models."""
    return rank() == 0


def is_local_main_process() -> bool:
    """True on rank 0 of each node: the process that fills node-local caches (GGUF, datasets)."""
    return local_rank() == 0


def _ensure_process_group() -> Any | None:
    """Start the process group from the launcher's env (as the Trainer would) so a barrier works."""
    if world_size() <= 1:
        return None
    if _dist() is None:
        from accelerate import PartialState

        PartialState()  # reads RANK/WORLD_SIZE/MASTER_ADDR; the Trainer reuses this state later
    return _dist()


@contextmanager
def main_process_first(local: bool = False) -> Iterator[None]:
    """Run the body on the main process first, then on all others (e.g. build a cache once).

    ``local=True`` lets each node's rank 0 go first, for caches on node-local disks. Every process
    passes exactly one barrier, so the ranks stay in step. Single process: just runs the body.
    """
    dist = _ensure_process_group()
    leader = is_local_main_process() if local else is_main_process()
    if dist is not None and not leader:
        dist.barrier()
    try:
        yield
    finally:
        if dist is not None and leader:
            dist.barrier()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ram_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # not POSIX (Windows)
        return None


def hardware_summary() -> dict[str, Any]:
    """What ran the job, for manifests: CPUs, RAM, GPUs, CUDA/torch versions, world size."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "name": props.name,
                    "memory_gb": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}",
                }
            )
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_count_usable": usable,
        "ram_gb": _ram_gb(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "gpu_count": len(gpus),
        "gpus": gpus,
        "world_size": world_size(),
        "rank": rank(),
        "flash_attn": _version("flash-attn"),
        "liger_kernel": _version("liger-kernel"),
        "deepspeed": _version("deepspeed"),
    }


def attn_implementation(precision: str = "auto") -> str:
    """The attention kernel to ask transformers for: FlashAttention-2 where it can run, else SDPA.

    FA2 needs the ``flash-attn`` package, CUDA and a 16-bit dtype; it also makes packing exact and
    cheap (variable-length kernels driven by position_ids). SDPA is built into torch and works
    everywhere, including CPU. ``$HIPPO_ATTN_IMPLEMENTATION`` overrides the choice.
    """
    forced = os.environ.get(ATTN_ENV, "").strip()
    if forced:
        return forced
    import torch

    from hippocrates.models import torch_dtype

    if torch_dtype(precision) not in (torch.bfloat16, torch.float16) or not torch.cuda.is_available():
        return "sdpa"
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"


def _on_cuda(model: Any) -> bool:
    try:
        return next(model.parameters()).device.type == "cuda"
    except StopIteration:
        return False


def maybe_liger(model: Any, **kernel_kwargs: Any) -> bool:
    """Patch the model in place with Liger Triton kernels (RMSNorm, RoPE, SwiGLU, fused CE) if possible.

    A no-op returning False unless ``liger-kernel`` is installed (extra ``liger``) and the model
    is on CUDA. A PEFT wrapper is unwrapped first. Pass ``fused_linear_cross_entropy=False`` where
    a training forward must still return logits.
    """
    if importlib.util.find_spec("liger_kernel") is None or not _on_cuda(model):
        return False
    from liger_kernel.transformers import _apply_liger_kernel_to_instance, monkey_patch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    supported = getattr(monkey_patch, "MODEL_TYPE_TO_APPLY_LIGER_FN", None)
    if supported is not None and getattr(base.config, "model_type", None) not in supported:
        return False  # liger would only log and return: report it as not applied
    try:
        _apply_liger_kernel_to_instance(model=base, **kernel_kwargs)
    except Exception as exc:  # unsupported architecture or kernel version: keep the plain model
        from hippocrates.progress import status

        status(f"liger kernels not applied ({type(exc).__name__}: {exc})")
        return False
    return True
