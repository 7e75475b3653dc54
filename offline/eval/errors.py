"""The one error type of ``guardrail eval``: a problem the user can fix, said in one line."""

from __future__ import annotations


class EvalError(Exception):
    """An input the evaluation cannot run with (unknown suite or judge, a dataset file with the
    wrong columns, a model that cannot load, an endpoint that does not answer). The command
    prints its message as one line, never a traceback."""
