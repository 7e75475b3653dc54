"""Math answers graded with math-verify, as the reasoning papers do: ``verify(parse(gold),
parse(pred))`` in that order, the gold wrapped as ``$…$``.

math-verify bounds its own time with ``signal.alarm``, which works only in a process's main
thread. Inspect's scorers run on its event loop, which is the main thread when ``guardrail eval``
runs it; elsewhere (a loop in a worker thread) grading runs without that bound. A worker process
would avoid both, but a spawned child re-imports the caller's ``__main__``, and the grading takes
milliseconds, so it stays in-process.
"""

from __future__ import annotations

import threading


def grade(gold: str, prediction: str) -> bool:
    from math_verify import parse, verify

    timed = threading.current_thread() is threading.main_thread()
    timeout = 5 if timed else None
    gold_text = gold if "$" in gold or "\\boxed" in gold else f"${gold}$"
    parsed_gold = parse(gold_text, parsing_timeout=timeout)
    parsed_prediction = parse(prediction, parsing_timeout=timeout)
    if not parsed_gold or not parsed_prediction:
        return False
    return bool(verify(parsed_gold, parsed_prediction, timeout_seconds=timeout))


async def grade_async(gold: str, prediction: str) -> bool:
    return grade(gold, prediction)
