"""A test program that works uncompiled and raises once it has demos: a trial that fails for real."""

import dspy


class Solve(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.ChainOfThought("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        if self.predict.predict.demos:
            raise RuntimeError("this program breaks when it is given demos")
        return self.predict(question=question)
