"""How a signal stops a run: the first asks, the second stops at once.

    StopRequest   while a run's steps go on (training.train): the first Ctrl-C or SIGTERM asks the loop to stop after
                  the current step (or between an evaluation's batches), checkpoint and exit; a second raises
                  Interrupted
    interrupt     outside the steps (the checks, the loading; train.py): SIGTERM stops at once, as Ctrl-C does
    Interrupted   a KeyboardInterrupt that carries the shell's exit status, 128 + the signal's number

What a stopped run prints and leaves on disk is training.py's (Trainer.what_is_safe, Trainer.resume_verb).
"""
from __future__ import annotations

import signal

from distributed import env_rank


class Interrupted(KeyboardInterrupt):
    """A signal that stops the process at once: `status` is the shell's 128 + the signal's number (130 for SIGINT,
    143 for SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.status = 128 + signum


def interrupt(signum: int, _frame=None):
    """A handler for SIGTERM outside a run's steps (the checks, the loading): stop at once, as Ctrl-C does."""
    raise Interrupted(signum)


class StopRequest:
    """First Ctrl-C (or SIGTERM, among `signals`): finish the current step, checkpoint, exit. Second: stop at once
    (the last checkpoint stays). train.py listens to SIGTERM too, a scheduler's stop (Kubernetes, docker stop, SLURM,
    torchrun passing it on); mini.py's pool workers keep its default, which their pool's terminate() relies on.
    `status`: the exit status of a run that a first signal stopped before its end: 0 after Ctrl-C (the user asked),
    143 after SIGTERM (128 + its number: what a scheduler reads as stopped, not finished); None while nothing did."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT,)):
        self.signals, self.requested, self.signum, self.status = signals, False, None, None

    def __enter__(self):
        self.old = {s: signal.signal(s, self.handle) for s in self.signals}
        return self

    def handle(self, signum, _frame=None):
        if self.requested:
            raise Interrupted(signum)
        self.requested, self.signum = True, signum
        again = "Ctrl-C again to quit now" if signum == signal.SIGINT else "a second signal stops at once"
        if env_rank() == 0:  # N processes (torchrun passes the signal on to each): rank 0 alone says it
            name = "" if signum == signal.SIGINT else f"{signal.Signals(signum).name}: "
            print(f"\n{name}stopping after this step ({again}; the last checkpoint stays)", flush=True)

    def stopped_early(self) -> None:
        self.status = 0 if self.signum in (None, signal.SIGINT) else 128 + self.signum

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)
