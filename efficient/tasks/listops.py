"""ListOps (Nangia & Bowman 2018) with Long Range Arena's semantics and format.

An expression is a nested list of operations on digits 0-9:

    [MAX 2 9 [MIN 4 7 ] 0 ]  ->  9

MIN, MAX, MED (the median, rounded down to an integer) and SM (sum modulo 10); at most
``max_args`` arguments per operation and ``max_depth`` levels of nesting; expressions are drawn
until their length in tokens falls in [min_length, max_length] (LRA: 500-2000, depth <= 10,
<= 10 arguments). The label is the value, 0-9. As in LRA's files, an operation and its arguments are
left-nested pairs in parentheses ("( ( ( [MAX 2 ) 9 ) ] )"); tokens are separated by spaces. ``load_tsv`` reads LRA's released files (header ``Source\\tTarget``).
"""

from __future__ import annotations

import csv
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VOCAB = ("<pad>", "<cls>", *OPERATORS, END, "(", ")", *[str(d) for d in range(10)])
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
PAD, CLS = 0, 1
N_CLASSES = 10
VALUE_PROBABILITY = 0.25  # below the maximum depth, an argument is a digit with probability 0.75


def apply(operator: str, values: list[int]) -> int:
    if operator == "[MIN":
        return min(values)
    if operator == "[MAX":
        return max(values)
    if operator == "[MED":
        return int(statistics.median(values))
    if operator == "[SM":
        return sum(values) % 10
    raise ValueError(f"unknown ListOps operator {operator!r}; valid: {', '.join(OPERATORS)}")


class TooLong(Exception):
    """A tree being drawn passed the maximum length: it would be rejected, so stop early."""


def random_tree(rng: random.Random, depth: int, max_depth: int, max_args: int, budget: list[int] | None = None):
    """A digit, or (operator, [arguments]) with 2..max_args arguments (LRA's distribution).

    ``budget`` ([tokens left]) makes drawing stop with TooLong as soon as the rendering would
    pass it: the same rejection sampling as drawing the whole tree, only faster.
    """
    if depth >= max_depth or rng.random() > VALUE_PROBABILITY:
        spend(budget, 1)
        return rng.randrange(10)
    operator = rng.choice(OPERATORS)
    n_args = rng.randint(2, max_args)
    spend(budget, 4 + 2 * n_args)  # the operator, "]", and a pair of parentheses per argument and around
    return operator, [random_tree(rng, depth + 1, max_depth, max_args, budget) for _ in range(n_args)]


def spend(budget: list[int] | None, tokens: int) -> None:
    if budget is not None:
        budget[0] -= tokens
        if budget[0] < 0:
            raise TooLong


def value_of(tree) -> int:
    if isinstance(tree, int):
        return tree
    operator, arguments = tree
    return apply(operator, [value_of(a) for a in arguments])


def to_tokens(tree) -> list[str]:
    """LRA's rendering of a tree built as ((((OP, a), b), c), ']'), each pair in parentheses:

        [MAX 2 9 ]  ->  ( ( ( [MAX 2 ) 9 ) ] )
    """
    if isinstance(tree, int):
        return [str(tree)]
    operator, arguments = tree
    node = [operator]
    for argument in arguments:
        node = ["(", *node, *to_tokens(argument), ")"]
    return ["(", *node, END, ")"]


def evaluate_tokens(tokens: list[str]) -> int:
    """The value of a rendered expression (parentheses are ignored, as grouping is by brackets)."""
    stack: list[list] = []
    result = None
    for token in tokens:
        if token in OPERATORS:
            stack.append([token])
        elif token == END:
            operator, *values = stack.pop()
            value = apply(operator, values)
            if stack:
                stack[-1].append(value)
            else:
                result = value
        elif token.isdigit():
            if stack:
                stack[-1].append(int(token))
            else:
                result = int(token)
        elif token not in ("(", ")"):
            raise ValueError(f"unknown ListOps token {token!r}")
    if stack or result is None:
        raise ValueError("unbalanced ListOps expression")
    return result


@dataclass
class Example:
    tokens: list[str]
    label: int


def generate(n: int, seed: int, min_length: int = 500, max_length: int = 2000, max_depth: int = 10,
             max_args: int = 10) -> list[Example]:
    """``n`` expressions with lengths in [min_length, max_length], reproducible from ``seed``."""
    rng = random.Random(seed)
    examples = []
    while len(examples) < n:
        try:
            tree = random_tree(rng, 1, max_depth, max_args, budget=[max_length])
        except TooLong:
            continue
        if isinstance(tree, int):
            continue
        tokens = to_tokens(tree)
        if min_length <= len(tokens) <= max_length:
            examples.append(Example(tokens, value_of(tree)))
    return examples


def load_tsv(path: Path | str) -> list[Example]:
    """LRA's released ListOps file: a header ``Source\\tTarget``, then one expression per line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ListOps file {path} not found: expected LRA's TSV (header 'Source\\tTarget', "
                                f"then '<expression>\\t<digit>' per line), e.g. lra_release/listops-1000/basic_train.tsv")
    examples = []
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header != ["Source", "Target"]:
            raise ValueError(f"{path}:1: expected the header 'Source\\tTarget', got {header!r}")
        for line, row in enumerate(reader, start=2):
            if len(row) != 2:
                raise ValueError(f"{path}:{line}: expected 2 tab-separated fields, got {len(row)}")
            source, target = row
            tokens = source.split()
            unknown = [t for t in tokens if t not in TOKEN_ID]
            if unknown or not target.strip().isdigit() or not 0 <= int(target) <= 9:
                problem = f"unknown token {unknown[0]!r}" if unknown else f"target {target!r} is not a digit 0-9"
                raise ValueError(f"{path}:{line}: {problem}")
            examples.append(Example(tokens, int(target)))
    return examples
