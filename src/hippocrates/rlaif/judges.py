"""The judge interface shared by every backend, the clinician rubric, and the judge prompt.

A judge sees the rubric, a patient question and two responses (shown as A and B) and returns
a :class:`Verdict`: ``"A"``, ``"B"`` or ``"tie"`` with a short reason, or a failure (``verdict is
None``). Backends (:mod:`.local_judge`, :mod:`.http_judge`) differ only in how they get it, so
the annotate stage, the agreement check and the benchmark never care which one runs.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol

from hippocrates.errors import HippoError

Label = Literal["A", "B", "tie"]
LABELS: tuple[Label, ...] = ("A", "B", "tie")
VERSION_LINE = re.compile(r"^rubric_version:\s*(\S+)\s*$")
# "Verdict: A", "**Verdict:** Response B", "verdict - tie"; A/B must be capitals, words any case.
VERDICT_RE = re.compile(r"(?i:verdict)\W{0,4}\s*(?:(?i:response)\s+)?(A|B|(?i:tie))\b")
# A reply that is just the label ("A", "B:", "Response B.", "tie") also counts; "A normal..." does not.
BARE_RE = re.compile(r"^\W*(?:(?i:response)\s+)?(A|B|(?i:tie))\**\)?(?:\s*$|\s*\n|\s*[:.,;])")
REASON_RE = re.compile(r"(?i:reason)\W{0,4}\s*(.+)")


@dataclass(frozen=True)
class Rubric:
    """The clinician guidelines given to the judge; ``version`` goes into every output and cache key."""

    version: str
    text: str
    sha256: str
    path: str


def load_rubric(path: str | Path | None = None) -> Rubric:
    """Read a rubric file whose first line is ``rubric_version: X`` (default: the bundled one)."""
    if path is None:
        source = resources.files("hippocrates.rlaif").joinpath("rubric.md")
        raw, where = source.read_text(encoding="utf-8"), "hippocrates/rlaif/rubric.md"
    else:
        p = Path(path)
        if not p.is_file():
            raise HippoError(f"{p}: rubric file not found")
        raw, where = p.read_text(encoding="utf-8"), str(p)
    first, _, body = raw.partition("\n")
    match = VERSION_LINE.match(first.strip())
    if not match:
        raise HippoError(f"{where}:1: a rubric must start with 'rubric_version: X' (got {first[:60]!r})")
    text = body.strip()
    if not text:
        raise HippoError(f"{where}: rubric is empty")
    return Rubric(match.group(1), text, hashlib.sha256(raw.encode()).hexdigest(), where)


@dataclass(frozen=True)
class JudgeItem:
    """One question with two responses in a fixed order (A is shown first)."""

    prompt: str
    response_a: str
    response_b: str


@dataclass
class Verdict:
    """A judge's answer for one item; ``verdict is None`` means it failed (see ``error``)."""

    verdict: Label | None
    reason: str = ""
    raw: str | None = None
    error: str | None = None
    cached: bool = False
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verdict is not None

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reason": self.reason, "error": self.error, **self.scores}


class Judge(Protocol):
    """Every backend: ``judge_pairs`` returns one Verdict per item, in order, never raising for one item."""

    name: str
    rubric: Rubric
    stats: dict[str, Any]

    def judge_pairs(self, items: list[JudgeItem]) -> list[Verdict]: ...


ASK_LOCAL = "Which response is better by these guidelines? Answer with the letter A or B."
ASK_TEXT = (
    'Which response is better by these guidelines? Reply with "Verdict: A", "Verdict: B" or '
    '"Verdict: tie" on the first line, then one short sentence starting with "Reason:".'
)


def judge_prompt(rubric: Rubric, item: JudgeItem, *, ask: str = ASK_TEXT) -> str:
    """The judge's user message; the rubric comes first so every prompt shares it as a prefix."""
    return (
        f"{rubric.text}\n\nPatient question:\n{item.prompt.strip()}\n\n"
        f"Response A:\n{item.response_a.strip()}\n\nResponse B:\n{item.response_b.strip()}\n\n{ask}"
    )


def parse_verdict(text: str) -> tuple[Label | None, str]:
    """Find ``Verdict: A|B|tie`` (or a reply that is only the label) and ``Reason: ...``.

    Returns ``(None, "")`` when there is no verdict; the caller counts that as a failure.
    """
    text = text or ""
    match = VERDICT_RE.search(text) or BARE_RE.match(text)
    if not match:
        return None, ""
    word = match.group(1)
    label: Label = "tie" if word.lower() == "tie" else word  # type: ignore[assignment]
    reason = REASON_RE.search(text[match.end() :]) or REASON_RE.search(text)
    return label, (reason.group(1).strip()[:300] if reason else "")


def default_device() -> str | None:
    """``cuda`` when a GPU is visible (models load on CPU by default), else None."""
    import torch

    return "cuda" if torch.cuda.is_available() else None


Outcome = Literal["A", "B", "tie", "inconsistent", "failed"]
FLIP: dict[str, str] = {"A": "B", "B": "A", "tie": "tie"}


def combine_orders(first: Verdict, second: Verdict) -> Outcome:
    """Merge the verdicts on (x, y) and on the swapped pair (y, x) into one outcome for (x, y).

    ``"A"``: x is better in both orders, ``"B"``: y is, ``"tie"``: both orders say tie.
    Anything else (the judge followed the position, or called a tie only one way) is
    ``"inconsistent"``; a failure in either order is ``"failed"``.
    """
    if not first.ok or not second.ok:
        return "failed"
    if first.verdict == FLIP[second.verdict or ""]:
        return first.verdict  # type: ignore[return-value]
    return "inconsistent"


def make_judge(
    config: Any,
    *,
    precision: str = "fp32",
    batch_size: int = 8,
    cache_path: Path | None = None,
    model: Any = None,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
) -> Judge:
    """Build the judge a recipe's ``JudgeConfig`` asks for (reusing an already loaded local model)."""
    rubric = load_rubric(config.rubric)
    if config.backend == "http":
        from hippocrates.rlaif.http_judge import HTTPJudge

        return HTTPJudge.from_config(config, rubric=rubric, cache_path=cache_path)
    from hippocrates.rlaif.local_judge import LocalJudge

    if model is None or tokenizer is None:
        from hippocrates.models import load_model, load_tokenizer, resolve_model

        resolved = resolve_model(config.model)
        tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
        model = load_model(
            resolved, precision=precision, trust_remote_code=trust_remote_code, device=default_device()
        )
    return LocalJudge(
        model,
        tokenizer,
        rubric=rubric,
        name=f"local:{config.model}",
        batch_size=batch_size,
        tie_threshold=config.tie_threshold,
        calibrate=config.calibrate,
    )
