"""What a CSV's first lines say, read the same way by training (training/data.py) and the client
(service/rows.py): a file trained on headerless is scored headerless too.

A CSV's first line is its header, unless it reads as data: every field of it above a number in the
second line is a number too (a text label column may hold text in both). Numbers that are exactly their
columns' positions, 0..n-1 or 1..n, are a header of column numbers (what pandas writes for unnamed
columns), not data.
"""


def is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def numbers_columns(fields: list[str]) -> bool:
    """The fields are their columns' positions, 0..n-1 or 1..n."""
    if not fields or not all(is_number(v) for v in fields):
        return False
    values = [float(v) for v in fields]
    return values in ([float(i) for i in range(start, start + len(values))] for start in (0, 1))


def first_line_is_data(first: list[str], second: list[str] | None) -> bool:
    """Whether a CSV's first line is a row of data rather than its header."""
    if second is None or len(second) != len(first):
        return False  # one line, or a ragged file: read it as a header and let the field count speak
    numeric = [j for j, v in enumerate(second) if is_number(v)]
    if not numeric or not all(is_number(first[j]) for j in numeric):
        return False
    return not numbers_columns([first[j] for j in numeric])
