"""GSM8K answer extraction on tricky strings, and the standard-error formula."""

import math

import pytest

from illada_lightning.evaluation.answers import (
    answers_match,
    extract_answer,
    normalize_number,
    reference_answer,
    truncate_at_stop,
)
from illada_lightning.evaluation.metrics import accuracy_with_stderr, binomial_stderr


@pytest.mark.parametrize("text, expected", [
    ("The answer is 42.", "42"),
    ("The answer is $1,200.", "1200"),
    ("#### 18 dollars", "18"),
    ("She has 3 + 4 = 7 apples.\n#### 7\n\nQuestion: Tom has 5 pens", "7"),
    ("so she paid $2,125.50 in total", "2125.5"),
    ("He walks 12 miles, then 30 more. The answer is: 42 miles. Then 9 more words", "42"),
    ("Answer: -3", "-3"),
    ("x = 0.50", "0.5"),
    ("120.0 cookies", "120"),
    ("no number here", ""),
    ("It costs 5 <<2*3=6>> dollars", "5"),  # a calculator annotation is not the answer
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_truncate_at_stop_drops_the_next_fewshot_question():
    text = "Half of 10 is 5.\n#### 5\n\nQuestion: What is 6 + 1?\nAnswer: 7"
    assert extract_answer(truncate_at_stop(text)) == "5"
    assert extract_answer(truncate_at_stop("So 8 eggs left.\nQuestion: 99 cats")) == "8"


def test_reference_and_matching():
    assert reference_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072") == "1072"
    assert reference_answer("no final line") == ""
    assert normalize_number("$3,000.00") == "3000"
    assert answers_match("42.0", "42") and not answers_match("", "0") and not answers_match("41", "42")


def test_binomial_standard_error():
    assert binomial_stderr(0.5, 100) == pytest.approx(0.05)
    assert binomial_stderr(0.25, 300) == pytest.approx(math.sqrt(0.25 * 0.75 / 300))
    assert binomial_stderr(1.0, 10) == 0.0
    assert math.isnan(binomial_stderr(0.5, 0))


def test_accuracy_with_stderr_uses_torchmetrics_mean_and_count():
    metrics = accuracy_with_stderr([True, False, True, True], "acc")
    assert metrics == pytest.approx({"acc": 0.75, "acc_stderr": math.sqrt(0.75 * 0.25 / 4), "n": 4.0})
    empty = accuracy_with_stderr([], "acc")
    assert empty["n"] == 0 and math.isnan(empty["acc_stderr"])
