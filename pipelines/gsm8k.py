"""GSM8K: a chain-of-thought program and a numeric exact-match metric.

Sweeps load these by path (``pipelines.gsm8k:CoT``, ``pipelines.gsm8k:exact_match``).
The corpus labels its answers ``final_answer``; the sweep query renames that
column to match the program's output field:

    SELECT question, final_answer AS answer FROM corpus
"""

import dspy

from .arith import same_number


class SolveMathProblem(dspy.Signature):
    """Solve the grade-school math word problem. Give the final answer as a number."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class CoT(dspy.Module):
    """Reason step by step, then answer."""

    def __init__(self) -> None:
        super().__init__()
        self.solve = dspy.ChainOfThought(SolveMathProblem)

    def forward(self, question: str) -> dspy.Prediction:
        return self.solve(question=question)


def exact_match(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> bool:
    """Metric: the predicted answer is numerically the labelled one (``final_answer AS answer``)."""
    return same_number(example.answer, prediction.answer)
