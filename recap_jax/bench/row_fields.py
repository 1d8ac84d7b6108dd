"""Reading a benchmark row's fields: texts, lists of strings, option letters, each with a
`BadRecord` naming the field and its kind ("text", "schema") when a row lacks it or holds
something else. The adapters of `recap_jax.bench.suites` read every row through these."""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from typing import Any

from recap_jax.bench.scoring import LETTERS
from recap_jax.data.records import BadRecord


def text_field(row: dict, *keys: str, what: str = "question") -> str:
    """The first of ``keys`` holding a non-empty text (numbers as text); BadRecord "text" if none."""
    for key in keys:
        value = row.get(key)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            text = str(value).strip()
            if text and text.lower() != "nan":
                return text
    raise BadRecord(f"text: no {what} (looked for {', '.join(keys)})", "text")


def optional_text(row: dict, key: str) -> str:
    """``row[key]`` as stripped text, "" when missing, None or NaN."""
    value = row.get(key)
    if isinstance(value, float) and math.isnan(value):
        return ""
    return str(value).strip() if value is not None and str(value).strip().lower() != "nan" else ""


def string_list(value: Any, what: str, strip: bool = True) -> list[str]:
    """A list of strings from a list, or from the string repr of a Python list (MMMU);
    each stripped unless ``strip`` is False."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise BadRecord(f"schema: {what} is not a list: {text[:80]!r}") from None
        else:
            value = [text] if text else []
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise BadRecord(f"schema: {what} is a {type(value).__name__}, not a list")
    return [str(v).strip() if strip else str(v) for v in value if v is not None]


def format_options(choices: Sequence[str], style: str = "A. ") -> str:
    """Option lines: style "A. " gives "A. text", style "(A) " gives "(A) text"."""
    if len(choices) > len(LETTERS):
        raise BadRecord(f"schema: {len(choices)} options (at most {len(LETTERS)})")
    prefix = (lambda k: f"({LETTERS[k]}) ") if style == "(A) " else (lambda k: f"{LETTERS[k]}. ")
    return "\n".join(prefix(k) + str(choice) for k, choice in enumerate(choices))


def letter_of(answer: Any, count: int) -> str:
    """An option letter from a letter ("B", "(B)") or a 0-based index (int or "1")."""
    text = str(answer).strip().strip("()").strip()
    if text.isdigit():
        index = int(text)
        if not 0 <= index < count:
            raise BadRecord(f"text: answer index {index} outside {count} options", "text")
        return LETTERS[index]
    if len(text) == 1 and text.upper() in LETTERS[:max(count, 1)]:
        return text.upper()
    raise BadRecord(f"text: answer {answer!r} is not an option letter or index", "text")
