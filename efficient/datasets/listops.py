"""ListOps (Nangia & Bowman 2018) with Long Range Arena's semantics, lengths and format.

An expression is a nested list of operations on digits 0-9:

    [MAX 2 9 [MIN 4 7 ] 0 ]  ->  9

MIN, MAX, MED (the median, rounded down to an integer) and SM (sum modulo 10); at most
``max_args`` arguments per operation and ``max_depth`` levels of nesting. The label is the
value, 0-9.

Two views of one expression, as in LRA:

- the file (``to_tokens``, ``load_tsv``): LRA's generator writes an operation and its arguments
  as left-nested pairs in parentheses, ``( ( ( [MAX 2 ) 9 ) ] )``, tokens separated by spaces,
  in a TSV with the header ``Source\\tTarget``;
- the model's input (``model_tokens``): LRA's input pipeline deletes ``(`` and ``)`` before
  tokenising, so the model reads ``[MAX 2 9 ]``: operators, digits and ``]`` only, 15 symbols
  plus padding (``VOCAB``). That count is the length ``L`` (``length``).

The generator keeps an expression when ``min_length < L < max_length`` (strict, as LRA's
``data/listops.py``; LRA: 500 and 2000, depth <= 10, <= 10 arguments), so generated data has the
lengths of LRA's released files. LRA's input pipeline then cuts every input to its
``max_length`` (2000) tokens; ``bench/tasks/listops.py`` cuts to ``seq_len`` the same way and counts the
inputs it cut.
"""

from __future__ import annotations

import csv
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
DIGITS = tuple(str(d) for d in range(10))
PARENTHESES = ("(", ")")  # in the files only: dropped before tokenising, as LRA's pipeline does
VOCAB = ("<pad>", *OPERATORS, END, *DIGITS)  # LRA's 15 symbols, padding first (id 0)
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
PAD = 0
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
    """A tree being drawn reached the maximum length: it would be rejected, so stop early."""


def random_tree(rng: random.Random, depth: int, max_depth: int, max_args: int, budget: list[int] | None = None):
    """A digit, or (operator, [arguments]) with 2..max_args arguments (LRA's distribution).

    ``budget`` ([L left]) makes drawing stop with TooLong as soon as the expression's length L
    would pass it: the same rejection sampling as drawing the whole tree, only faster.
    """
    if depth >= max_depth or rng.random() > VALUE_PROBABILITY:
        spend(budget, 1)  # a digit
        return rng.randrange(10)
    operator = rng.choice(OPERATORS)
    n_args = rng.randint(2, max_args)
    spend(budget, 2)  # the operator and its "]"
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
    """LRA's file rendering of a tree built as ((((OP, a), b), c), ']'), each pair in parentheses:

    [MAX 2 9 ]  ->  ( ( ( [MAX 2 ) 9 ) ] )
    """
    if isinstance(tree, int):
        return [str(tree)]
    operator, arguments = tree
    node = [operator]
    for argument in arguments:
        node = ["(", *node, *to_tokens(argument), ")"]
    return ["(", *node, END, ")"]


def model_tokens(tokens: list[str]) -> list[str]:
    """What the model reads: the tokens less the parentheses (LRA's input pipeline)."""
    return [t for t in tokens if t not in PARENTHESES]


def length(tokens: list[str]) -> int:
    """LRA's length L: operators, digits and ']' (parentheses not counted)."""
    return len(model_tokens(tokens))


def evaluate_tokens(tokens: list[str]) -> int:
    """The value of an expression, with or without parentheses (grouping is by brackets)."""
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
        elif token in DIGITS:
            if stack:
                stack[-1].append(int(token))
            else:
                result = int(token)
        elif token not in PARENTHESES:
            raise ValueError(f"unknown ListOps token {token!r}")
    if stack or result is None:
        raise ValueError("unbalanced ListOps expression")
    return result


@dataclass
class Example:
    tokens: list[str]  # as in LRA's files, parentheses included; the model reads model_tokens(tokens)
    label: int


def generate(
    n: int, seed: int, min_length: int = 500, max_length: int = 2000, max_depth: int = 10, max_args: int = 10
) -> list[Example]:
    """``n`` expressions with ``min_length < L < max_length`` (LRA's window), reproducible from ``seed``."""
    if max_length - min_length < 2:
        raise ValueError(f"no length L satisfies {min_length} < L < {max_length}")
    rng = random.Random(seed)
    examples = []
    while len(examples) < n:
        try:
            tree = random_tree(rng, 1, max_depth, max_args, budget=[max_length - 1])
        except TooLong:
            continue
        tokens = to_tokens(tree)
        if min_length < length(tokens) < max_length:
            examples.append(Example(tokens, value_of(tree)))
    return examples


def load_tsv(path: Path | str) -> list[Example]:
    """LRA's released ListOps file: a header ``Source\\tTarget``, then ``<expression>\\t<digit>``.

    Line endings may be LF or CRLF (LRA's files are written by Python's csv module: CRLF), and
    blank lines at the end are ignored. Any other problem is an error naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"ListOps file {path} not found: expected LRA's TSV (header 'Source\\tTarget', "
            f"then '<expression>\\t<digit>' per line), e.g. lra_release/listops-1000/basic_train.tsv"
        )
    examples = []
    blank = None  # the first blank line seen, an error only if an example follows it
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header != ["Source", "Target"]:
            raise ValueError(f"{path}:1: expected the header 'Source\\tTarget', got {header!r}")
        for line, row in enumerate(reader, start=2):
            if not any(field.strip() for field in row):
                blank = blank or line
                continue
            if blank:
                raise ValueError(f"{path}:{blank}: blank line between examples")
            if len(row) != 2:
                raise ValueError(f"{path}:{line}: expected 2 tab-separated fields, got {len(row)}")
            source, target = row
            tokens = source.split()
            unknown = [t for t in tokens if t not in TOKEN_ID and t not in PARENTHESES or t == VOCAB[PAD]]
            if unknown:
                raise ValueError(f"{path}:{line}: unknown token {unknown[0]!r}")
            if target.strip() not in DIGITS:
                raise ValueError(f"{path}:{line}: target {target!r} is not a digit 0-9")
            if not tokens:
                raise ValueError(f"{path}:{line}: empty expression")
            examples.append(Example(tokens, int(target)))
    if not examples:
        raise ValueError(f"{path}:2: no examples after the header (expected '<expression>\\t<digit>' from line 2)")
    return examples
