"""Personal data in text: e-mail addresses, phone numbers, resident ID numbers and card numbers,
each confirmed by the check a regex can't do (ID check digit, Luhn)."""

from __future__ import annotations

import re

_PII = re.compile(
    r"(?P<email>[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})"
    r"|(?P<id_number>(?<!\d)[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![\dXx]))"
    r"|(?P<phone>(?<!\d)(?:(?:\+|00)86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?!\d)"
    r"|(?<![\w+])(?:\+|00)[1-9]\d{0,2}[ -]?(?:\(\d{1,4}\)[ -]?)?\d{1,4}(?:[ -]?\d{2,4}){1,4}(?!\d))"
    r"|(?P<card_number>(?<!\d)\d(?:[ -]?\d){12,18}(?!\d))"
)
# Every number _PII looks for has at least 8 digits. A chain of digits is tried from its first digit only
# (the lookbehind): the same matches, without re-scanning each long number from every digit in it.
EIGHT_DIGITS = re.compile(r"\d(?<!\d\d)(?:[ ()-]{0,2}\d){7}")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
PII_MASKS = {"email": "[EMAIL]", "phone": "[PHONE]", "id_number": "[ID_NUMBER]", "card_number": "[CARD_NUMBER]"}


def _id_check_ok(number: str) -> bool:
    """ISO 7064 MOD 11-2 check digit of a mainland resident ID (GB 11643)."""
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    return "10X98765432"[total % 11] == number[17].upper()


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0 and len(set(digits)) > 1


def _pii_kind(match: re.Match) -> str | None:
    """The kind of personal data a match really is, after the checks a regex can't do."""
    kind, text = match.lastgroup, match.group()
    digits = "".join(c for c in text if c.isdigit())
    if kind == "id_number":
        if _id_check_ok(text):
            return kind
        return "card_number" if text.isdigit() and _luhn_ok(text) else None
    if kind == "phone":
        return kind if 8 <= len(digits.removeprefix("00")) <= 15 else None
    if kind == "card_number":
        return kind if _luhn_ok(digits) else None
    return kind  # email


def find_pii(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of each e-mail, phone, resident ID and card number in `text`."""
    if "@" not in text and not EIGHT_DIGITS.search(text):
        return []
    found = []
    for match in _PII.finditer(text):
        kind = _pii_kind(match)
        if kind:
            found.append((kind, match.start(), match.end()))
    return found


def masked(value: str) -> str:
    """Enough of a value to find it in the file, not enough to leak it into a report."""
    return value[:3] + "*" * max(1, len(value) - 5) + value[-2:] if len(value) > 6 else "*" * len(value)


PII_OUTCOME = {"flag": " (flagged)", "reject": "; remove it or use --policy pii=redact", "redact": "; replaced with {}"}
