"""The one error type of ``guardrail eval``: a problem the user can fix, said in one line."""

from __future__ import annotations

import re


class EvalError(Exception):
    """An input the evaluation cannot run with (unknown suite or judge, a dataset file with the
    wrong columns, a model that cannot load, an endpoint that does not answer). The command
    prints its message as one line, never a traceback."""


_MARKUP = re.compile(r"\[/?(?:bold|italic|dim|red|green|yellow|blue|magenta|cyan)\]")


def plain(text: str) -> str:
    """``text`` without the rich console markup Inspect puts in its errors
    (``[bold][blue]OPENAI_API_KEY[/blue][/bold]``)."""
    return _MARKUP.sub("", text)
