"""Progress for long work: the evaluation (3,000 multiplication problems) shows a tqdm bar on a terminal and writes
nothing when stderr is not a terminal (CI logs, `> log 2>&1`), with the same result either way."""
from __future__ import annotations

import io
import sys

import pretrained
import tokenizer
import tasks
import evaluation
import settings


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def evaluate_into(stream: io.StringIO, tiny_dir, monkeypatch) -> dict:
    monkeypatch.setattr(sys, "stderr", stream)  # tqdm writes to sys.stderr as it is when the bar is made
    net, tok = pretrained.load_model(tiny_dir), tokenizer.Tokenizer(tiny_dir / "tokenizer.json")
    cfg = settings.Settings(device="cpu", eval_limit=5, eval_batch=2, max_new_tokens=4)
    return evaluation.evaluate(net, tok, tasks.make_task("mult", tok), cfg, eos=(256,))


def test_evaluation_bar_on_a_terminal_only(tiny_dir, monkeypatch):
    terminal, log = Terminal(), io.StringIO()
    shown = evaluate_into(terminal, tiny_dir, monkeypatch)
    quiet = evaluate_into(log, tiny_dir, monkeypatch)
    assert "eval mult" in terminal.getvalue() and "0/5 [" in terminal.getvalue()
    assert log.getvalue() == ""
    assert (shown["n"], shown["accuracy"], shown["examples"]) == (quiet["n"], quiet["accuracy"], quiet["examples"]) \
        and shown["n"] == 5
