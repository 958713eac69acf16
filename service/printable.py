"""The rules for text that becomes a label (class names, free texts, region and exemplar labels, export
categories): printable characters only (``check_printable``), and when two names are one class
(``normalise_class_name``).

Refused: Unicode control characters (category Cc: C0 and C1 controls, DEL, NUL, ESC, newline, tab), format characters
(Cf: zero-width space, bidirectional overrides, the byte order mark) but the zero-width non-joiner and joiner
(U+200C, U+200D: Persian and other scripts spell words with them, emoji sequences join with them), surrogates (Cs:
only a lone one can reach a Python str), line and paragraph separators (Zl, Zp) and noncharacters (U+FDD0..U+FDEF
and the last two code points of every plane, e.g. U+FFFF). Everything else stays: ordinary spaces, punctuation,
letters of any script ("café", "红色"), emoji. Text that passes is echoed safely in a terminal and a log line, and
every character of it is allowed in XML 1.0 (CVAT, Label Studio configs), JSON and YAML.

Pure and dependency-free: the server validates and matches requests with them (``service.pipeline.prompts``) and
the client side (``detseg label``, its exports' categories, ``detseg eval``'s datasets) checks and matches with the
same rules.
"""

from __future__ import annotations

import unicodedata

from service.errors import InvalidInput

_KINDS = {
    "Cc": "a control character",
    "Cf": "a format character",
    "Cs": "a surrogate",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}


_JOINERS = frozenset("\u200c\u200d")  # format characters that words and emoji are spelled with


def _is_noncharacter(code: int) -> bool:
    return 0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE


def unprintable(text: str) -> str | None:
    """What makes ``text`` unfit for a label, naming its first offending character (e.g. "a control character
    (U+0000)"); None when every character is printable."""
    for char in text:
        code = ord(char)
        kind = None if char in _JOINERS else _KINDS.get(unicodedata.category(char))
        if kind is None and _is_noncharacter(code):
            kind = "a noncharacter"
        if kind is not None:
            return f"{kind} (U+{code:04X})"
    return None


def check_printable(text: str, field: str) -> None:
    """InvalidInput naming ``field`` and the first unprintable character of ``text``, e.g. "texts[1]: contains a
    control character (U+0000); labels must be printable text". The text itself is not echoed."""
    problem = unprintable(text)
    if problem is not None:
        raise InvalidInput(f"{field}: contains {problem}; labels must be printable text")


def normalise_class_name(name: str) -> str:
    """Case, runs of spaces, "_" and "-" do not distinguish class names: "Traffic_light" and "traffic light" are one
    class to the server, and so to every tool that names its answers' categories."""
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())
