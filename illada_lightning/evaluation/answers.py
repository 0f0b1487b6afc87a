"""Extracting a final numeric answer from free text (GSM8K references and model outputs) and comparing answers.

GSM8K references end in `#### 72`. Model outputs are messier: "The answer is $1,200.", "#### 18 dollars",
"so she has 5 apples left.\n\nQuestion: ..." (a base model continuing into the next few-shot question).
Order of preference, as in lm-evaluation-harness's strict-then-flexible filters:
1. the number after the first `####`;
2. the number after the last "answer is" / "answer:";
3. the last number in the text.
Numbers lose thousands separators, currency signs and trailing units/punctuation, then compare as numbers
(`"42.0" == "42"`, `"1,000" == "1000"`).
"""

from __future__ import annotations

import re
from fractions import Fraction

# A number: optional sign, digits with optional thousands commas, optional decimals; or a bare decimal ".5".
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_HASH_RE = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)\s*[:\s]*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
_CALCULATOR_RE = re.compile(r"<<[^>]*>>")
# Where a base model starts a new few-shot example, the answer to this one has ended.
STOP_STRINGS = ("\nQuestion:", "Question:", "\n\n\n")


def truncate_at_stop(text: str, stops: tuple[str, ...] = STOP_STRINGS) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def strip_calculator(text: str) -> str:
    """Remove GSM8K's calculator annotations `<<48/2=24>>` (few-shot targets read better without them)."""
    return _CALCULATOR_RE.sub("", text)


def normalize_number(text: str) -> str:
    """'1,200' -> '1200', '42.0' -> '42', '0.50' -> '0.5', '-3' -> '-3'; '' for text that is not a number."""
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        return ""
    if value.denominator == 1:
        return str(value.numerator)
    return str(float(value))


def extract_answer(text: str) -> str:
    """The final numeric answer in `text`, normalised; '' when there is none."""
    text = strip_calculator(text)
    match = _HASH_RE.search(text)
    if match:
        return normalize_number(match.group(1))
    matches = _ANSWER_IS_RE.findall(text)
    if matches:
        return normalize_number(matches[-1])
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else ""


def reference_answer(gsm8k_answer: str) -> str:
    """The normalised number after `####` in a GSM8K reference solution ('' when absent)."""
    match = _HASH_RE.search(gsm8k_answer)
    return normalize_number(match.group(1)) if match else ""


def answers_match(predicted: str, target: str) -> bool:
    return predicted != "" and normalize_number(predicted) == normalize_number(target)
