"""Recipes: YAML files validated by pydantic models.

A recipe names the base model, each stage's data mixture and hyper-parameters, the
evaluation protocol and the output directory. Unknown keys, wrong types and bad values
fail with one line that names the file, the line, the key path and the valid choices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from hippocrates.errors import HippoError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
STAGES = ("cpt", "sft", "annotate", "dpo", "eval")


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class LoraConfig(Strict):
    """LoRA adapter settings (PEFT). ``all-linear`` targets every attention and MLP projection."""

    r: int = Field(16, gt=0, le=1024)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainConfig(Strict):
    """Optimisation settings shared by CPT, SFT and DPO (handed to the HF/TRL trainers)."""

    learning_rate: float = Field(2e-4, gt=0.0, le=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int = Field(-1, ge=-1, description="-1: run for `epochs`")
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_seq_len: int = Field(1024, ge=16)
    gradient_checkpointing: bool = False
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(200, gt=0)
    save_total_limit: int = Field(2, gt=0)


class Source(Strict):
    """One data source of a mixture: a local file (jsonl/json/txt/parquet/csv) or an HF dataset id."""

    path: str
    weight: float = Field(1.0, gt=0.0, description="relative sampling weight in the mixture")
    split: str = "train"
    subset: str | None = None
    text_field: str = "text"
    kind: Literal["general", "evaluation", "text"] = "text"
    max_samples: int | None = Field(None, gt=0)
    streaming: bool = False


class CPTConfig(Strict):
    """Continued pre-training on medical text with LoRA; documents packed into max_seq_len blocks."""

    enabled: bool = True
    data: list[Source] = Field(default_factory=list)
    eval_data: list[Source] = Field(default_factory=list)
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()


class SFTConfig(Strict):
    """Instruction tuning on a weighted mixture; loss on response tokens only."""

    enabled: bool = True
    data: list[Source] = Field(default_factory=list)
    eval_data: list[Source] = Field(default_factory=list)
    template: Literal["auto", "chat", "alpaca"] = "auto"
    packing: bool = True
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()


class JudgeConfig(Strict):
    """The AI judge of RLAIF: a local HF model or an OpenAI-compatible HTTP endpoint."""

    backend: Literal["local", "http"] = "local"
    model: str = "smollm2-135m"
    base_url: str | None = None
    api_key_env: str | None = Field(
        None, description="name of the env var holding the API key (never the key)"
    )
    timeout_s: float = Field(60.0, gt=0.0)
    max_retries: int = Field(4, ge=0)
    concurrency: int = Field(4, gt=0)
    rubric: str | None = Field(
        None, description="path to a rubric file; default: the bundled clinician rubric"
    )
    backoff_s: float = Field(1.0, ge=0.0, description="http: first retry delay, doubled on each retry")
    max_tokens: int = Field(128, gt=0, description="http: reply length limit")
    cache: str | None = Field(
        None, description="http: sqlite answer cache; default OUTPUT/judge_cache.sqlite"
    )
    tie_threshold: float = Field(
        0.02, ge=0.0, description="local: |log P(A) - log P(B)| at or below is a tie"
    )
    calibrate: Literal["question", "mean", "content-free", "none"] = Field(
        "question", description="local: remove the judge's first-position preference before deciding"
    )

    @model_validator(mode="after")
    def _http_needs_url(self) -> JudgeConfig:
        if self.backend == "http" and not self.base_url:
            raise ValueError("backend 'http' needs base_url")
        return self


class AnnotateConfig(Strict):
    """RLAIF: sample candidate answers from the SFT model and let the judge pick the better one."""

    enabled: bool = True
    prompts: str = "data/demo/preferences/patient_questions.jsonl"
    prompt_field: str = "prompt"
    max_prompts: int | None = Field(None, gt=0)
    n_candidates: int = Field(2, ge=2)
    temperature: float = Field(0.8, gt=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(8, gt=0, description="prompts per generate call; items per local-judge forward")
    judge: JudgeConfig = JudgeConfig()


class DPOConfig(Strict):
    """Direct preference optimisation with LoRA; the reference is the base with the adapter disabled."""

    enabled: bool = True
    data: list[Source] = Field(default_factory=list, description="empty: the annotate stage's output")
    beta: float = Field(0.1, gt=0.0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig(learning_rate=5e-5, gradient_checkpointing=True)


def _non_negative_shots(shots: list[int]) -> list[int]:
    if any(k < 0 for k in shots):
        raise ValueError("shots must be >= 0")
    return shots


Shots = Annotated[list[int], AfterValidator(_non_negative_shots)]
PromptName = Literal["hippocrates", "letter", "cot"]


class EvalConfig(Strict):
    """Evaluation protocol: tasks, local files, shots and prompt strategy."""

    enabled: bool = True
    tasks: list[str] = Field(default_factory=lambda: ["medqa", "medmcqa", "pubmedqa"])
    data: dict[str, str] = Field(default_factory=dict, description="task -> local file")
    num_fewshot: Shots = Field(default_factory=lambda: [0])
    prompt: PromptName = "hippocrates"
    chat_template: bool = False
    limit: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)


class AblationConfig(Strict):
    """The stage ablation (``hippo ablate``), run by ``hippo pipeline`` after eval when enabled."""

    enabled: bool = False
    num_fewshot: int = Field(0, ge=0)
    limit: int | None = Field(None, gt=0, description="first N items per task (default eval.limit)")


class SweepConfig(Strict):
    """The prompting-strategy sweep (``hippo eval --sweep``) on the pipeline's final model."""

    enabled: bool = False
    tasks: list[str] | None = Field(None, description="default: eval.tasks")
    prompts: list[PromptName] = Field(default_factory=lambda: ["hippocrates", "letter", "cot"], min_length=1)
    chat_template: list[bool] = Field(default_factory=lambda: [False, True], min_length=1)
    num_fewshot: Shots = Field(default_factory=lambda: [0, 5], min_length=1)
    limit: int | None = Field(None, gt=0, description="first N items per task (default eval.limit)")


class AnalysesConfig(Strict):
    """The paper's analyses that ``hippo pipeline`` runs before the report."""

    ablation: AblationConfig = AblationConfig()
    sweep: SweepConfig = SweepConfig()


class StagesConfig(Strict):
    cpt: CPTConfig = CPTConfig()
    sft: SFTConfig = SFTConfig()
    annotate: AnnotateConfig = AnnotateConfig()
    dpo: DPOConfig = DPOConfig()


class Recipe(Strict):
    """A whole pipeline: base model -> CPT -> SFT -> annotate -> DPO -> eval."""

    name: str
    base_model: str
    output_dir: str
    seed: int = 42
    precision: Precision = "auto"
    trust_remote_code: bool = False
    stages: StagesConfig = StagesConfig()
    eval: EvalConfig = EvalConfig()
    analyses: AnalysesConfig = AnalysesConfig()
    source_path: str | None = Field(None, exclude=True)

    def enabled_stages(self) -> list[str]:
        """Stage names to run, in pipeline order."""
        out = [s for s in ("cpt", "sft", "annotate", "dpo") if getattr(self.stages, s).enabled]
        if self.eval.enabled:
            out.append("eval")
        out += [
            name
            for name, on in (("ablate", self.analyses.ablation), ("sweep", self.analyses.sweep))
            if on.enabled
        ]
        return out


def _key_lines(text: str) -> dict[tuple[Any, ...], int]:
    """Map every key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple[Any, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[Any, ...]) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, key.value)
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _describe(error: dict[str, Any]) -> str:
    msg = error["msg"]
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"invalid value {error.get('input')!r}; choose from {expected}"
    if error["type"] == "missing":
        return "required key is missing"
    return (
        f"{msg} (got {error.get('input')!r})"
        if "input" in error and not isinstance(error["input"], dict)
        else msg
    )


def format_validation_error(exc: ValidationError, path: str, text: str) -> str:
    """One line: ``file:line: key.path: problem`` for the first error (and a count of the rest)."""
    lines = _key_lines(text)
    errors = exc.errors()
    first = errors[0]
    loc = tuple(part for part in first["loc"] if not (isinstance(part, str) and part.startswith("function-")))
    key = ".".join(str(p) for p in loc) or "(top level)"
    line = None
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            line = lines[loc[:cut]]
            break
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    where = f"{path}:{line}" if line else path
    return f"{where}: {key}: {_describe(first)}{more}"


def parse_recipe(text: str, path: str = "<recipe>") -> Recipe:
    """Validate recipe YAML text; raise HippoError with a one-line message on any problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise HippoError(f"{path}{line}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise HippoError(f"{path}: a recipe must be a YAML mapping of keys, got {type(raw).__name__}")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise HippoError(format_validation_error(exc, path, text)) from None
    recipe.source_path = path
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file."""
    p = Path(path)
    if not p.is_file():
        raise HippoError(f"{p}: recipe file not found")
    return parse_recipe(p.read_text(encoding="utf-8"), str(p))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe (defaults filled in), for manifests and change detection."""
    return recipe.model_dump(mode="json")
