"""Arithmetic word problems: a chain-of-thought solver and a numeric exact-match metric.

Sweeps load these by path (``pipelines.arith:Solve``, ``pipelines.arith:exact_match``)
against the demo corpus ``datasets/demo/arith.parquet`` (columns question, answer).
"""

from decimal import Decimal, InvalidOperation

import dspy


class SolveWordProblem(dspy.Signature):
    """Solve the arithmetic word problem. Give the final answer as a number."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class Solve(dspy.Module):
    """Reason step by step, then answer."""

    def __init__(self) -> None:
        super().__init__()
        self.solve = dspy.ChainOfThought(SolveWordProblem)

    def forward(self, question: str) -> dspy.Prediction:
        return self.solve(question=question)


def normalise_number(text: object) -> str:
    """Drop the decoration models put around numbers: spaces, commas, "$" and a trailing ".0"."""
    cleaned = str(text).strip().replace(",", "").replace("$", "").strip()
    return cleaned.removesuffix(".0")


def same_number(expected: object, predicted: object) -> bool:
    """True when both normalise to the same number (or, if either isn't one, the same text)."""
    left, right = normalise_number(expected), normalise_number(predicted)
    try:
        # Decimal compares exactly, so "2.50" equals "2.5" without float rounding surprises.
        return Decimal(left) == Decimal(right)
    except InvalidOperation:
        return left == right


def exact_match(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> bool:
    """Metric: the predicted answer is numerically the labelled one."""
    return same_number(example.answer, prediction.answer)
