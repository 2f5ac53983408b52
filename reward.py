"""Rewards: the paper's last-integer parser (tag P1), a safe SymPy oracle (S1), multiplication partial credit (S2).

    P1  prediction = last match of -?\\d+ in the completion with every comma removed     (paper Appendix B)
    S1  R = 1 if SymPyEvaluate(y) = A* else 0, equality = simplify(a − b) == 0             (literature review)
    S2  R_partial = (1/T)·Σ_t 1{s*_t appears in y}, s* = partial products, then product   (literature review)

The completion is hostile input (model output). Nothing here calls eval, exec, sympify or parse_expr on it:
`_Parser` reads a whitelist of tokens and builds SymPy objects itself. Limits, each refusal scoring 0:
only the last MAX_SCAN_CHARS characters are scanned (all regexes are linear, no nested quantifiers); an
expression longer than MAX_EXPR_LEN or nested deeper than MAX_DEPTH is refused; an exponent must be an integer
literal with |e| <= MAX_EXPONENT, `a^b^c` is refused, a rational power must stay under MAX_BITS bits, and at
most MAX_POWERS powers per expression; parsing and comparison together run under a time limit.

Pure Python + SymPy (no torch).
"""
from __future__ import annotations

import re
import signal
import threading
from fractions import Fraction
from typing import Callable

import sympy

MAX_SCAN_CHARS = 20_000  # only the tail of a completion is searched for the final answer
MAX_EXPR_LEN = 200       # longest final-answer expression the S1 parser accepts
MAX_DEPTH = 20           # deepest nesting of ( ) { } \frac \sqrt
MAX_EXPONENT = 64        # largest |e| in a^e
MAX_BITS = 4096          # largest numerator/denominator of a rational power, in bits
MAX_POWERS = 4           # most ^ operators in one expression


# ---------------------------------------------------------------------------------------------- P1 + exact match
_INT = re.compile(r"-?\d+")  # [decided] a leading minus sign belongs to the integer (SPEC.md)


def parse_last_int(text: str) -> int | None:
    """Paper Appendix B (P1): remove every comma, find every integer, return the last one (None if there is none).

    The regex is `-?\\d+`, so: "1,234" -> 1234; "-5" -> -5; "3.5" -> 5 (the paper's rule reads the integers 3 and
    5, not a decimal); "3-4" -> -4 (a hyphen before a digit is read as a minus sign, which is what the decided
    rule gives; the paper does not say). Any length: a 5,000-digit integer is read too (never a ValueError).
    """
    found = last_int_string(text)
    return _to_int(found) if found is not None else None


def last_int_string(text: str) -> str | None:
    """The last integer of `text`, as the string the paper's rule reads (parse_last_int converts it)."""
    found = _INT.findall(text.replace(",", ""))  # [P1] remove every comma; the last integer is the prediction
    return found[-1] if found else None


def _to_int(s: str) -> int:
    """int(s) for a `-?\\d+` string of any length: Python refuses int() of a string over 4,300 digits, so convert
    in chunks (model output is untrusted: a long digit run must not raise)."""
    sign, digits = (-1, s[1:]) if s.startswith("-") else (1, s)
    value = 0
    for i in range(0, len(digits), 4000):
        chunk = digits[i: i + 4000]
        value = value * 10 ** len(chunk) + int(chunk)
    return sign * value


def _to_fraction(answer: float | int | str) -> Fraction:
    """Trusted ground truth -> exact Fraction: 145.0 -> 145, "1,234" -> 1234, 0.1 -> 1/10 (via repr, not binary)."""
    if isinstance(answer, float):
        return Fraction(repr(answer))
    if isinstance(answer, int):
        return Fraction(answer)
    return Fraction(answer.replace(",", "").strip())  # raises ValueError on a malformed ground truth


def exact_match_reward(text: str, answer: float | int | str) -> float:
    """1.0 if parse_last_int(text) equals the ground truth numerically, else 0.0 (also 0.0 with no integer).

    Compared as exact fractions, so a non-integral answer (e.g. 2.5) never matches an integer prediction.
    """
    truth, found = _to_fraction(answer), last_int_string(text)
    if found is None or truth.denominator != 1:
        return 0.0
    if len(found.lstrip("-").lstrip("0")) > abs(truth.numerator).bit_length() * 0.30103 + 1:  # > the answer's digits
        return 0.0  # more significant digits than the answer: not equal (and not worth converting a huge run)
    return 1.0 if _to_int(found) == truth.numerator else 0.0  # P1's prediction == the answer


# ---------------------------------------------------------------------------------------------- S1: extraction
_ANSWER_IS = re.compile(r"answer is\s*:?", re.IGNORECASE)
# A run of characters that can belong to an expression (no letters outside \commands, no newline); every
# alternative starts with a different character class, so matching is linear.
_EXPR_RUN = re.compile(r"(?:\\[A-Za-z]+|\\[,;:! $]|[0-9.,+\-*/^(){}%$×÷−· \t])+")
_NUMBER = re.compile(r"-?\\[dt]?frac\{\d+\}\{\d+\}|-?\d+(?:\.\d+)?(?:/\d+)?")  # 3, -3, 0.75, 3/4, \frac{3}{4}


def _boxed(tail: str, max_len: int) -> str | None:
    """Content of the last \\boxed{…}, if its braces close within max_len characters (else None)."""
    start = tail.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, min(len(tail), i + max_len + 1)):
        depth += {"{": 1, "}": -1}.get(tail[j], 0)
        if depth == 0:
            return tail[i:j]
    return None


def _expression_after(tail: str, pos: int, max_len: int) -> str | None:
    """The expression-like run starting at pos, without trailing sentence punctuation (too long: returned whole)."""
    m = _EXPR_RUN.match(tail, pos, pos + max_len + 1)
    if m is None:
        return None
    if m.end() - pos > max_len:
        return m.group()  # over-long: the parser refuses it, no fall-through to a later rule
    return m.group().strip().rstrip(".,").strip() or None


def extract_final_answer(text: str, max_len: int = MAX_EXPR_LEN) -> str | None:
    """The final-answer expression of a completion, from its last MAX_SCAN_CHARS characters, first rule that hits:

    1. the content of the last \\boxed{…} (balanced braces);  2. the expression after the last "answer is"
    (case-insensitive, an optional colon, up to the first character that cannot belong to an expression, e.g.
    "The answer is 18 apples." -> "18");  3. the expression after the last "####";  4. the last number, commas
    removed, decimals, a/b and \\frac{a}{b} allowed, a minus sign belonging to it as in P1. A rule that finds
    nothing (no marker, an unclosed box, only words after the marker) falls through to the next; None if none hits.
    """
    tail = text[-MAX_SCAN_CHARS:]
    found = _boxed(tail, max_len)
    if found is None:
        last = None
        for last in _ANSWER_IS.finditer(tail):
            pass
        found = _expression_after(tail, last.end(), max_len) if last else None
    if found is None and (pos := tail.rfind("####")) >= 0:
        found = _expression_after(tail, pos + 4, max_len)
    if found is None:
        numbers = _NUMBER.findall(tail.replace(",", ""))
        found = numbers[-1] if numbers else None
    return found


# ---------------------------------------------------------------------------------------------- S1: safe parser
_TOKEN = re.compile(r"\s+|(\d+(?:\.\d+)?|\.\d+)|(\\[A-Za-z]+|\\[;:! $])|(\*\*|pi(?![A-Za-z])|[-+*/^(){}%$×÷−·])")
_ALIASES = {"\\frac": "frac", "\\dfrac": "frac", "\\tfrac": "frac", "\\sqrt": "sqrt", "\\pi": "pi", "pi": "pi",
            "\\cdot": "*", "\\times": "*", "×": "*", "·": "*", "\\div": "/", "÷": "/", "−": "-", "**": "^"}
# Dropped tokens: LaTeX spacing and sizing, dollar signs, and "%" (our choice: a unit, not /100, because GSM8K
# writes a percentage answer as the bare number, e.g. "#### 25" for 25%).
_DROPPED = {"\\left", "\\right", "\\;", "\\:", "\\!", "\\ ", "\\$", "$", "%"}
_STARTS_PRIMARY = {"(", "{", "frac", "sqrt", "pi"}  # implicit multiplication before these: 2\sqrt{2}, 3(1+2)


class _Refused(Exception):
    """The expression is outside the whitelist or over a limit."""


def _tokenize(s: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if m is None:
            raise _Refused(f"character {s[pos]!r} not allowed")
        pos, tok = m.end(), m.group(1) or m.group(2) or m.group(3)
        if tok is None or tok in _DROPPED:
            continue
        tok = _ALIASES.get(tok, tok)
        if tok.startswith("\\"):
            raise _Refused(f"command {tok!r} not allowed")
        tokens.append(tok)
    return tokens


class _Parser:
    """Recursive descent: expr = term {(+|-) term}; term = unary {(*|/|implicit) unary}; unary = {+|-} power;
    power = primary [^ int-literal]; primary = number | pi | (expr) | {expr} | frac{expr}{expr} | sqrt{expr}."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.i, self.depth, self.powers = tokens, 0, 0, 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise _Refused(f"expected {expected!r}, got {tok!r}")
        self.i += 1
        return tok

    def expr(self) -> sympy.Expr:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Refused("nested too deeply")
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        self.depth -= 1
        return value

    def term(self) -> sympy.Expr:
        value = self.unary()
        while self.peek() in ("*", "/") or self.peek() in _STARTS_PRIMARY:
            op = self.take() if self.peek() in ("*", "/") else "*"
            value = value * self.unary() if op == "*" else _divide(value, self.unary())
        return value

    def unary(self) -> sympy.Expr:
        sign = 1
        while self.peek() in ("+", "-"):
            sign = -sign if self.take() == "-" else sign
        return sign * self.power()

    def power(self) -> sympy.Expr:
        base = self.primary()
        if self.peek() != "^":
            return base
        self.take("^")
        self.powers += 1
        value = _bounded_power(base, self.exponent(), self.powers)
        if self.peek() == "^":
            raise _Refused("a^b^c refused")
        return value

    def exponent(self) -> int:
        """A small integer literal, optionally signed and wrapped in {…} or (…): 2, -2, {10}, (-1)."""
        close = {"{": "}", "(": ")"}.get(self.peek())
        if close:
            self.take()
        sign = 1
        if self.peek() == "-":
            self.take()
            sign = -1
        tok = self.take()
        if not tok.isdigit() or int(tok) > MAX_EXPONENT:
            raise _Refused(f"exponent {tok!r} refused")
        if close:
            self.take(close)
        return sign * int(tok)

    def primary(self) -> sympy.Expr:
        tok = self.take()
        if tok[0].isdigit() or tok[0] == ".":
            f = Fraction(tok)  # exact: "0.75" -> 3/4, never a binary float
            return sympy.Rational(f.numerator, f.denominator)
        if tok == "pi":
            return sympy.pi
        if tok in ("(", "{"):
            value = self.expr()
            self.take(")" if tok == "(" else "}")
            return value
        if tok == "frac":
            return _divide(self.group(), self.group())
        if tok == "sqrt":
            return sympy.sqrt(self.group())
        raise _Refused(f"unexpected {tok!r}")

    def group(self) -> sympy.Expr:
        self.take("{")
        value = self.expr()
        self.take("}")
        return value


def _divide(a: sympy.Expr, b: sympy.Expr) -> sympy.Expr:
    if b.is_zero:
        raise _Refused("division by zero")
    return a / b


def _bounded_power(base: sympy.Expr, e: int, count: int) -> sympy.Expr:
    """base**e, refusing a result too large to build: |p|, q of a rational result under MAX_BITS bits."""
    if count > MAX_POWERS:
        raise _Refused("too many powers")
    if base.is_Rational:
        if max(abs(base.p).bit_length(), base.q.bit_length()) * abs(e) > MAX_BITS:
            raise _Refused("power too large")
        if base == 0 and e < 0:
            raise _Refused("division by zero")
    return base**e


def _parse_expression(s: str, max_len: int = MAX_EXPR_LEN) -> sympy.Expr | None:
    """Whitelisted expression string -> SymPy object, or None if it is refused. Commas are thousands separators."""
    if len(s) > max_len:
        return None
    try:
        parser = _Parser(_tokenize(s.replace("\\,", " ").replace(",", "")))
        value = parser.expr()
        return value if parser.peek() is None else None  # trailing tokens: "1 2", "3)"
    except _Refused:
        return None


# ---------------------------------------------------------------------------------------------- S1: time limit
class _Timeout(BaseException):
    """BaseException, so that SymPy's internal `except Exception` clauses cannot swallow it."""


def _call_with_timeout(fn: Callable[[], bool], timeout_s: float) -> bool:
    """fn() under a wall-clock limit; raises _Timeout when it is exceeded.

    Main thread of the main interpreter on Unix, no interval timer already armed: SIGALRM via setitimer, which
    interrupts Python-level work such as simplify (not a single long C call: hence the size limits above).
    Otherwise: fn runs in a daemon thread and we stop waiting after timeout_s; a thread cannot be killed, so a
    slow comparison keeps running in the background until it returns, but the reward is already 0.
    """
    use_alarm = (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
                 and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    return _with_alarm(fn, timeout_s) if use_alarm else _with_thread(fn, timeout_s)


def _with_alarm(fn: Callable[[], bool], timeout_s: float) -> bool:
    armed = True

    def on_alarm(signum, frame):
        if armed:  # a late signal after fn() returned is ignored
            raise _Timeout

    try:
        previous = signal.signal(signal.SIGALRM, on_alarm)
    except ValueError:  # a sub-interpreter's main thread cannot set handlers
        return _with_thread(fn, timeout_s)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s, 0.05)  # re-fires every 50 ms should a bare except eat one
        try:
            return fn()
        finally:
            armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)


def _with_thread(fn: Callable[[], bool], timeout_s: float) -> bool:
    result: list = []
    worker = threading.Thread(target=lambda: result.append(_catch(fn)), daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise _Timeout
    return result[0]


def _catch(fn: Callable[[], bool]) -> bool:
    try:
        return fn()
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------- S1: reward
def _truth_expr(answer: str | float | int) -> sympy.Expr:
    """Trusted ground truth -> SymPy: numbers exactly (0.75 -> 3/4), strings through the same safe parser."""
    if isinstance(answer, (int, float)):
        f = _to_fraction(answer)
        return sympy.Rational(f.numerator, f.denominator)
    value = _parse_expression(answer, max_len=len(answer))
    if value is None:
        raise ValueError(f"ground truth {answer!r} is not a parseable expression")
    return value


def _symbolic_equal(expression: str, truth: sympy.Expr, max_len: int) -> bool:
    pred = _parse_expression(expression, max_len)
    if pred is None:
        return False
    diff = pred - truth
    if diff == 0 or diff.is_Rational:  # exact numbers: no simplify needed
        return diff == 0
    return sympy.simplify(diff) == 0  # S1's SymPyEvaluate(y) = A*: simplify(a − b) == 0


def sympy_reward(text: str, answer: str | float | int, *, timeout_s: float = 2.0,
                 max_len: int = MAX_EXPR_LEN) -> float:
    """The S1 oracle: 1.0 if the final answer of `text` (see extract_final_answer) equals `answer` symbolically,
    i.e. simplify(a − b) == 0, else 0.0. "3/4", "0.75", "\\frac{3}{4}" and "\\boxed{\\frac{3}{4}}" all equal 0.75.

    0.0 also when no answer is found, it is refused by the safe parser, or parsing + comparison together take
    longer than timeout_s. The ground truth is trusted and must parse (ValueError otherwise).
    """
    truth = _truth_expr(answer)
    expression = extract_final_answer(text, max_len)
    if expression is None:
        return 0.0
    try:
        equal = _call_with_timeout(lambda: _symbolic_equal(expression, truth, max_len), timeout_s)
    except (_Timeout, Exception):  # too slow, or SymPy failing on odd input (RecursionError, …): no reward
        return 0.0
    return 1.0 if equal else 0.0  # [S1] R = 1 if SymPyEvaluate(y) = A*, else 0


# ---------------------------------------------------------------------------------------------- S2
def long_multiplication_steps(a: int, b: int) -> list[int]:
    """Reference steps s*_1 … s*_T for a × b: the partial products of long multiplication, then the product.

    [decided] steps = partial products followed by the product (SPEC.md). Partial product k is a × (k-th digit of b
    from the least significant) × 10^k, shifted by its place value (so 123 × 456 -> 738, 6150, 49200, 56088).
    Our choice: a zero digit's partial product (0) is left out, since "0" would match almost any text. a, b >= 0.
    """
    if a < 0 or b < 0:
        raise ValueError("long multiplication steps are defined for non-negative integers")
    partials = [a * int(d) * 10**k for k, d in enumerate(reversed(str(b))) if d != "0"]  # least significant first
    return partials + [a * b]  # [decided] the partial products, then the product (SPEC.md)


def partial_credit_reward(text: str, a: int, b: int) -> float:
    """S2: R = (1/T)·Σ_t 1{s*_t appears in the completion}, s* = long_multiplication_steps(a, b).

    [decided] "appears" = occurs in the text with commas removed (SPEC.md). Our choice: as a whole number, i.e. a
    maximal digit run equal to str(s*_t), so "7380" or "17380" does not count as 738 (nor "0738").
    """
    steps = long_multiplication_steps(a, b)
    # [decided] a step counts when it appears in the text with commas removed (SPEC.md); whole numbers only
    runs = set(re.findall(r"\d+", text.replace(",", "")))
    return sum(str(s) in runs for s in steps) / len(steps)  # [S2]
