"""Math answers graded with math-verify, as the reasoning papers do: ``verify(parse(gold),
parse(pred))`` in that order, the gold wrapped as ``$…$``.

math-verify times itself out with signals, which work only in a process's main thread; the
evaluation's scorers run on Inspect's loop, so they grade in one worker process
(``grade_async``), and tests call ``grade`` directly.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

_POOL: ProcessPoolExecutor | None = None


def grade(gold: str, prediction: str) -> bool:
    from math_verify import parse, verify

    gold_text = gold if "$" in gold or "\\boxed" in gold else f"${gold}$"
    parsed_gold = parse(gold_text)
    parsed_prediction = parse(prediction)
    if not parsed_gold or not parsed_prediction:
        return False
    return bool(verify(parsed_gold, parsed_prediction))


async def grade_async(gold: str, prediction: str) -> bool:
    global _POOL
    if _POOL is None:
        _POOL = ProcessPoolExecutor(max_workers=1,
                                    mp_context=multiprocessing.get_context("spawn"))
    return await asyncio.get_running_loop().run_in_executor(_POOL, grade, gold, prediction)


def shutdown() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.shutdown(wait=True, cancel_futures=True)
        _POOL = None
