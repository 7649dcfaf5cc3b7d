"""Errors raised by the pipeline for bad inputs. Every message names the problem and the fix."""

from __future__ import annotations


class DataError(ValueError):
    """Input data (or the way it was asked for) cannot be used.

    Built from two parts so that no message can leave one out: ``problem`` says what is wrong,
    ``fix`` says what to do about it. ``str(err)`` is ``"<problem>. Fix: <fix>"``.
    """

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem.rstrip(". ")
        self.fix = fix.rstrip(". ")
        super().__init__(f"{self.problem}. Fix: {self.fix}.")

    def __reduce__(self):  # keep pickling (multiprocessing, Spark) working with two arguments
        return (type(self), (self.problem, self.fix))
