"""Tasks as data: every benchmark is one YAML file, so adding a task needs no Python.

The built-in YAMLs live in ``hippocrates/eval/tasks``. Users add their own with
``--task-dir DIR`` (every ``*.yaml`` in it) or by naming a YAML path in ``--tasks``; a user
task with a built-in's name replaces the built-in. The schema is strict (unknown keys are
errors naming the file and line), because a typo in a protocol silently changes results.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from hippocrates.config import format_validation_error, load_yaml
from hippocrates.data.benchmarks import AnswerFormat, Columns, Format, Reader, Strict
from hippocrates.data.io import read_text
from hippocrates.errors import HippoError

BUILTIN_DIR = Path(__file__).with_name("tasks")


class HFSource(Strict):
    """The Hugging Face dataset used online when no local file is given."""

    path: str
    name: str | None = None
    data_files: dict[str, str] | None = None
    split: str = "test"
    fewshot_split: str | None = None
    format: Format | None = Field(None, description="record format on the hub (default: the task's)")
    columns: Columns | None = None
    answer_format: AnswerFormat = "auto"


class TaskSpec(Reader):
    """One evaluation task: which file, how to read it (the :class:`Reader` fields), how to phrase it."""

    task: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    title: str = ""
    file: str | None = Field(None, description="default file, relative to --data-dir")
    fewshot_files: list[str] = Field(
        default_factory=list, description="few-shot pool files looked for next to the data file"
    )
    template: Literal["options", "abstract"] = "options"
    letter_header: str = Field("", description="line(s) before the 'A. ...' options in the letter prompt")
    hf: HFSource | None = None
    source: str = Field("", exclude=True)

    def describe(self) -> str:
        return self.title or self.task


def parse_task_yaml(path: Path) -> TaskSpec:
    """Read one task YAML; any problem is one line naming the file (and line)."""
    text = read_text(path)
    raw = load_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise HippoError(f"{path}: a task file must be a YAML mapping")
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as exc:
        raise HippoError(format_validation_error(exc, str(path), text)) from None
    spec.source = str(path)
    return spec


def load_registry(task_dirs: Iterable[str | Path] = ()) -> dict[str, TaskSpec]:
    """Built-in tasks, then each user directory's YAMLs (later ones win on a name clash)."""
    registry: dict[str, TaskSpec] = {}
    for directory in [BUILTIN_DIR, *map(Path, task_dirs)]:
        if not directory.is_dir():
            raise HippoError(f"{directory}: task directory not found")
        for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
            spec = parse_task_yaml(path)
            registry[spec.task] = spec
    return registry


def resolve_tasks(names: Iterable[str], task_dirs: Iterable[str | Path] = ()) -> list[TaskSpec]:
    """Turn ``--tasks`` entries (registered names or YAML paths) into specs, in order."""
    registry = load_registry(task_dirs)
    specs: list[TaskSpec] = []
    for name in names:
        name = name.strip()
        if not name:
            continue
        if name.endswith((".yaml", ".yml")) or Path(name).is_file():
            if not Path(name).is_file():
                raise HippoError(f"{name}: task file not found")
            specs.append(parse_task_yaml(Path(name)))
        elif name in registry:
            specs.append(registry[name])
        else:
            raise HippoError(
                f"unknown task '{name}' (known: {', '.join(sorted(registry))}; "
                "or give a task YAML path, or --task-dir DIR)"
            )
    if not specs:
        raise HippoError("no tasks given (--tasks medqa,medmcqa,...)")
    seen: set[str] = set()
    for spec in specs:
        if spec.task in seen:
            raise HippoError(f"task '{spec.task}' given twice")
        seen.add(spec.task)
    return specs


def task_table(task_dirs: Iterable[str | Path] = ()) -> list[dict[str, Any]]:
    """Rows for ``hippo eval --list-tasks``."""
    return [
        {"task": s.task, "format": s.format, "file": s.file or "", "title": s.title, "source": s.source}
        for s in load_registry(task_dirs).values()
    ]
