"""Build the demo corpus of grade-school arithmetic word problems.

Run from the repository root:

    python datasets/demo/build.py [--out PATH] [--rows N] [--seed S]

It writes a Parquet file (default ``datasets/demo/arith.parquet``) with columns
``id`` (int), ``question`` (str), ``answer`` (str holding an integer) and
``topic`` (addition, subtraction, multiplication or two_step). The same seed
always gives the same rows, so the committed file can be checked against a
fresh build.
"""

import argparse
import random
from collections.abc import Callable
from pathlib import Path

import polars as pl

NAMES = (
    "Ava",
    "Ben",
    "Chloe",
    "Diego",
    "Emma",
    "Farah",
    "George",
    "Hana",
    "Ivan",
    "Jade",
    "Kofi",
    "Lena",
    "Mateo",
    "Nora",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
)
ITEMS = (
    "apples",
    "marbles",
    "stickers",
    "pencils",
    "books",
    "cookies",
    "stamps",
    "shells",
    "cards",
    "balloons",
    "oranges",
    "buttons",
    "crayons",
    "coins",
    "muffins",
)

# Each topic draws a, b, c from these inclusive ranges. They are chosen so that
# every formula of the topic below gives a positive whole number.
RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "addition": ((2, 99), (2, 99), (0, 0)),
    "subtraction": ((20, 120), (2, 19), (0, 0)),
    "multiplication": ((2, 12), (2, 15), (0, 0)),
    "two_step": ((20, 60), (2, 9), (2, 9)),
}

Formula = Callable[[int, int, int], int]
TEMPLATES: dict[str, tuple[tuple[str, Formula], ...]] = {
    "addition": (
        (
            "{name} has {a} {items}. {friend} gives {name} {b} more. How many {items} does {name} have now?",
            lambda a, b, c: a + b,
        ),
        (
            "{name} collected {a} {items} in the morning and {b} in the afternoon. How many {items} did {name} collect in total?",
            lambda a, b, c: a + b,
        ),
        (
            "A shop sold {a} {items} on Monday and {b} on Tuesday. How many {items} did it sell altogether?",
            lambda a, b, c: a + b,
        ),
    ),
    "subtraction": (
        (
            "{name} had {a} {items} and gave {b} of them to {friend}. How many {items} does {name} have left?",
            lambda a, b, c: a - b,
        ),
        (
            "There are {a} {items} in a box. {name} takes out {b}. How many {items} remain in the box?",
            lambda a, b, c: a - b,
        ),
        (
            "{name} needs {a} {items} and already has {b}. How many more {items} does {name} need?",
            lambda a, b, c: a - b,
        ),
    ),
    "multiplication": (
        (
            "{name} buys {a} packs of {items} with {b} {items} in each pack. How many {items} does {name} buy?",
            lambda a, b, c: a * b,
        ),
        ("Each of {a} shelves holds {b} {items}. How many {items} are on the shelves?", lambda a, b, c: a * b),
        ("{name} reads {b} pages a day for {a} days. How many pages does {name} read?", lambda a, b, c: a * b),
    ),
    "two_step": (
        (
            "{name} has {a} {items} and buys {b} bags with {c} {items} in each. How many {items} does {name} have now?",
            lambda a, b, c: a + b * c,
        ),
        (
            "A class has {a} students and {b} are absent. Each student who is present gets {c} {items}. How many {items} are handed out?",
            lambda a, b, c: (a - b) * c,
        ),
        (
            "{name} earns ${a} an hour and works {b} hours, then spends ${c} on lunch. How many dollars does {name} have left?",
            lambda a, b, c: a * b - c,
        ),
        (
            "{name} had {a} {items}, got {b} more from {friend}, then lost {c}. How many {items} does {name} have now?",
            lambda a, b, c: a + b - c,
        ),
    ),
}


def make_problem(rng: random.Random, topic: str) -> tuple[str, int]:
    """Draw one problem of `topic`: its question text and integer answer."""
    text, formula = rng.choice(TEMPLATES[topic])
    a, b, c = (rng.randint(low, high) for low, high in RANGES[topic])
    name, friend = rng.sample(NAMES, 2)
    question = text.format(name=name, friend=friend, items=rng.choice(ITEMS), a=a, b=b, c=c)
    return question, formula(a, b, c)


def build(rows: int, seed: int) -> pl.DataFrame:
    """Generate `rows` problems; topics cycle so every prefix is balanced."""
    # random.Random with an int seed is reproducible across Python versions,
    # unlike Polars' sampling, whose generator is not part of its stable API.
    rng = random.Random(seed)
    topics = list(TEMPLATES)
    records = []
    for i in range(rows):
        topic = topics[i % len(topics)]
        question, answer = make_problem(rng, topic)
        records.append({"id": i, "question": question, "answer": str(answer), "topic": topic})
    schema = {"id": pl.Int64, "question": pl.String, "answer": pl.String, "topic": pl.String}
    return pl.DataFrame(records, schema=schema)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("arith.parquet"))
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    frame = build(args.rows, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(args.out)
    print(f"wrote {frame.height} rows (seed {args.seed}) to {args.out}")


if __name__ == "__main__":
    main()
