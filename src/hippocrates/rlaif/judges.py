"""The judge interface shared by every backend, the clinician rubric, and the judge prompt.

A judge sees the rubric, a patient question and two responses (shown as A and B) and returns
a :class:`Verdict`: ``"A"``, ``"B"`` or ``"tie"`` with a short reason, or a failure (``verdict is
None``). Backends (:mod:`.local_judge`, :mod:`.http_judge`) differ only in how they get it, so
the annotate stage, the agreement check and the benchmark never care which one runs.

A verdict comes from one of two sources. ``logprobs``: the conversation of
:func:`verdict_messages` ends with the assistant's ``Better response: Response`` and the verdict compares
log P(" A") with log P(" B") for the next token (:func:`logprob_verdicts`, used by the local judge
and by the HTTP judge when the endpoint returns log-probabilities, so both decide alike).
``text``: the judge writes ``Verdict: A|B|tie`` (:func:`parse_verdict`).
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


Source = Literal["logprobs", "text"]


@dataclass
class Verdict:
    """A judge's answer for one item; ``verdict is None`` means it failed (see ``error``).

    ``raw_verdict`` is what the judge said before any position-bias correction (log-prob verdicts
    with ``calibrate`` other than ``none``); ``corrected`` says whether ``verdict`` differs from it
    by construction. Order consistency is measured on ``raw_verdict``.
    """

    verdict: Label | None
    reason: str = ""
    raw: str | None = None
    error: str | None = None
    cached: bool = False
    scores: dict[str, float] = field(default_factory=dict)
    source: Source = "text"
    raw_verdict: Label | None = None
    corrected: bool = False

    def __post_init__(self) -> None:
        if self.raw_verdict is None and not self.corrected:
            self.raw_verdict = self.verdict

    @property
    def ok(self) -> bool:
        return self.verdict is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "raw_verdict": self.raw_verdict,
            "source": self.source,
            "reason": self.reason,
            "error": self.error,
            **self.scores,
        }


class Judge(Protocol):
    """Every backend: ``judge_pairs`` returns one Verdict per item, in order, never raising for one item.

    ``stats`` counts what the judge did since the last ``reset_stats()`` (annotate keeps one set
    per phase).
    """

    name: str
    rubric: Rubric
    stats: dict[str, Any]

    def judge_pairs(self, items: list[JudgeItem]) -> list[Verdict]: ...

    def reset_stats(self) -> None: ...


ASK_LOCAL = "Which response is better by these guidelines? Answer with the letter A or B."
# The assistant's open answer: the verdict letter is its next token. Ending on "Response" (the
# answers are shown as "Response A"/"Response B") makes " A"/" B" the likely continuation:
# SmolLM2-135M puts ~94% of its probability on them here, against ~2% after "Better response:".
VERDICT_LEAD = "Better response: Response"
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


def verdict_messages(rubric: Rubric, item: JudgeItem) -> list[dict[str, str]]:
    """The conversation a log-prob judge continues: the question, then the assistant's open
    ``Better response: Response``, whose next token is the verdict letter (rendered with
    ``chat.render(..., continue_final=True)`` locally and by ``hippo serve``)."""
    return [
        {"role": "user", "content": judge_prompt(rubric, item, ask=ASK_LOCAL)},
        {"role": "assistant", "content": VERDICT_LEAD},
    ]


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


Calibration = Literal["question", "mean", "content-free", "none"]
CONTENT_FREE = JudgeItem("N/A", "N/A", "N/A")


def items_to_score(items: list[JudgeItem], calibrate: str) -> list[JudgeItem]:
    """The distinct items a log-prob judge scores: the ones asked, plus their mirrors (B shown
    first) for ``question`` and ``mean`` calibration, plus the content-free pair for ``content-free``."""
    wanted = list(dict.fromkeys(items))
    if calibrate in ("question", "mean"):
        wanted = list(dict.fromkeys(wanted + [mirror(i) for i in wanted]))
    elif calibrate == "content-free":
        wanted = list(dict.fromkeys([*wanted, CONTENT_FREE]))
    return wanted


def mirror(item: JudgeItem) -> JudgeItem:
    return JudgeItem(item.prompt, item.response_b, item.response_a)


def position_biases(scores: dict[JudgeItem, tuple[float, float]], calibrate: str) -> dict[str, float]:
    """The first-position preference to subtract, per question (prompt text).

    ``question``: the mean margin log P(A) - log P(B) over that question's items in both orders;
    ``mean``: the same over all items; ``content-free``: the margin on a pair of "N/A" answers;
    ``none``: nothing. A judge without a position preference averages zero over an
    order-balanced set.
    """
    prompts = {item.prompt for item in scores if item != CONTENT_FREE}
    if calibrate == "none" or not prompts:
        return {}
    if calibrate == "content-free":
        lp_a, lp_b = scores[CONTENT_FREE]
        return dict.fromkeys(prompts, lp_a - lp_b)
    groups: dict[str, list[float]] = {}
    for item, (lp_a, lp_b) in scores.items():
        if item != CONTENT_FREE:
            groups.setdefault(item.prompt if calibrate == "question" else "", []).append(lp_a - lp_b)
    if calibrate == "mean":
        return dict.fromkeys(prompts, sum(groups[""]) / len(groups[""]))
    return {prompt: sum(m) / len(m) for prompt, m in groups.items()}


def margin_label(margin: float, tie_threshold: float) -> Label:
    return "tie" if abs(margin) <= tie_threshold else ("A" if margin > 0 else "B")


def logprob_verdicts(
    items: list[JudgeItem],
    scores: dict[JudgeItem, tuple[float, float]],
    *,
    calibrate: str,
    tie_threshold: float,
) -> list[Verdict]:
    """Verdicts from ``(log P(" A"), log P(" B"))`` per item: the one rule for every log-prob judge.

    ``raw_verdict`` is the sign of the raw margin; ``verdict`` that of the margin less the
    position bias (:func:`position_biases` over every scored item); either is a tie within
    ``tie_threshold``. ``scores`` must hold every item of :func:`items_to_score`.
    """
    biases = position_biases(scores, calibrate)
    out = []
    for item in items:
        lp_a, lp_b = scores[item]
        bias = biases.get(item.prompt, 0.0)
        raw, margin = lp_a - lp_b, lp_a - lp_b - bias
        reason = f"log P(A)={lp_a:.3f}, log P(B)={lp_b:.3f}, position bias {bias:+.3f}"
        numbers = {"logp_a": round(lp_a, 5), "logp_b": round(lp_b, 5), "margin": round(margin, 5)}
        out.append(
            Verdict(
                margin_label(margin, tie_threshold),
                reason=reason,
                scores=numbers,
                source="logprobs",
                raw_verdict=margin_label(raw, tie_threshold),
                corrected=calibrate != "none",
            )
        )
    return out


def order_consistency(verdicts: list[Verdict]) -> dict[str, Any]:
    """How often a pair's verdict survives swapping the answers; verdicts ``2k`` and ``2k+1`` are
    one pair in both orders. Pairs with a failure in either order are left out.

    ``consistency_rate``: on the judge's raw verdicts. ``corrected_consistency_rate``: on the
    verdicts after the position-bias correction (``calibrate``), or None when none was applied;
    with ``question`` and two answers per question it is 1.0 by construction, since the correction
    averages both orders. ``first_position_rate``: share of decisive raw verdicts that say A.
    """
    raw = [Verdict(v.raw_verdict) if v.ok else v for v in verdicts]
    pairs = [(k, k + 1) for k in range(0, len(verdicts) - 1, 2)]
    judged = [(i, j) for i, j in pairs if verdicts[i].ok and verdicts[j].ok]

    def rate(vs: list[Verdict]) -> float | None:
        if not judged:
            return None
        return sum(combine_orders(vs[i], vs[j]) != "inconsistent" for i, j in judged) / len(judged)

    decisive = [v.raw_verdict for v in verdicts if v.ok and v.raw_verdict in ("A", "B")]
    return {
        "consistency_rate": rate(raw),
        "corrected_consistency_rate": rate(verdicts) if any(v.corrected for v in verdicts) else None,
        "first_position_rate": decisive.count("A") / len(decisive) if decisive else None,
    }


def make_judge(
    config: Any,
    *,
    precision: str = "fp32",
    batch_size: int = 8,
    cache_path: Path | None = None,
    model: Any = None,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
    rubric: Rubric | None = None,
    local_cls: Any = None,
    http_cls: Any = None,
) -> Judge:
    """Build the judge a recipe's ``JudgeConfig`` asks for (reusing an already loaded local model).

    ``rubric`` replaces the one the config names, and ``local_cls``/``http_cls`` the two backends'
    classes, for a judge that asks another question (the rubric grader of ``hippo eval --mode rubric``).
    """
    rubric = rubric or load_rubric(config.rubric)
    if config.backend == "http":
        from hippocrates.rlaif.http_judge import HTTPJudge

        return (http_cls or HTTPJudge).from_config(config, rubric=rubric, cache_path=cache_path)
    from hippocrates.rlaif.local_judge import LocalJudge

    if model is None or tokenizer is None:
        from hippocrates.models import load_model, load_tokenizer, resolve_model

        resolved = resolve_model(config.model)
        tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
        model = load_model(
            resolved, precision=precision, trust_remote_code=trust_remote_code, device=default_device()
        )
    return (local_cls or LocalJudge)(
        model,
        tokenizer,
        rubric=rubric,
        name=f"local:{config.model}",
        batch_size=batch_size,
        tie_threshold=config.tie_threshold,
        calibrate=config.calibrate,
    )
