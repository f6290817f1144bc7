"""DSPy programs and metrics that sweeps load by path, e.g. ``pipelines.arith:Solve``.

Each module holds one task: its `dspy.Module` program and a metric with the
``(example, prediction, trace=None)`` signature that DSPy optimizers expect.
"""
