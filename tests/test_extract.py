"""Answer extraction on adversarial responses (shared by generative evaluation and the GRPO reward)."""

from __future__ import annotations

import pytest

from hippocrates.eval.extract import extract

OPTIONS = ["Iron deficiency", "Vitamin B12 deficiency", "Thalassemia trait", "Anemia of chronic disease"]


@pytest.mark.parametrize(
    ("response", "index", "rule"),
    [
        ("The MCV is low and ferritin is low.\nAnswer: A", 0, "answer-line"),
        ("Reasoning...\nAnswer: (C)", 2, "answer-line"),
        ("reasoning\nanswer: c", 2, "answer-line"),
        ("**Final answer:** B.", 1, "answer-line"),
        ("Answer: D, because ferritin is high", 3, "answer-line"),
        ("The answer is C since the electrophoresis shows HbA2 raised.", 2, "answer-line"),
        ("Answer: Thalassemia trait", 2, "answer-line"),
        ("Answer: A\nWait, reconsidering.\nAnswer: B", 1, "answer-line"),  # the last answer line counts
        ("Low MCV.\nThe correct answer is:\nC. Thalassemia trait", 2, "answer-line"),  # a lead-in line
        ("**Final answer:**\n\n(B)", 1, "answer-line"),
        ("Answer:\nD, because ferritin is high", 3, "answer-line"),
        ("A. Iron deficiency\nB. Vitamin B12 deficiency\n\nThe correct answer is: C.", 2, "answer-line"),
        (
            "D. Anemia of chronic disease\n\nThe correct answer is: D. Anemia of chronic disease",
            3,
            "answer-line",
        ),
        (
            "C. Thalassaemia minor, given the Mentzer index",
            2,
            "option-line",
        ),  # the letter, though the text differs
        ("(B) B12 deficiency", 1, "option-line"),
        ("Answer: C (Thalassemia trait)", 2, "answer-line"),  # the letter and its text agree
        (
            "B. Vitamin B12 deficiency\n\nThe correct answer is:",
            1,
            "option-line",
        ),  # an empty lead-in states nothing
        ("C", 2, "lone-letter"),
        ("(d).", 3, "lone-letter"),
        ("It is most likely thalassemia trait given the Mentzer index.", 2, "option-text"),
        ("Iron deficiency anemia fits the low ferritin best.", 0, "option-text"),
    ],
)
def test_parsed(response, index, rule):
    got = extract(response, OPTIONS)
    assert (got.index, got.rule) == (index, rule), got


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ("Answer: B or C", "two letters"),
        ("Answer: F", "letter F is not one of the options A-D"),
        ("", "empty response"),
        ("I am not sure about this one.", "no answer line"),
        ("Either iron deficiency or thalassemia trait.", "several options"),
        ("Answer: none of these", "names no option"),
        ("E", "not one of the options"),
        ("Let me think.\nThe answer is:", "no answer line, letter or option text found"),
        ("C. Iron deficiency", "letter C with the text of option A"),  # the letter and the text disagree
        ("Reasoning.\nAnswer: B. Anemia of chronic disease", "letter B with the text of option D"),
        ("A. Iron deficiency\nB. Vitamin B12 deficiency\nC. Thalassemia trait", "several options"),  # a list
        ("A. Iron\n\nQuestion: Which next?\nA. Iron\nB. Folate", "several options"),  # a new question follows
        ("The answer is:\nunclear from the data", "names no option"),
    ],
)
def test_unparsed(response, reason):
    got = extract(response, OPTIONS)
    assert got.index is None and reason in got.reason, got


def test_fixed_answer_words():
    words = ["yes", "no", "maybe"]
    assert extract("The trial was underpowered.\nAnswer: Maybe", words, lettered=False).index == 2
    assert extract("no", words, lettered=False).index == 1
    assert extract("Answer: Yes, exercise reduced falls.", words, lettered=False).index == 0
    assert extract("Answer: A", words, lettered=False).index is None


def test_the_question_as_asked():
    from hippocrates.data.benchmarks import Item
    from hippocrates.eval.extract import ANSWER_INSTRUCTION, ask

    mc = ask(Item("1", "Which?", ["a", "b"], 0))
    assert mc == f"Question: Which?\nA. a\nB. b\n\n{ANSWER_INSTRUCTION}"
    yn = ask(Item("2", "Does it?", ["yes", "no", "maybe"], 1, context="An abstract."))
    assert yn.startswith("Abstract: An abstract.\nQuestion: Does it?\n\n") and "one of: yes, no, maybe" in yn


def test_the_gold_answer_line_reads_back_as_the_gold():
    from hippocrates.data.benchmarks import Item
    from hippocrates.eval.extract import answer_line, is_lettered

    for item in (
        Item("1", "Which?", OPTIONS, 2),
        Item("2", "Does it?", ["yes", "no", "maybe"], 2, context="An abstract."),
    ):
        line = answer_line(item)
        assert extract(line, item.options, lettered=is_lettered(item)).index == item.gold
    assert answer_line(Item("1", "Which?", OPTIONS, 2)) == "Answer: C"
