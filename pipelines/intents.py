"""Four Banking77 intents for a 135M model on CPU: a one-step classifier and its label-match metric.

`sweeps/real.yaml` runs it on SmolLM2-135M-Instruct through llama.cpp. Four intents, not 77: the
77 labels alone would fill most of a small model's context and its slot's time. Measured on this
model (24 test messages, temperature 0): no demos, it never answers in DSPy's format (accuracy 0);
4 labelled demos, 0.25 with 4 malformed answers; 8 demos, 0.54 with none. So format, few-shot
and instructions make differences a sweep can show, on a model that runs anywhere.
"""

from typing import Literal

import dspy

INTENTS = ("card_arrival", "exchange_rate", "lost_or_stolen_card", "terminate_account")


class ClassifyIntent(dspy.Signature):
    """Classify the online-banking customer message into one of the intents."""

    text: str = dspy.InputField()
    intent: Literal[INTENTS] = dspy.OutputField()


class Classify(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict(ClassifyIntent)

    def forward(self, text: str) -> dspy.Prediction:
        return self.classify(text=text)


def intent_match(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> bool:
    """Metric: the predicted intent is the labelled one."""
    return str(prediction.get("intent", "")).strip() == example.intent
