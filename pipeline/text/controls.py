"""Control characters: refused in what the user types, removed from what reaches the terminal.

A question holding NUL, an ANSI escape or another control character is refused with its position
rather than cleaned silently: it most often means binary or terminal-coloured text was pasted, and
the user should see that. Model output is cleaned instead, character by character (so streamed and
whole output agree): a model's stray ESC must not recolour or move the user's terminal.
"""

from __future__ import annotations

import re
import unicodedata

from pipeline.errors import ControlCharacterError

# C0 and C1 controls and DEL; tab, line feed and carriage return are ordinary text.
INPUT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# In output a carriage return would also move the cursor.
OUTPUT_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
BOM = "\ufeff"


def refuse_controls(text: str, what: str = "the question") -> str:
    """`text` without a leading byte-order mark; an error if it holds a control character."""
    text = text.removeprefix(BOM)
    found = INPUT_CONTROL.search(text)
    if found:
        character = found.group()
        label = unicodedata.name(character, "") or {"\x00": "NUL", "\x1b": "ESC", "\x7f": "DEL"}.get(
            character, "control character")
        raise ControlCharacterError(
            f"{what} holds a control character (U+{ord(character):04X} {label}) at position {found.start() + 1};"
            " remove it (terminal colours and binary data cannot be translated)"
        )
    return text


def strip_controls(text: str) -> str:
    """`text` safe to print on a terminal: control characters other than tab and newline removed."""
    return OUTPUT_CONTROL.sub("", text)
