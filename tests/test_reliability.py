"""What the project promises under faults and bad input (docs/reliability.md), tried for real.

Faults: a process killed with SIGKILL while it writes a checkpoint, two runs on one output folder,
a full disk (a small tmpfs), a read-only folder (a read-only tmpfs), an output path that is a file.
Bad input: one case per way a user can get a file, a recipe key or a flag wrong, across every
subcommand. Each must end with exit code 2, one error line naming the file (and line), key or path,
no traceback, and the output folder as it was (nothing half-written that looks complete).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import DEMO
from hippocrates.cli import main
from test_stages_helpers import make_recipe, write_jsonl

BENCH = DEMO / "benchmarks"


# ------------------------------------------------------------------------------------------ helpers


def errors(stderr: str, command: str) -> list[str]:
    """The error lines of a run (status lines start with "[hippo]" and are progress, not errors)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith(f"hippo {command}: error:")]


def fails(capsys, args: list[str], *fragments: str, only_line: bool = True) -> str:
    """Run ``hippo ARGS`` in-process: exit 2, exactly one error line holding every fragment."""
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage errors exit from inside main
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    lines = errors(err, args[0])
    assert len(lines) == 1, err[-3000:]
    if only_line:
        assert len(err.strip().splitlines()) == 1, err  # checked before anything ran: nothing else said
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def hippo(*args: str, cwd: Path | None = None, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "hippocrates.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=environment, timeout=600, **kw)  # fmt: skip


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@contextlib.contextmanager
def mounted(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs at ``where`` (root only; the test skips where the machine does not allow it)."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def recipe_with(tmp_path: Path, model: Path, **overrides) -> Path:
    return make_recipe(tmp_path, model, **overrides)


# ------------------------------------------------------------------------------------------- faults

KILL_MID_CHECKPOINT = """
import os, signal, sys
from pathlib import Path
import transformers
from hippocrates.config import load_recipe
from hippocrates.stages.sft import run_sft

real = transformers.Trainer._save_optimizer_and_scheduler
def torn(self, output_dir):
    if output_dir.endswith("checkpoint-4"):  # the adapter of checkpoint-4 is on disk, the rest is not
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, output_dir)
transformers.Trainer._save_optimizer_and_scheduler = torn
recipe = load_recipe(sys.argv[1])
run_sft(recipe, sys.argv[2], Path(recipe.output_dir) / "sft", report_to=[])
"""


def test_a_checkpoint_torn_by_sigkill_is_skipped_and_resume_takes_the_last_complete_one(
    tmp_path, tiny_llama_dir
):
    from safetensors.torch import load_file

    train = {
        "stages.sft.train.max_steps": 6,
        "stages.sft.train.save_steps": 2,
        "stages.sft.lora.dropout": 0.1,
    }
    straight = recipe_with(tmp_path / "a", tiny_llama_dir, **train)
    assert hippo("sft", str(straight), "--model", str(tiny_llama_dir), "--report-to", "none").returncode == 0

    recipe = recipe_with(tmp_path / "b", tiny_llama_dir, **train)
    killed = subprocess.run([sys.executable, "-c", KILL_MID_CHECKPOINT, str(recipe), str(tiny_llama_dir)],
                            capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    work = tmp_path / "b" / "out" / ".sft.work"
    assert (work / "checkpoint-4" / "adapter_model.safetensors").is_file(), "torn: it holds only the adapter"
    assert not (work / "checkpoint-4" / "trainer_state.json").exists()

    done = hippo("sft", str(recipe), "--model", str(tiny_llama_dir), "--resume", "--report-to", "none")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checkpoint-4: incomplete checkpoint" in done.stderr
    assert f"resuming from {work / 'checkpoint-2'}" in done.stderr
    a = load_file(tmp_path / "a" / "out" / "sft" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "out" / "sft" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "resumed to the same adapter"


def test_a_second_run_on_the_same_folder_is_refused_and_a_dead_ones_lock_is_taken_over(
    tmp_path, tiny_llama_dir
):
    recipe = recipe_with(
        tmp_path, tiny_llama_dir, **{"stages.sft.train.max_steps": 2000, "stages.sft.train.save_steps": 5000}
    )
    lock = tmp_path / "out" / ".hippo.lock"
    first = subprocess.Popen([sys.executable, "-m", "hippocrates.cli", "sft", str(recipe), "--model", str(tiny_llama_dir),
                              "--report-to", "none"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not lock.is_file() or not lock.read_text().strip():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        second = hippo("sft", str(recipe), "--model", str(tiny_llama_dir), "--report-to", "none")
        assert second.returncode == 2
        (line,) = errors(second.stderr, "sft")
        assert f"in use by another run, pid {first.pid}" in line and str(tmp_path / "out") in line
        also = hippo("pipeline", str(recipe), "--report-to", "none")
        assert also.returncode == 2 and f"pid {first.pid}" in errors(also.stderr, "pipeline")[0]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    taken = hippo("cpt", str(recipe_with(tmp_path, tiny_llama_dir, **{"stages.cpt.train.max_steps": 1})),
                  "--report-to", "none")  # fmt: skip
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert (
        f"the previous run, pid {first.pid}" in taken.stderr
        and "ended without finishing; taking over" in taken.stderr
    )
    assert not lock.exists(), "a finished run removes its lock"


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, tiny_llama_dir):
    with mounted(tmp_path / "small", "size=3m") as disk:
        recipe = recipe_with(tmp_path, tiny_llama_dir, output_dir=str(disk / "out"))
        done = hippo("sft", str(recipe), "--model", str(tiny_llama_dir), "--report-to", "none")
        assert done.returncode == 2
        (line,) = errors(done.stderr, "sft")
        assert str(disk / "out") in line and ("no space left" in line or "not enough disk space" in line)
        assert not (disk / "out" / "sft").exists() and not list((disk / "out").glob(".sft.tmp-*"))


def test_read_only_outputs_fail_before_the_work(tmp_path, tiny_llama_dir, tiny_run):
    with mounted(tmp_path / "ro", "ro,size=1m") as ro:
        recipe = recipe_with(tmp_path, tiny_llama_dir)
        for args, command in (
            (["sft", str(recipe), "--model", str(tiny_llama_dir), "--output", str(ro / "sft")], "sft"),
            (
                [
                    "eval",
                    "--model",
                    str(tiny_llama_dir),
                    "--tasks",
                    "medqa",
                    "--data-dir",
                    str(BENCH),
                    "--output",
                    str(ro / "eval"),
                ],
                "eval",
            ),  # fmt: skip
            (["report", str(tiny_run), "--output", str(ro / "report")], "report"),
            (
                [
                    "eval",
                    "--sweep",
                    "--model",
                    str(tiny_llama_dir),
                    "--tasks",
                    "medqa",
                    "--data-dir",
                    str(BENCH),
                    "--output",
                    str(ro / "sweep"),
                ],
                "eval",
            ),  # fmt: skip
        ):
            done = hippo(*args)
            assert done.returncode == 2, done.stderr[-2000:]
            (line,) = errors(done.stderr, command)
            assert "read-only file system" in line and str(ro) in line
            assert "scoring" not in done.stderr and "loading" not in done.stderr, "it stopped before any work"


def test_an_output_path_that_is_a_file(tmp_path, tiny_llama_dir, capsys):
    (tmp_path / "taken").write_text("not a folder")
    recipe = recipe_with(tmp_path, tiny_llama_dir, output_dir=str(tmp_path / "taken" / "out"))
    fails(capsys, ["pipeline", str(recipe)], str(tmp_path / "taken"), "is a file")
    fails(capsys, ["eval", "--model", str(tiny_llama_dir), "--tasks", "medqa", "--data-dir", str(BENCH),
                   "--output", str(tmp_path / "taken")], "is a file", only_line=False)  # fmt: skip
    assert (tmp_path / "taken").read_text() == "not a folder"


# --------------------------------------------------------------------------------------- bad input


@pytest.fixture
def recipe(tmp_path, tiny_llama_dir) -> Path:
    return recipe_with(tmp_path, tiny_llama_dir)


def edit(recipe: Path, change) -> Path:
    data = yaml.safe_load(recipe.read_text())
    change(data)
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    return recipe


BAD_BYTES = b"\xff\xfe\x80"


def test_non_utf8_bytes_name_the_file_line_and_offset(tmp_path, recipe, tiny_llama_dir, capsys):
    raw = recipe.read_bytes()
    bad_recipe = tmp_path / "bad.yaml"
    bad_recipe.write_bytes(raw.replace(b"name: test", b"name: te" + BAD_BYTES + b"st"))
    fails(capsys, ["pipeline", str(bad_recipe)], f"{bad_recipe}:1: not UTF-8 text (byte 0xff at offset 8)")
    data = tmp_path / "data" / "general.jsonl"
    data.write_bytes(data.read_bytes() + b'{"instruction": "a", "output": "b' + BAD_BYTES + b'"}\n')
    fails(
        capsys, ["sft", str(recipe), "--model", str(tiny_llama_dir)], f"{data}:17: not UTF-8 text (byte 0xff"
    )
    csv = tmp_path / "train.csv"
    csv.write_bytes(b"instruction,output\nq,a\nq2," + BAD_BYTES + b"\n")
    edit(recipe, lambda d: d["stages"]["sft"]["data"].__setitem__(0, {"path": str(csv)}))
    fails(capsys, ["sft", str(recipe), "--model", str(tiny_llama_dir)], f"{csv}:3: not UTF-8 text")
    evalfile = tmp_path / "test.jsonl"
    evalfile.write_bytes(
        (BENCH / "medqa" / "US_4_options_test.jsonl").read_bytes()[:2000].rsplit(b"\n", 1)[0]
        + b"\n"
        + BAD_BYTES
        + b"\n"
    )
    fails(capsys, ["eval", "--model", str(tiny_llama_dir), "--tasks", "medqa", "--data", f"medqa={evalfile}"],
          f"{evalfile}:", "not UTF-8 text")  # fmt: skip
    fails(capsys, ["data", "stats", str(evalfile), "--words"], f"{evalfile}:", "not UTF-8 text")
    manifest = tmp_path / "out" / "cpt" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(b'{"stage": "cpt", ' + BAD_BYTES + b"}")
    fails(capsys, ["cpt", str(recipe)], f"{manifest}:1: not UTF-8 text", only_line=False)


def test_values_that_used_to_crash(tmp_path, recipe, tiny_llama_dir, capsys):
    mcq = {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": "B"}
    bad = write_jsonl(tmp_path / "mcq.jsonl", [mcq])
    edit(
        recipe, lambda d: d["stages"]["sft"]["data"].__setitem__(0, {"path": str(bad), "kind": "evaluation"})
    )
    fails(
        capsys,
        ["sft", str(recipe), "--model", str(tiny_llama_dir)],
        f"{bad}:1: 'cop' must be an integer 1..4",
        only_line=False,  # the record is also reported as left out
    )
    fails(capsys, ["data", "check", str(recipe), "--words"], "'cop' must be an integer 1..4", only_line=False)
    hf = write_jsonl(tmp_path / "hf.jsonl", [{"sent1": "Q?", "ending0": "a", "ending1": "b", "label": 7}])
    edit(recipe, lambda d: d["stages"]["sft"]["data"].__setitem__(0, {"path": str(hf)}))
    fails(
        capsys,
        ["sft", str(recipe), "--model", str(tiny_llama_dir)],
        f"{hf}:1: 'label' must be an option index 0..1",
        only_line=False,
    )
    many = write_jsonl(tmp_path / "many.jsonl", [{"question": f"Q{i}?", "options": [f"o{k}" for k in range(30)],
                                                  "answer": 0} for i in range(3)])  # fmt: skip
    fails(capsys, ["eval", "--model", str(tiny_llama_dir), "--tasks", "mc", "--data", f"mc={many}"],
          "no usable items", only_line=False)  # fmt: skip
    short = recipe_with(tmp_path / "short", tiny_llama_dir, **{"stages.dpo.train.max_seq_len": 16})
    fails(capsys, ["dpo", str(short), "--model", str(tiny_llama_dir)], "stages.dpo.train.max_seq_len", "no room",
          only_line=False)  # fmt: skip
    assert (
        not (tmp_path / "short" / "out" / "dpo").exists()
        and not (tmp_path / "short" / "out" / ".dpo.work").exists()
    )


RECIPE_CASES = [
    (
        "name: a\nname: b\nbase_model: x\noutput_dir: o\n",
        ":2: invalid YAML: key 'name' given twice (first on line 1)",
    ),
    ("name: a\nbase_model: x\noutput_dir: o\nstages:\n  sft:\n    lora: {r: -1}\n", ":6: stages.sft.lora.r"),
    ("name: a\nbase_model: x\noutput_dir: o\nstagez: {}\n", ":4: stagez: unknown key"),
    ("name: a\nbase_model: x\noutput_dir: o\nstages: {cpt: {train: {learning_rate: -1}}}\n", "learning_rate"),
    ("- just\n- a list\n", "a recipe must be a YAML mapping"),
    ("name: a\nbase_model: x\noutput_dir: [unclosed\n", "invalid YAML"),
    (
        "name: a\nbase_model: no-such-alias\noutput_dir: o\n",
        ":2: base_model: unknown model alias 'no-such-alias'",
    ),
    ("name: a\nbase_model: x\noutput_dir: o\neval: {prompt: fancy}\n", "eval.prompt: invalid value 'fancy'"),
    (
        "name: a\nbase_model: x\noutput_dir: o\nstages: {annotate: {judge: {backend: http}}}\n",
        "needs base_url",
    ),
]


@pytest.mark.parametrize(("text", "fragment"), RECIPE_CASES)
def test_recipe_mistakes_are_one_line(tmp_path, capsys, text, fragment):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    for command in ("pipeline", "sft", "ablate", "annotate"):
        line = fails(capsys, [command, str(path)], fragment)
        assert str(path) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"], "nothing written"


def test_recipe_files_that_cannot_be_read(tmp_path, capsys):
    fails(capsys, ["pipeline", str(tmp_path / "none.yaml")], "none.yaml: recipe file not found")
    (tmp_path / "dir.yaml").mkdir()
    fails(capsys, ["pipeline", str(tmp_path / "dir.yaml")], "dir.yaml")


def test_stage_input_mistakes(tmp_path, recipe, tiny_llama_dir, capsys):
    data = tmp_path / "data"
    model = ["--model", str(tiny_llama_dir)]
    gone = edit(
        recipe_with(tmp_path / "g", tiny_llama_dir),
        lambda d: d["stages"]["sft"]["data"][0].update(path=str(tmp_path / "gone.jsonl")),
    )
    fails(
        capsys,
        ["sft", str(gone), *model],
        "recipe.yaml:",
        "stages.sft.data.0.path",
        "gone.jsonl: data file not found",
    )
    fails(capsys, ["pipeline", str(gone)], "stages.sft.data.0.path", "data file not found")
    (data / "general.jsonl").write_text('{"instruction": "a", "output": "b"}\n[1, 2]\n')
    fails(capsys, ["sft", str(recipe), *model], "general.jsonl:2: expected a JSON object, got list")
    write_jsonl(data / "general.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    fails(capsys, ["sft", str(recipe), *model], "general.jsonl:1: messages[0].role 'robot'")
    write_jsonl(data / "general.jsonl", [{"instruction": "Q", "output": "A"}])
    write_jsonl(data / "cpt.jsonl", [{"body": "x"}])
    fails(capsys, ["cpt", str(recipe)], "cpt.jsonl:1: missing field 'text'")
    write_jsonl(data / "prefs.jsonl", [{"prompt": "p", "chosen": "c"}])
    fails(capsys, ["dpo", str(recipe), *model], "prefs.jsonl:1", "'rejected'")
    no_prefs = recipe_with(tmp_path / "np", tiny_llama_dir, **{"stages.dpo.data": []})
    fails(capsys, ["dpo", str(no_prefs), *model], "preferences.jsonl", "annotate")
    assert files_under(tmp_path / "out") == [], "nothing written"


def test_annotate_mistakes(tmp_path, tiny_llama_dir, capsys):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"id": "1", "prompt": "a?"}, {"id": "1", "prompt": "b?"}])
    judge = {"backend": "local", "model": str(tiny_llama_dir)}
    dup = recipe_with(
        tmp_path / "d", tiny_llama_dir, **{"stages.annotate": {"prompts": str(questions), "judge": judge}}
    )
    fails(capsys, ["annotate", str(dup)], "q.jsonl:2: duplicate id '1'")
    gone = recipe_with(
        tmp_path / "g",
        tiny_llama_dir,
        **{"stages.annotate": {"prompts": str(tmp_path / "nope.jsonl"), "judge": judge}},
    )
    fails(capsys, ["annotate", str(gone)], "stages.annotate.prompts", "nope.jsonl: file not found")
    rubric = recipe_with(tmp_path / "r", tiny_llama_dir, **{"stages.annotate": {
        "prompts": str(DEMO / "preferences" / "patient_questions.jsonl"), "judge": {**judge, "rubric": str(tmp_path / "rubric.md")}}})  # fmt: skip
    fails(capsys, ["annotate", str(rubric)], "stages.annotate.judge", "rubric.md: rubric file not found")
    key = recipe_with(tmp_path / "k", tiny_llama_dir, **{"stages.annotate": {
        "prompts": str(DEMO / "preferences" / "patient_questions.jsonl"),
        "judge": {"backend": "http", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "HIPPO_NO_SUCH_KEY"}}})  # fmt: skip
    fails(capsys, ["annotate", str(key)], "HIPPO_NO_SUCH_KEY is not set")
    fails(
        capsys,
        ["annotate", str(dup), "--agreement", str(tmp_path / "labels.jsonl")],
        "labels.jsonl: file not found",
    )


def test_eval_mistakes(tmp_path, tiny_llama_dir, capsys):
    base = ["eval", "--model", str(tiny_llama_dir)]
    fails(capsys, [*base, "--tasks", "nope"], "unknown task 'nope'")
    fails(
        capsys,
        [*base, "--tasks", "medqa", "--data-dir", str(BENCH), "--num-fewshot", "13"],
        "larger than its few-shot pool",
    )
    fails(
        capsys,
        [*base, "--tasks", "medqa", "--data", f"medqa={tmp_path / 'x.jsonl'}"],
        "x.jsonl: file not found",
    )
    fails(capsys, [*base, "--tasks", "medqa", "--limit", "0"], "--limit must be > 0")
    fails(capsys, [*base, "--tasks", "medqa", "--data-dir", str(BENCH), "--protocol", "v0.3", "--chat-template"],
          "no chat templates")  # fmt: skip
    fails(capsys, [*base, "--tasks", "medqa", "--data-dir", str(BENCH), "--protocol", "v0.3", "--export-lm-eval",
                   str(tmp_path / "lm")], "cannot encode as v0.3 did")  # fmt: skip
    fails(capsys, [*base, "--prompt", "fancy"], "invalid choice: 'fancy'")
    task = tmp_path / "quiz.yaml"
    task.write_text("task: quiz\nformat: mc\ncolour: red\n")
    fails(capsys, [*base, "--tasks", str(task)], f"{task}:3: colour: unknown key")
    task.write_text("task: quiz\nformat: mc\nformat: medqa\n")
    fails(capsys, [*base, "--tasks", str(task)], f"{task}:3: invalid YAML: key 'format' given twice")
    task.write_text("task: quiz\nformat: mc\ncolumns: {question: q, options: opts, answer: ans}\n")
    quiz = write_jsonl(tmp_path / "quiz.jsonl", [{"q": "Q?", "opts": ["a", "b"], "answer": "A"}])
    fails(capsys, [*base, "--tasks", str(task), "--data", f"quiz={quiz}"],
          "column 'ans' (answer) is not in the file (its columns: q, opts, answer)")  # fmt: skip


def test_analysis_report_data_and_model_mistakes(tmp_path, recipe, capsys):
    fails(capsys, ["ablate", str(recipe), "--variants", "cpt,bogus"], "unknown variant(s) bogus")
    fails(capsys, ["ablate", str(recipe), "--shots", "-1"], "--shots must be >= 0")
    fails(capsys, ["report", str(tmp_path / "norun")], "norun: run directory not found")
    fails(capsys, ["report", str(tmp_path), "--bins", "0"], "--bins must be >= 1")
    fails(
        capsys, ["data", "stats", str(tmp_path / "none.jsonl"), "--words"], "none.jsonl: data file not found"
    )
    missing_eval = edit(
        recipe, lambda d: d.__setitem__("eval", {"data": {"medqa": str(tmp_path / "gone.jsonl")}})
    )
    fails(
        capsys, ["data", "check", str(missing_eval), "--words"], "gone.jsonl: file not found", only_line=False
    )
    fails(capsys, ["models", "no-such-alias"], "unknown model alias 'no-such-alias'")
    (tmp_path / "empty-model").mkdir()
    fails(capsys, ["models", str(tmp_path / "empty-model")], "no config.json")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    fails(capsys, ["models", str(tmp_path / "broken.gguf")], "broken.gguf")
    fails(capsys, ["pipeline", str(recipe), "--from", "nowhere"], "invalid choice: 'nowhere'")


def test_a_failed_stage_leaves_no_checkpoint_folder(tmp_path, recipe, capsys):
    fails(capsys, ["sft", str(recipe), "--model", str(tmp_path / "no-model")], "no-model")
    assert not (tmp_path / "out" / ".sft.work").exists() and not (tmp_path / "out" / "sft").exists()


def test_work_folder_of_an_explicit_output_sits_beside_it(tmp_path, recipe, tiny_llama_dir):
    from hippocrates.stages.run import work_dir_for

    assert work_dir_for(tmp_path / "elsewhere" / "mine") == tmp_path / "elsewhere" / ".mine.work"


def test_duplicate_items_are_scored_once_and_never_their_own_exemplar(tmp_path, tiny_llama_dir):
    from hippocrates.eval.runner import evaluate

    rows = [json.loads(x) for x in (BENCH / "medqa" / "US_4_options_test.jsonl").read_text().splitlines()[:6]]
    twin = {
        **rows[0],
        "question": rows[0]["question"].upper() + "  ",
    }  # same question, other spacing and case
    path = write_jsonl(tmp_path / "test.jsonl", [*rows, rows[1], twin])
    res = evaluate(
        str(tiny_llama_dir), ["medqa"], data={"medqa": str(path)}, num_fewshot=3, output_dir=tmp_path / "o"
    )
    task = res["tasks"]["medqa"]
    assert task["n"] == 6 and task["duplicates"] == 2
    samples = [json.loads(x) for x in (tmp_path / "o" / "samples_medqa.jsonl").read_text().splitlines()]
    assert len({s["id"] for s in samples}) == 6
    write_jsonl(
        tmp_path / "US_4_options_train.jsonl",
        [*rows[2:], *({**r, "question": r["question"] + " (train)"} for r in rows)],
    )
    (tmp_path / "US_4_options_test.jsonl").write_text(path.read_text())
    res = evaluate(str(tiny_llama_dir), ["medqa"], data={"medqa": str(tmp_path / "US_4_options_test.jsonl")},
                   num_fewshot=3, output_dir=tmp_path / "o2")  # fmt: skip
    assert res["tasks"]["medqa"]["fewshot_pool_overlap_removed"] == 4  # the pool's copies of evaluation items
    for s in (json.loads(x) for x in (tmp_path / "o2" / "samples_medqa.jsonl").read_text().splitlines()):
        shots = s["prompt"].split("\n\n")[:-1]
        assert len(shots) == 3 and all("(train)" in shot for shot in shots), (
            "no exemplar is an evaluation item"
        )
