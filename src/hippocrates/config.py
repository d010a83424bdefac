"""Recipes: YAML files validated by pydantic models.

A recipe names the base model, each stage's data mixture and hyper-parameters, the
evaluation protocol and the output directory. Unknown keys, wrong types and bad values
fail with one line that names the file, the line, the key path and the valid choices.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hippocrates.errors import HippoError

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class LoRASettings(Strict):
    """LoRA adapter settings (PEFT). ``all-linear`` targets every attention and MLP projection."""

    r: int = Field(16, gt=0, le=1024)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainSettings(Strict):
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


SourceFormat = Literal[
    "auto",
    "messages",
    "sharegpt",
    "prompt-completion",
    "alpaca",
    "qa",
    "medqa",
    "medmcqa",
    "pubmedqa",
    "usmle",
    "mc",
]


class Source(Strict):
    """One data source of a mixture: a local file (jsonl/json/txt/parquet/csv) or an HF dataset id."""

    path: str
    weight: float = Field(1.0, gt=0.0, description="relative sampling weight in the mixture")
    split: str = Field(
        "train", description="hub split; pubmedqa files: train (not the test PMIDs), test or all"
    )
    subset: str | None = None
    text_field: str = "text"
    kind: Literal["general", "evaluation", "text"] = "text"
    max_samples: int | None = Field(None, gt=0)
    streaming: bool = False
    format: SourceFormat = Field(
        "auto", description="the records' shape; auto recognises it from the fields (never from the content)"
    )
    columns: dict[str, str | int | list[str | int]] | None = Field(
        None,
        description="where fields are: for format mc {question, options, answer, id, context: your column}; "
        "for the conversation shapes {our field: your field}, e.g. {instruction: q, output: a}",
    )
    answer_format: Literal["auto", "letter", "index", "index1", "text"] = "auto"
    sample: dict[str, int] | None = Field(
        None,
        description="benchmark sources: a seeded slice {seed, start, count} of the items (e.g. train on the first "
        "1,000 of a shuffled file, evaluate on the next 1,000 with a task YAML holding the same seed)",
    )
    prompt: Literal["instruction", "hippocrates", "letter"] = Field(
        "instruction",
        description="benchmark sources: an instruction with lettered options answered '(B) text.', or the "
        "evaluation prompt (hippocrates: answered with the option text; letter: with the letter)",
    )


class CPTStage(Strict):
    """Continued pre-training on medical text with LoRA; documents packed into max_seq_len blocks."""

    enabled: bool = True
    data: list[Source] = Field(default_factory=list)
    eval_data: list[Source] = Field(default_factory=list)
    lora: LoRASettings = LoRASettings()
    train: TrainSettings = TrainSettings()


class SFTStage(Strict):
    """Instruction tuning on a weighted mixture; loss on response tokens only."""

    enabled: bool = True
    data: list[Source] = Field(default_factory=list)
    eval_data: list[Source] = Field(default_factory=list)
    template: Literal["auto", "chat", "alpaca"] = "auto"
    assistant_turns: Literal["all", "last"] = Field(
        "all", description="multi-turn conversations: loss on every assistant turn, or the last only"
    )
    packing: bool = True
    lora: LoRASettings = LoRASettings()
    train: TrainSettings = TrainSettings()


class JudgeSettings(Strict):
    """The AI judge of RLAIF: a local HF model or an OpenAI-compatible HTTP endpoint."""

    backend: Literal["local", "http"] = "local"
    model: str = "smollm2-135m"
    base_url: str | None = None
    api_key_env: str | None = Field(
        None, description="name of the env var holding the API key (never the key)"
    )
    timeout_s: float = Field(
        60.0, gt=0.0, description="http: deadline for each request, whole reply included"
    )
    max_retries: int = Field(
        4, ge=0, description="http: retries on 408/409/429/5xx, timeouts, lost connections"
    )
    concurrency: int = Field(4, gt=0)
    rubric: str | None = Field(
        None, description="path to a rubric file; default: the bundled clinician rubric"
    )
    max_tokens: int = Field(128, gt=0, description="http: reply length limit of text verdicts")
    verdict: Literal["auto", "logprobs", "text"] = Field(
        "auto",
        description="http: the verdict from log P(' A') vs log P(' B') like the local judge (logprobs), "
        "from the reply's 'Verdict: X' (text), or logprobs where the endpoint returns them, else text (auto)",
    )
    cache: str | None = Field(
        None, description="http: sqlite answer cache; default OUTPUT/judge_cache.sqlite"
    )
    tie_threshold: float = Field(
        0.02, ge=0.0, description="log-prob verdicts: |log P(A) - log P(B)| at or below is a tie"
    )
    calibrate: Literal["question", "mean", "content-free", "none"] = Field(
        "question",
        description="log-prob verdicts: subtract the judge's first-position preference before deciding "
        "(a correction; order consistency is reported on the raw verdicts)",
    )
    max_failed_share: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="the run fails when more than this share of judge calls failed in a phase "
        "(annotate, agreement); default: only when every call failed",
    )

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "backoff_s" in data:
            data = {k: v for k, v in data.items() if k != "backoff_s"}
            if "backoff_s" not in _told:
                _told.add("backoff_s")
                from hippocrates.progress import status

                status("judge.backoff_s is no longer used: the openai client backs off 0.5 s, 1 s, 2 s ... up to 8 s "
                       "and honours Retry-After; the key can be removed")  # fmt: skip
        return data

    @model_validator(mode="after")
    def _http_needs_url(self) -> JudgeSettings:
        if self.backend == "http" and not self.base_url:
            raise ValueError("backend 'http' needs base_url")
        return self


class AnnotateStage(Strict):
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
    judge: JudgeSettings = JudgeSettings()


class DPOStage(Strict):
    """Direct preference optimisation with LoRA; the reference is the base with the adapter disabled."""

    enabled: bool = True
    data: list[Source] = Field(default_factory=list, description="empty: the annotate stage's output")
    beta: float = Field(0.1, gt=0.0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    lora: LoRASettings = LoRASettings()
    train: TrainSettings = TrainSettings(learning_rate=5e-5, gradient_checkpointing=True)


class GRPORewards(Strict):
    """Weights of the verifiable rewards (each is 0..1 per completion, the length penalty -1..0)."""

    correct: float = Field(1.0, ge=0.0, description="the extracted answer is the gold option")
    format: float = Field(0.2, ge=0.0, description="the last line is a parseable 'Answer: X'")
    length: float = Field(0.0, ge=0.0, description="minus the share of max_completion_length used")
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="your reward functions by import path 'package.module:function' -> weight",
    )


class GRPOStage(Strict):
    """Reinforcement learning with verifiable rewards: GRPO on multiple-choice questions with known
    answers, with LoRA. Training questions come from the sources' train splits, never the test sets."""

    enabled: bool = False
    after: Literal["sft", "dpo"] = Field("sft", description="which stage's model GRPO starts from")
    data: list[Source] = Field(default_factory=list)
    eval_data: list[Source] = Field(
        default_factory=list,
        description="held-out questions: generative accuracy and mean reward before/after",
    )
    group_size: int = Field(4, ge=2, description="completions sampled per question (TRL's num_generations)")
    max_completion_length: int = Field(256, gt=0, description="the thinking budget, in tokens")
    temperature: float = Field(1.0, gt=0.0)
    beta: float = Field(0.0, ge=0.0, description="KL penalty towards the input model (0: none)")
    system_prompt: str | None = Field(None, description="an optional system turn before every question")
    rewards: GRPORewards = GRPORewards()
    lora: LoRASettings = LoRASettings()
    train: TrainSettings = TrainSettings(learning_rate=2e-5, batch_size=8, max_seq_len=1024)


def _non_negative_shots(shots: list[int]) -> list[int]:
    if any(k < 0 for k in shots):
        raise ValueError("shots must be >= 0")
    return shots


Shots = Annotated[list[int], AfterValidator(_non_negative_shots)]
RENAMED_PROMPTS = {"cot": "stepwise"}  # old name -> new name (old recipes keep working)
_told: set[str] = set()


def renamed_prompt(value: Any) -> Any:
    """Map a prompt's old name to its new one, saying so once per process."""
    if isinstance(value, str) and value in RENAMED_PROMPTS:
        new = RENAMED_PROMPTS[value]
        if value not in _told:
            _told.add(value)
            from hippocrates.progress import status

            status(f"prompt '{value}' is now called '{new}' (it adds a step-by-step instruction and is still "
                   "scored by log-likelihood); please update your recipe or command")  # fmt: skip
        return new
    return value


PromptName = Annotated[Literal["hippocrates", "letter", "stepwise"], BeforeValidator(renamed_prompt)]
Protocol = Literal["v0.4", "v0.3"]
EvalMode = Literal["loglik", "generate"]


class RubricJudgeSettings(JudgeSettings):
    """The grader of rubric-graded evaluation: decides met / not met for each criterion of an answer."""

    rubric: None = Field(None, description="not used: the criteria come from eval.rubric.file")
    calibrate: Literal["none"] = Field(
        "none", description="log-prob verdicts are read as they are (no position to correct)"
    )
    tie_threshold: float = Field(
        0.0,
        ge=0.0,
        description="log-prob verdicts: |log P(' Yes') - log P(' No')| at or below is undecided, "
        "which counts as a judge failure",
    )


class RubricEvalSettings(Strict):
    """Rubric-graded open-ended evaluation of the final model (``hippo eval --mode rubric``)."""

    enabled: bool = True
    file: str | None = Field(None, description="rubric set in HealthBench's record format (JSONL)")
    judge: RubricJudgeSettings = RubricJudgeSettings()
    max_new_tokens: int = Field(256, gt=0, description="the answer's token budget")
    limit: int | None = Field(None, gt=0, description="the first N examples of the file")
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="auto: the model's chat template when it has one, else the Alpaca format"
    )
    temperature: float = Field(0.0, ge=0.0, description="0: greedy answers")
    batch_size: int = Field(8, gt=0, description="answers per generate call; criteria per judge forward")

    @model_validator(mode="after")
    def _file_when_enabled(self) -> RubricEvalSettings:
        if self.enabled and not self.file:
            raise ValueError("needs file: a JSONL rubric set (or enabled: false)")
        return self


class EvalSettings(Strict):
    """Evaluation protocol: tasks, local files, shots, and the prompt strategy (loglik) or the
    generation settings (generate)."""

    enabled: bool = True
    tasks: list[str] = Field(default_factory=lambda: ["medqa", "medmcqa", "pubmedqa"])
    data: dict[str, str] = Field(default_factory=dict, description="task -> local file")
    num_fewshot: Shots = Field(default_factory=lambda: [0])
    mode: EvalMode = Field(
        "loglik",
        description="loglik: score every option by log-likelihood; generate: the model answers and its "
        "'Answer: X' is read back",
    )
    prompt: PromptName = Field("hippocrates", description="loglik prompt strategy")
    chat_template: bool | None = Field(
        None,
        description="wrap prompts in the model's chat template; unset: off for loglik, and for generate on "
        "when the model has one (else the Alpaca format)",
    )
    protocol: Protocol = Field(
        "v0.4",
        description="v0.4: lm-eval 0.4's prompt assembly and encoding; v0.3: the paper's harness exactly",
    )
    limit: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    precision: Precision = Field(
        "auto",
        description="auto: the recipe's precision, but fp32 for a model whose bf16 weights keep less than 95% "
        "of its last stage's effect on the logits (its merge record)",
    )
    max_new_tokens: int = Field(256, gt=0, description="generate: the thinking budget, new tokens per answer")
    temperature: float = Field(0.0, ge=0.0, description="generate: 0 is greedy; samples > 1 need > 0")
    samples: int = Field(1, ge=1, description="generate: answers per item; more than 1 is a majority vote")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="generate: hf (batched) or vllm (GPU, installed)"
    )

    @field_validator("samples")
    @classmethod
    def _samples_need_temperature(cls, samples: int, info: ValidationInfo) -> int:
        if samples > 1 and info.data.get("temperature") == 0:
            raise ValueError(f"{samples} samples need temperature > 0 (greedy samples would all be the same)")
        return samples

    rubric: RubricEvalSettings | None = Field(
        None, description="rubric-graded open-ended evaluation of the final model, after the tasks"
    )


class AblationSettings(Strict):
    """The stage ablation (``hippo ablate``), run by ``hippo pipeline`` after eval when enabled."""

    enabled: bool = False
    num_fewshot: int = Field(0, ge=0)
    limit: int | None = Field(None, gt=0, description="first N items per task (default eval.limit)")


class SweepSettings(Strict):
    """The prompting-strategy sweep (``hippo eval --sweep``) on the pipeline's final model."""

    enabled: bool = False
    tasks: list[str] | None = Field(None, description="default: eval.tasks")
    prompts: list[PromptName] = Field(
        default_factory=lambda: ["hippocrates", "letter", "stepwise"], min_length=1
    )
    chat_template: list[bool] = Field(default_factory=lambda: [False, True], min_length=1)
    num_fewshot: Shots = Field(default_factory=lambda: [0, 5], min_length=1)
    limit: int | None = Field(None, gt=0, description="first N items per task (default eval.limit)")
    modes: list[EvalMode] = Field(
        default_factory=lambda: ["loglik"], min_length=1, description="loglik rows, generate rows, or both"
    )
    max_new_tokens: list[Annotated[int, Field(gt=0)]] | None = Field(
        None, min_length=1, description="generate rows: the thinking budgets (default [eval.max_new_tokens])"
    )


class AnalysesSettings(Strict):
    """The paper's analyses that ``hippo pipeline`` runs before the report."""

    ablation: AblationSettings = AblationSettings()
    sweep: SweepSettings = SweepSettings()


class Stages(Strict):
    cpt: CPTStage = CPTStage()
    sft: SFTStage = SFTStage()
    annotate: AnnotateStage = AnnotateStage()
    dpo: DPOStage = DPOStage()
    grpo: GRPOStage = GRPOStage()


class Recipe(Strict):
    """A whole pipeline: base model -> CPT -> SFT -> annotate -> DPO -> eval."""

    name: str
    base_model: str
    output_dir: str
    seed: int = 42
    precision: Precision = "auto"
    merge_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="dtype of merged stage models; auto: the input model's, or fp32 when that would "
        "lose more than 1% of the adapter's weight update",
    )
    trust_remote_code: bool = False
    stages: Stages = Stages()
    eval: EvalSettings = EvalSettings()
    analyses: AnalysesSettings = AnalysesSettings()
    source_path: str | None = Field(None, exclude=True)
    _lines: dict[tuple[Any, ...], int] = PrivateAttr(default_factory=dict)

    def where(self, key: str) -> str:
        """``file:line: key`` for messages about a value of this recipe (e.g. ``stages.sft.data.0.path``)."""
        parts = tuple(int(p) if p.isdigit() else p for p in key.split("."))
        line = next(
            (self._lines[parts[:cut]] for cut in range(len(parts), 0, -1) if parts[:cut] in self._lines), None
        )
        place = self.source_path or "recipe"
        return f"{place}:{line}: {key}" if line else f"{place}: {key}"

    def stage_order(self) -> list[str]:
        """The training stages in pipeline order; GRPO sits after SFT or after DPO."""
        order = ["cpt", "sft", "annotate", "dpo"]
        order.insert(order.index(self.stages.grpo.after) + 1, "grpo")
        return order

    def enabled_stages(self) -> list[str]:
        """Stage names to run, in pipeline order."""
        out = [s for s in self.stage_order() if getattr(self.stages, s).enabled]
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (YAML says keys are unique;
    PyYAML would silently keep the last one)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' given twice (first on line {seen[key]})", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 booleans only: `yes`, `no`, `on`, `off` stay strings (PubMedQA's answers are "yes"/"no"/"maybe")
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "tTfF":
    _UniqueKeyLoader.yaml_implicit_resolvers.setdefault(_first, []).insert(
        0, ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"))
    )


def load_yaml(text: str, path: str) -> Any:
    """A YAML document (recipes, task files); any syntax problem or repeated key is one line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise HippoError(f"{path}{line}: invalid YAML: {problem}") from None


def parse_recipe(text: str, path: str = "<recipe>") -> Recipe:
    """Validate recipe YAML text; raise HippoError with a one-line message on any problem."""
    raw = load_yaml(text, path)
    if not isinstance(raw, dict):
        raise HippoError(f"{path}: a recipe must be a YAML mapping of keys, got {type(raw).__name__}")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise HippoError(format_validation_error(exc, path, text)) from None
    recipe.source_path = path
    recipe._lines = _key_lines(text)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file."""
    from hippocrates.data.io import read_text

    p = Path(path)
    if not p.is_file():
        raise HippoError(f"{p}: recipe file not found")
    return parse_recipe(read_text(p), str(p))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe (defaults filled in), for manifests and change detection."""
    return recipe.model_dump(mode="json")
