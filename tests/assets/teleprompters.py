"""A user's own teleprompter, named in a sweep by import path (`tests.assets.teleprompters:BestLabeledDemos`).

It takes the roles its signature names (metric, num_threads; trainset, valset, seed) and
refuses to run without them, so a trial that finishes shows the platform supplied each one.
"""

import random

import dspy


class BestLabeledDemos(dspy.teleprompt.Teleprompter):
    """Try `candidates` random sets of `k` labelled demos; keep the one scoring best on val."""

    def __init__(self, metric, num_threads=None, k=2, candidates=2):
        if not callable(metric) or not num_threads:
            raise ValueError("BestLabeledDemos needs the metric and num_threads roles")
        self.metric, self.num_threads, self.k, self.candidates = metric, num_threads, k, candidates

    def compile(self, student, *, trainset, valset, seed):
        if not trainset or not valset or not isinstance(seed, int):
            raise ValueError("BestLabeledDemos needs the trainset, valset and seed roles")
        rng = random.Random(seed)
        evaluate = dspy.Evaluate(devset=valset, metric=self.metric, num_threads=self.num_threads)
        best, best_score = None, -1.0
        for _ in range(self.candidates):
            program = student.reset_copy()
            demos = rng.sample(trainset, self.k)
            for predictor in program.predictors():
                predictor.demos = demos
            score = evaluate(program).score
            if score > best_score:
                best, best_score = program, score
        best._compiled = True
        return best
