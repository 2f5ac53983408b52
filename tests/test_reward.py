"""Tests of reward.py: the paper's parser [P1], the safe SymPy oracle [S1], multiplication partial credit [S2].

Hand-worked S2 example (long multiplication of 123 × 456, digits of 456 from the least significant):

      123
    × 456
    -----
      738     123 × 6        = 738      s*_1
     6150     123 × 5 × 10   = 6150     s*_2
    49200     123 × 4 × 100  = 49200    s*_3
    -----
    56088     the product    = 56088    s*_4      T = 4
"""
import os
import signal
import threading
import time

import pytest
import sympy

import reward
from reward import (exact_match_reward, extract_final_answer, long_multiplication_steps, parse_last_int,
                    partial_credit_reward, sympy_reward)

HANG_GUARD_S = 2.0  # generous wall-clock sanity bound for hostile inputs (a hang guard, not a benchmark)


# ---------------------------------------------------------------------------------------------- P1
@pytest.mark.parametrize("text, expected", [
    ("1,234", 1234),                              # Appendix B: commas removed first
    ("I think 12, no 7", 7),                      # the last integer wins
    ("12 then 7", 7),
    ("The total is 1,234,567 apples.", 1234567),
    ("-5", -5),                                   # [decided] the minus sign belongs to the integer
    ("it drops to -12 degrees", -12),
    ("3.5", 5),                                   # the rule reads integers 3 and 5, not a decimal
    ("3-4", -4),                                  # a hyphen before a digit reads as a minus sign
    ("no number", None),
    ("", None),
])
def test_parse_last_int(text, expected):
    assert parse_last_int(text) == expected


@pytest.mark.parametrize("text, answer, expected", [
    ("Answer: 145", 145.0, 1.0),        # SVAMP stores answers as floats
    ("Answer: 145", 145, 1.0),
    ("Answer: 146", 145.0, 0.0),
    ("so 18", "18", 1.0),               # GSM8K string after ####
    ("so 1,234", "1,234", 1.0),
    ("so 1234", " 1,234 ", 1.0),
    ("it is -3", "-3", 1.0),
    ("it is 2", 2.5, 0.0),              # a non-integral answer never matches an integer prediction
    ("it is 2.5", 2.5, 0.0),            # P1 reads 5 here
    ("no number at all", 0, 0.0),       # no integer -> 0, even against 0
])
def test_exact_match_reward(text, answer, expected):
    assert exact_match_reward(text, answer) == expected


# ---------------------------------------------------------------------------------------------- S1 extraction
@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{\\frac{3}{4}} done", "\\frac{3}{4}"),              # balanced braces
    ("\\boxed{1} then \\boxed{2}", "2"),                             # the last box
    ("\\boxed{1} and \\boxed{2", "2"),                               # unclosed last box: falls through
    ("The answer is 0.75.", "0.75"),                                 # trailing period dropped
    ("the answer is: 18 apples.\nok", "18"),                         # stops at the first word
    ("The answer is $\\frac{1}{2}$.", "$\\frac{1}{2}$"),
    ("The answer is 5. Wait, the answer is 6", "6"),                 # last "answer is"
    ("blah\n#### 1,234", "1,234"),
    ("I get 3/4 of 12, i.e. 9", "9"),
    ("roughly 3/4", "3/4"),
    ("so \\frac{3}{4} of it", "\\frac{3}{4}"),                     # last-number rule reads \frac{a}{b} whole
    ("a loss of -\\frac{1}{2}", "-\\frac{1}{2}"),
    ("1,234.5 total", "1234.5"),
    ("nothing here", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_extraction_order_boxed_then_answer_is_then_hashes():
    assert extract_final_answer("answer is 2 \\boxed{1} #### 3") == "1"
    assert extract_final_answer("#### 3\nthe answer is 2") == "2"
    assert extract_final_answer("#### 3 and then 4") == "3"


# ---------------------------------------------------------------------------------------------- S1 reward
@pytest.mark.parametrize("text", [
    "3/4", "0.75", "\\frac{3}{4}", "\\dfrac{3}{4}", "\\boxed{\\frac{3}{4}}", "The answer is 0.75.",
    "The answer is $\\frac{3}{4}$.", "\\boxed{0.750}", "\\boxed{\\frac{6}{8}}", "\\boxed{1 - \\frac{1}{4}}",
])
@pytest.mark.parametrize("answer", ["3/4", 0.75, "0.75", "\\frac{3}{4}"])
def test_sympy_reward_equivalent_forms(text, answer):
    assert sympy_reward(text, answer) == 1.0


@pytest.mark.parametrize("text, answer", [
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),       # GSM8K style
    ("#### 18", "18"),
    ("#### 18", 18),
    ("#### 1,234", "1234"),
    ("\\boxed{(1+\\sqrt{2})^2}", "3 + 2\\sqrt{2}"),             # needs simplify: (1+√2)² − (3+2√2) = 0
    ("\\boxed{2^{10}}", "1024"),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"),
    ("\\boxed{2 \\times 3 \\cdot 4}", "24"),
    ("\\boxed{-2^2}", "-4"),                                    # power binds tighter than the sign
    ("\\boxed{\\left(1+2\\right)^{-1}}", "1/3"),
    ("The answer is 25%.", "25"),                               # our choice: % is a unit, not /100
])
def test_sympy_reward_matches(text, answer):
    assert sympy_reward(text, answer) == 1.0


@pytest.mark.parametrize("text, answer", [
    ("\\boxed{\\frac{2}{3}}", "3/4"),       # wrong value
    ("The answer is 0.76.", 0.75),
    ("#### 17", "18"),
    ("no answer here", "18"),
    ("The answer is x + 1", "18"),          # no expression after the marker: falls through to the last number, 1
    ("\\boxed{1/0}", "18"),                 # division by zero refused
    ("The answer is 0.3333333", "1/3"),     # near misses: an exact answer, never one within a tolerance
    ("The answer is 0.7500001", 0.75),
    ("\\boxed{0.3333333}", "\\frac{1}{3}"),
    ("#### 18.000001", "18"),
])
def test_sympy_reward_mismatches(text, answer):
    assert sympy_reward(text, answer) == 0.0


def test_hostile_code_is_never_executed():
    marker = "/tmp/tokrl_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    payload = "__import__('os').system('touch /tmp/tokrl_pwned')"
    for text in (payload, f"\\boxed{{{payload}}}", f"The answer is {payload}", f"#### {payload}"):
        start = time.monotonic()
        assert sympy_reward(text, "0") == 0.0
        assert time.monotonic() - start < HANG_GUARD_S
    assert reward._parse_expression(payload) is None
    assert not os.path.exists(marker)


@pytest.mark.parametrize("expression", [
    "9**9**9**9",                # a^b^c refused
    "9^9^9^9",
    "2^(10^100)",                # exponent must be an integer literal
    "2^{100}",                   # |e| > 64
    "(10^60)^60",                # 200 bits × 60 > 4096 bits
    "(1/10^60)^60",              # the denominator too: 200 bits × 60 > 4096 bits
    "((2^8)^8)^8^8",
    "(" * 150 + "1" + ")" * 150,  # nested too deeply (and no RecursionError)
    "1+" * 100 + "1",            # 201 characters > max_len
    "1 2",                       # trailing tokens
    "\\input{x}", "\\text{5}", "a", "5_0", "'5'", "[5]",
])
def test_parser_refuses(expression):
    assert reward._parse_expression(expression) is None


def test_parser_accepts_bounded_powers():
    assert reward._parse_expression("2^{64}") == 2**64
    assert reward._parse_expression("(2^8)^8") == 2**64
    assert reward._parse_expression("2**-2") == sympy.Rational(1, 4)
    assert reward._parse_expression("-" * 150 + "1") == 1  # 150 signs: even count, iterative, no recursion


@pytest.mark.parametrize("text, answer", [
    ("\\boxed{9**9**9**9}", "18"),
    ("The answer is 9**9**9**9", "18"),
    ("\\boxed{2^(10^100)}", "18"),
    ("1+" * 50000, "18"),                                     # 100 kB, no marker: last number 1
    ("The answer is " + "1+" * 50000 + "1", "50001"),         # the true value, but far over max_len
    ("x" * 100_000 + " The answer is " + "1+" * 150 + "1", "151"),  # 301 characters > 200: refused
    ("\\boxed{" * 30_000, "18"),                              # 210 kB of unclosed boxes
    ("(" * 100_000, "18"),
    ("1" * 100_000, "18"),
])
def test_hostile_inputs_score_zero_fast(text, answer):
    start = time.monotonic()
    assert sympy_reward(text, answer) == 0.0
    assert time.monotonic() - start < HANG_GUARD_S


def test_only_the_last_max_scan_chars_characters_are_read():
    """A final answer further back than reward.MAX_SCAN_CHARS characters from the end is not seen (the window keeps the
    scan of a hostile 100 kB completion linear and short); one inside the window is. The bug it is written for: the
    whole completion scanned."""
    answer = "\\boxed{18}"
    assert sympy_reward(answer + " " * (reward.MAX_SCAN_CHARS - len(answer)), "18") == 1.0  # the window's first chars
    assert sympy_reward(answer + " " * reward.MAX_SCAN_CHARS, "18") == 0.0  # just before the window: nothing found


def test_length_cap_control_case():
    # the same shape as the refused case above, short enough: 11 ones sum to 11
    assert sympy_reward("x" * 100_000 + " The answer is " + "1+" * 10 + "1", "11") == 1.0


def _slow_simplify(expr):
    time.sleep(3.0)
    return sympy.Integer(0)


SLOW_TEXT, SLOW_ANSWER = "\\boxed{(1+\\sqrt{2})^2}", "3 + 2\\sqrt{2}"  # difference is not trivially 0: simplify runs


def test_timeout_with_alarm_on_main_thread(monkeypatch):
    assert threading.current_thread() is threading.main_thread()
    handler_before = signal.getsignal(signal.SIGALRM)
    monkeypatch.setattr(reward.sympy, "simplify", _slow_simplify)
    start = time.monotonic()
    assert sympy_reward(SLOW_TEXT, SLOW_ANSWER, timeout_s=0.2) == 0.0
    assert time.monotonic() - start < 0.2 + 0.5
    assert signal.getsignal(signal.SIGALRM) is handler_before   # previous handler restored
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0          # no timer left armed


def test_real_slow_simplify_is_cut_off():
    # (1+√2+√3+√5)^64 − 1: simplify expands a huge radical expression (seconds); the alarm stops it
    start = time.monotonic()
    assert sympy_reward("\\boxed{(1+\\sqrt{2}+\\sqrt{3}+\\sqrt{5})^{64}}", "1", timeout_s=0.3) == 0.0
    assert time.monotonic() - start < 0.3 + 1.0


def test_timeout_with_thread_fallback_off_main_thread(monkeypatch):
    monkeypatch.setattr(reward.sympy, "simplify", _slow_simplify)
    out = {}

    def run():
        start = time.monotonic()
        out["reward"] = sympy_reward(SLOW_TEXT, SLOW_ANSWER, timeout_s=0.2)
        out["elapsed"] = time.monotonic() - start

    caller = threading.Thread(target=run)
    caller.start()
    caller.join(5.0)
    assert out["reward"] == 0.0
    assert out["elapsed"] < 0.2 + 0.5


def test_fast_comparison_off_main_thread_still_scores():
    out = {}
    caller = threading.Thread(target=lambda: out.setdefault("r", sympy_reward(SLOW_TEXT, SLOW_ANSWER)))
    caller.start()
    caller.join(10.0)
    assert out["r"] == 1.0


def test_bad_ground_truth_raises():
    with pytest.raises(ValueError):
        sympy_reward("#### 18", "eighteen")


# ---------------------------------------------------------------------------------------------- S2
def test_long_multiplication_steps_hand_worked():
    assert long_multiplication_steps(123, 456) == [738, 6150, 49200, 56088]


def test_long_multiplication_steps_drop_zero_digits():
    # 123 × 105: digit 5 -> 615, digit 0 -> dropped, digit 1 -> 12300; product 12915
    assert long_multiplication_steps(123, 105) == [615, 12300, 12915]


@pytest.mark.parametrize("text, expected", [
    ("738 + 6150 + 49200 = 56088", 1.0),                  # all four steps
    ("738 + 6,150 + 49,200 = 56,088", 1.0),               # commas removed
    ("first 738, then the result 56088", 0.5),            # 2 of 4
    ("7380 and 56088", 0.25),                             # 7380 is not 738
    ("17380, 0738, 73.8", 0.0),                           # no whole-number 738 (73.8 reads as 73 and 8)
    ("nothing", 0.0),
])
def test_partial_credit_reward(text, expected):
    assert partial_credit_reward(text, 123, 456) == expected


# ---------------------------------------------------------------------------------------------- untrusted output
def test_a_last_integer_over_python_s_4300_digit_limit_never_raises():
    """int() refuses a string of more than 4,300 digits (ValueError); the rewards read model output and must
    return a value for any string, a digit run past int()'s limit too."""
    huge = "7" * 5000
    assert parse_last_int(f"the answer is {huge}") == int("7" * 2500) * 10 ** 2500 + int("7" * 2500)
    assert parse_last_int("-" + "0" * 4999 + "12") == -12
    assert exact_match_reward(f"so {huge}", 77) == 0.0
    assert exact_match_reward("0" * 6000 + "77", 77) == 1.0  # leading zeros: the value is still 77
    assert exact_match_reward("1" + "0" * 6000, 10 ** 6000) == 1.0  # a true answer that long still matches
    assert sympy_reward(f"#### {huge}", "7") == 0.0
    assert partial_credit_reward(f"{huge} 738 6150", 123, 456) == 0.5


@pytest.mark.parametrize("seed", range(3))
def test_every_reward_returns_a_number_for_random_hostile_strings(seed):
    import random
    rng = random.Random(seed)
    alphabet = "0123456789-,.+*/^()\\{}boxed answer is ####\n\t ٣५" + "".join(map(chr, range(0x2000, 0x2010)))
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        if rng.random() < 0.2:
            text += "9" * rng.randint(4000, 9000)
        for r in (exact_match_reward(text, 145.0), sympy_reward(text, "3/4", timeout_s=0.5),
                  partial_credit_reward(text, 123, 456)):
            assert 0.0 <= r <= 1.0
