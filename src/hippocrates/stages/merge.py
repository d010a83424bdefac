"""Merging a LoRA adapter into its input model without rounding the update away.

A LoRA update is small next to the weights it changes: DPO at a learning rate of 5e-6 moves
weights of size ~0.02 by ~1e-4, below bf16's resolution there (8 mantissa bits: steps of
~1.2e-4 around 0.02). Merged into bf16 weights, much of such an update is rounded off and many
weights do not change at all. So the merge here

1. reloads the input model from disk in fp32 (not the bf16 copy that was trained),
2. adds the adapter's update ``ΔW = B·A·scale`` in fp32,
3. measures, per candidate dtype, how much of ``ΔW`` the stored weights would keep:
   ``retained = 1 - ‖q(W + ΔW) - q(W) - ΔW‖ / ‖ΔW‖`` over every adapted weight, where ``q`` casts
   to that dtype (and the share of adapted weights left exactly unchanged),
4. stores the merged model in the input model's dtype when that keeps at least 99% of the
   update, else in fp32 (``merge_dtype: auto``; a recipe may force one), and
5. checks the stored weights against the unmerged model (base + adapter, fp32) on a few held-out
   sequences: the largest absolute logit difference, and
6. measures what a bf16 consumer (training the next stage, evaluating) sees of the stage: the
   change of the logits from input to merged model, both run in bf16, against the same change in
   fp32, ``effect_retained_bf16 = 1 - ‖Δlogits_bf16 - Δlogits_fp32‖ / ‖Δlogits_fp32‖``. Rounding
   to bf16 acts like stochastic rounding, so this function-level share is often far higher than the
   weight-level one; evaluation switches to fp32 when it falls below 95% (see eval precision).

All of it goes into ``metrics.json`` as the stage's ``merge`` record.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

RETAIN = 0.99
EFFECT_RETAIN = 0.95  # below this a bf16 consumer would not see the stage as it was trained
CANDIDATES = ("fp32", "bf16", "fp16")


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def update_fidelity(peft_model: Any) -> dict[str, Any]:
    """How much of every LoRA layer's update each dtype keeps (see the module docstring)."""
    import torch
    from peft.tuners.lora import LoraLayer

    sq_delta = 0.0
    sq_err = dict.fromkeys(CANDIDATES, 0.0)
    unchanged = dict.fromkeys(CANDIDATES, 0)
    moved = layers = 0
    with torch.no_grad():
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer) or not module.active_adapters:
                continue
            base = module.get_base_layer()
            weight = getattr(base, "weight", None)
            if weight is None:
                continue
            delta = sum(module.get_delta_weight(name).float() for name in module.active_adapters)
            w = weight.float()
            if delta.shape != w.shape:
                continue
            layers += 1
            sq_delta += float(delta.pow(2).sum())
            nonzero = delta != 0
            moved += int(nonzero.sum())
            merged = w + delta
            for name in CANDIDATES:
                dtype = _torch_dtype(name)
                realized = merged.to(dtype).float() - w.to(dtype).float()
                sq_err[name] += float((realized - delta).pow(2).sum())
                unchanged[name] += int(((realized == 0) & nonzero).sum())
    if not sq_delta:
        retained = dict.fromkeys(CANDIDATES, 1.0)
    else:
        retained = {n: max(0.0, 1.0 - math.sqrt(sq_err[n] / sq_delta)) for n in CANDIDATES}
    return {
        "layers": layers,
        "update_rms": math.sqrt(sq_delta / moved) if moved else 0.0,
        "retained": retained,
        "unchanged_share": {n: (unchanged[n] / moved if moved else 0.0) for n in CANDIDATES},
    }


def choose_dtype(store: str, input_dtype: str, retained: dict[str, float]) -> str:
    """``auto``: the input model's dtype when it keeps >= 99% of the update, else fp32."""
    if store != "auto":
        return store
    return input_dtype if retained.get(input_dtype, 0.0) >= RETAIN else "fp32"


def _logits(model: Any, rows: list[list[int]]) -> list[Any]:
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for ids in rows:
            out.append(model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits.float())
    return out


def _effect_retained(before32: list, after32: list, before16: list, after16: list) -> float | None:
    """Share of the fp32 logit change (input -> stage) that the same change shows in bf16."""
    import torch

    if not before32:
        return None
    want = torch.cat([(a - b).flatten() for a, b in zip(after32, before32, strict=True)])
    got = torch.cat([(a - b).flatten() for a, b in zip(after16, before16, strict=True)])
    norm = float(want.norm())
    return 1.0 if norm == 0 else max(0.0, 1.0 - float((got - want).norm()) / norm)


def merge_adapter(
    input_model: str,
    adapter: Path,
    out_dir: Path,
    *,
    store: str = "auto",
    probe: list[list[int]] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Merge ``adapter`` into ``input_model`` in fp32 and save it to ``out_dir``; return the merge record."""
    import torch
    from peft import PeftModel

    from hippocrates.models import load_model, resolve_model, stored_dtype

    resolved = resolve_model(input_model)
    device = "cuda" if torch.cuda.is_available() else None
    base = load_model(resolved, precision="fp32", trust_remote_code=trust_remote_code, device=device)
    rows = [r for r in (probe or []) if r]
    before = _logits(base, rows)
    if resolved.is_local:
        input_dtype = stored_dtype(resolved)
    else:
        input_dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(
            str(getattr(base.config, "dtype", "")).split(".")[-1], "fp32"
        )
    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False).eval()
    unmerged = _logits(model, rows)
    fidelity = update_fidelity(model)
    dtype = choose_dtype(store, input_dtype, fidelity["retained"])
    merged = model.merge_and_unload()
    merged.to(_torch_dtype(dtype))
    merged.config.use_cache = True
    merged.save_pretrained(out_dir)
    merged.float()  # exactly the stored values, widened: what a full-precision load of out_dir gives
    diffs = [float((a - b).abs().max()) for a, b in zip(_logits(merged, rows), unmerged, strict=True)]
    merged_bf16 = _logits(merged.to(torch.bfloat16), rows)
    del merged, model, base
    input_bf16 = _logits(
        load_model(resolved, precision="bf16", trust_remote_code=trust_remote_code, device=device), rows
    )
    effect = _effect_retained(before, unmerged, input_bf16, merged_bf16)
    return {
        "dtype": dtype,
        "merged_in": "fp32",
        "input_dtype": input_dtype,
        "requested": store,
        "update_retained": fidelity["retained"][dtype],
        "unchanged_share": fidelity["unchanged_share"][dtype],
        "update_retained_by_dtype": fidelity["retained"],
        "unchanged_share_by_dtype": fidelity["unchanged_share"],
        "update_rms": fidelity["update_rms"],
        "layers": fidelity["layers"],
        "max_abs_logit_diff": max(diffs) if diffs else None,
        "effect_retained_bf16": effect,
        "probe_sequences": len(rows),
        "probe_tokens": sum(len(r) for r in rows),
    }
