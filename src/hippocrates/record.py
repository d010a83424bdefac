"""The run record: one manifest model and one freshness rule for every step of a run.

Every step that writes an output folder (cpt, sft, annotate, dpo, grpo, each evaluation, the
sweep, the ablation) follows the same protocol::

    step = Step(stage, config, model, data, seed, precision)    # its inputs
    step.inputs_hash                                             # sha256 over all of them
    current(folder, step)       # a complete output made from exactly these inputs?  -> skip
    ... run ...
    write_manifest(tmp, step.manifest(...))                      # inside the atomic folder

``data`` holds the identity of every file read (sha256) or hub dataset (id, split, subset).
A model's identity is a stage output's own ``fingerprint`` (new at every finish, so a step
rerun makes every later step rerun), else its config and weight-file stats. The manifest
is a pydantic model, so a folder whose manifest is unreadable or of another shape is simply
not current, with the reason kept for the message.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from hippocrates import __version__
from hippocrates.data.io import read_json_object, write_json
from hippocrates.errors import HippoError

MANIFEST = "manifest.json"
PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "tokenizers", "lm_eval")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    fingerprint: str


class Manifest(BaseModel):
    """``manifest.json`` of every output folder."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    recipe_name: str | None = None
    recipe_path: str | None = None
    hippocrates_version: str
    inputs_hash: str
    fingerprint: str
    input_model: ModelRef | None = None
    config: dict[str, Any]
    data: list[dict[str, Any]]
    seed: int | None = None
    precision: str | None = None
    started: str
    finished: str
    duration_s: float
    resumed_from: str | None = None
    outputs: list[str]
    packages: dict[str, str]
    git_commit: str | None = None
    hardware: dict[str, Any]
    command: list[str]
    recipe: dict[str, Any] | None = None
    extra: dict[str, Any] = {}


def read_manifest(folder: str | Path) -> Manifest | None:
    """The folder's manifest, or None when there is none or it is not one of ours."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return Manifest.model_validate(read_json_object(path))
    except (HippoError, ValidationError):
        return None


def write_manifest(folder: str | Path, manifest: Manifest) -> None:
    write_json(Path(folder) / MANIFEST, manifest.model_dump(mode="json"))


def model_fingerprint(spec: str) -> str:
    """A model's identity: a stage output's fingerprint, else its config and weight-file stats."""
    from hippocrates.models import resolve_model

    resolved = resolve_model(spec)
    if not resolved.is_local:
        return digest({"hub": resolved.path})
    folder = Path(resolved.path)
    manifest = read_manifest(folder)
    if manifest is not None:
        return manifest.fingerprint
    parts: dict[str, Any] = {}
    for name in sorted(os.listdir(folder)):
        f = folder / name
        if name in ("config.json", "hippo_source.json", "adapter_config.json"):
            parts[name] = f.read_bytes().decode("utf-8", "replace")
        elif name.endswith((".safetensors", ".bin", ".gguf")):
            st = f.stat()
            parts[name] = [st.st_size, st.st_mtime_ns]
    return digest(parts)


@dataclass
class Step:
    """The inputs of one step; ``inputs_hash`` decides whether an existing output can be reused."""

    stage: str
    config: dict[str, Any]
    model: str | None = None
    data: list[dict[str, Any]] = field(default_factory=list)
    seed: int | None = None
    precision: str | None = None

    @cached_property
    def model_fp(self) -> str | None:
        return model_fingerprint(self.model) if self.model else None

    @cached_property
    def inputs_hash(self) -> str:
        return digest(
            {
                "stage": self.stage,
                "config": self.config,
                "model": self.model_fp,
                "data": [_identity(d) for d in self.data],
                "seed": self.seed,
                "precision": self.precision,
            }
        )

    def manifest(
        self,
        *,
        outputs: list[str],
        started: str,
        t0: float,
        recipe: Any = None,
        resumed_from: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Manifest:
        """The manifest of a finished run of this step (a fresh fingerprint every time)."""
        from hippocrates.accel import hardware_summary
        from hippocrates.config import recipe_to_dict

        finished = now()
        return Manifest(
            stage=self.stage,
            recipe_name=getattr(recipe, "name", None),
            recipe_path=getattr(recipe, "source_path", None),
            hippocrates_version=__version__,
            inputs_hash=self.inputs_hash,
            fingerprint=digest({"inputs_hash": self.inputs_hash, "finished": finished, "t": time.time()}),
            input_model=ModelRef(path=str(self.model), fingerprint=self.model_fp or "")
            if self.model
            else None,
            config=self.config,
            data=self.data,
            seed=self.seed,
            precision=self.precision,
            started=started,
            finished=finished,
            duration_s=round(time.time() - t0, 1),
            resumed_from=resumed_from,
            outputs=outputs,
            packages=package_versions(),
            git_commit=git_commit(),
            hardware=hardware_summary(),
            command=list(sys.argv),
            recipe=recipe_to_dict(recipe) if recipe is not None else None,
            extra=extra or {},
        )


def _identity(entry: dict[str, Any]) -> dict[str, Any]:
    """A data entry as the hash sees it: content (sha256, fingerprint) rather than where it lies,
    so a run folder or data folder that is moved or copied is still current."""
    if not any(k.endswith(("sha256", "fingerprint")) for k in entry):
        return entry
    return {k: v for k, v in entry.items() if k != "path" and not k.endswith("_path")}


def staleness(folder: str | Path, step: Step) -> str | None:
    """Why ``folder`` must be (re)made for ``step``, or None when it is complete and current."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not made yet"
    manifest = read_manifest(folder)
    if manifest is None:
        return "no readable manifest"
    if manifest.inputs_hash != step.inputs_hash:
        return "its inputs changed (config, model or data)"
    missing = [name for name in manifest.outputs if not (folder / name).exists()]
    if missing:
        return f"{missing[0]} is missing"
    return None


def current(folder: str | Path, step: Step) -> bool:
    """True when ``folder`` holds a complete output made from exactly ``step``'s inputs."""
    return staleness(folder, step) is None


def check_owner(folder: Path, recipe: Any, overwrite: bool) -> None:
    """Refuse to replace a folder written by another recipe (or a folder we did not write)."""
    if overwrite or not folder.exists():
        return
    if not folder.is_dir():
        raise HippoError(f"{folder}: is a file, not an output folder")
    if (folder / MANIFEST).is_file():
        read_json_object(folder / MANIFEST)  # an unreadable manifest (bad bytes, torn JSON) names itself
    manifest = read_manifest(folder)
    if manifest is None:
        if (folder / MANIFEST).is_file() or any(p.name != ".hippo.lock" for p in folder.iterdir()):
            raise HippoError(
                f"{folder} exists and is not a Hippocrates output folder; pass --overwrite to replace it"
            )
        return
    if manifest.recipe_name not in (None, recipe.name):
        raise HippoError(
            f"{folder} holds the {manifest.stage} output of another run "
            f"(recipe '{manifest.recipe_name}'); change output_dir or pass --overwrite"
        )


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "hippocrates": __version__}
    for name in PACKAGES:
        try:
            out[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            pass
    return out
