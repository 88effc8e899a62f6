"""Final-answer extraction and answer equivalence for math replies.

Extraction reads what a reply commits to as its answer: the last ``\\boxed{...}`` (or ``\\fbox``),
else an "answer is X" / "Answer: X" / GSM8K "#### X" phrase, else the last number. Equivalence first
compares cheaply normalised strings and numbers (``"1,000"`` = ``"1000"``, ``"$18"`` = ``"18.00"``),
then asks the ``math_verify`` library (Hugging Face Math-Verify: LaTeX → SymPy, symbolic and
numeric comparison) so that ``"\\frac{1}{2}"`` = ``"0.5"`` and ``"x+1"`` = ``"1+x"``.
"""

from __future__ import annotations

import re
import threading

from math_verify import parse, verify

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)")
_ANSWER_PHRASE = re.compile(
    r"(?:\banswer\s*(?:is\b\s*:?|:)|####)\s*(?P<answer>[^\n]+)",
    re.IGNORECASE,
)
_INLINE_MATH = re.compile(r"\$+(?P<math>[^$]+?)\$+")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_LEADING_NUMBER = re.compile(r"^\s*(?P<number>" + _NUMBER.pattern + r")(?=[\s.,;!?]|$)")
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_SPACING = re.compile(r"\\(?:left|right|displaystyle)(?![a-zA-Z])|\\[!,;: ]|\s+")
# math_verify's parse/verify time out with signal.alarm, which only works in the main thread.
_TIMEOUT_SECONDS = 5


def extract_final_answer(text: str, number_fallback: bool = True) -> str | None:
    """The final answer a reply commits to, as a raw (LaTeX) string.

    Order of evidence: the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept,
    ``\\boxed 5`` without braces accepted); else the text after the last "answer is" / "Answer:" /
    "####" (its first ``$...$`` span or leading number when present, else up to the end of the sentence);
    else, when ``number_fallback``, the last number in the text.

    Args:
        text: one assistant reply.
        number_fallback: also accept the last number of the text when no explicit answer is found.

    Returns:
        The answer string, stripped, or ``None`` when nothing is found.
    """
    for found in (last_boxed(text), _answer_phrase(text)):
        if found:
            return found
    if number_fallback:
        numbers = _NUMBER.findall(text)
        return numbers[-1] if numbers else None
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` that has any (stripped); ``None`` if there is none."""
    for match in reversed(list(_BOX_COMMAND.finditer(text))):
        content = _box_content(text, match.end())
        if content:
            return content
    return None


def _box_content(text: str, start: int) -> str | None:
    """The argument of a box command whose name ends at ``start``: a balanced ``{...}`` or one token."""
    rest = text[start:]
    if rest.startswith("{"):
        depth = 0
        for index, char in enumerate(rest):
            depth += {"{": 1, "}": -1}.get(char, 0)
            if depth == 0:
                return rest[1:index].strip()
        return None
    if not rest[:1].isspace():
        return None  # e.g. "\boxedx" is another command, not a box
    token = re.match(r"\s+([^\s$]+)", rest)
    return token.group(1).rstrip(".,;") if token else None


def answer_phrase(text: str) -> str | None:
    """The rest of the line after the last "answer is" / "Answer:" / "####" phrase (a line break right after
    the phrase is skipped, as in ``"Answer:\nParis"``), or ``None`` when the text has no such phrase."""
    matches = list(_ANSWER_PHRASE.finditer(text))
    return matches[-1].group("answer") if matches else None


def _answer_phrase(text: str) -> str | None:
    """The answer after the last "answer is" / "Answer:" / "####" phrase, cleaned of prose."""
    answer = answer_phrase(text)
    if answer is None:
        return None
    inline = _INLINE_MATH.search(answer)
    if inline:
        return inline.group("math").strip()
    leading = _LEADING_NUMBER.match(answer)
    if leading:
        return leading.group("number")
    answer = _SENTENCE_END.split(answer, maxsplit=1)[0]
    return answer.strip().rstrip(".,;:") or None


def normalize_answer(answer: str) -> str:
    """A canonical string for cheap comparison.

    Removes ``$``, ``\\left``/``\\right``, LaTeX spacing and whitespace, unwraps ``\\text{...}``,
    maps ``\\dfrac``/``\\tfrac`` to ``\\frac``, drops thousands separators and a trailing period, and
    writes plain numbers canonically (``"18.00"`` → ``"18"``, ``"0.50"`` → ``"0.5"``).
    """
    text = answer.replace("\\$", "").replace("$", "")
    text = _TEXT_COMMAND.sub(r"\1", text)
    text = _SPACING.sub("", text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


def answers_match(predicted: str, reference: str) -> bool:
    """Whether a predicted final answer equals the reference answer.

    First a cheap check on :func:`normalize_answer` strings; then ``math_verify.verify`` on both
    answers parsed as ``\\boxed{...}`` LaTeX (the reference is the gold side; verify is not
    symmetric). Parsing failures and math_verify timeouts (5 s, main thread only; outside the main
    thread math_verify's ``signal.alarm`` cannot be used and runs without a timeout) count as no match.

    Args:
        predicted: answer extracted from a reply, e.g. ``"\\dfrac12"``.
        reference: gold answer, e.g. ``"\\frac{1}{2}"`` or ``"1,000"``.
    """
    if not predicted.strip() or not reference.strip():
        return False
    if normalize_answer(predicted) == normalize_answer(reference):
        return True
    timeout = _TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    gold = parse(_as_boxed(reference), parsing_timeout=timeout)
    target = parse(_as_boxed(predicted), parsing_timeout=timeout)
    return bool(gold and target and verify(gold, target, timeout_seconds=timeout))


def _as_boxed(answer: str) -> str:
    """Wrap an answer so math_verify's LaTeX extractor reads all of it."""
    return "\\boxed{" + answer.replace("\\$", "").replace("$", "").strip() + "}"
