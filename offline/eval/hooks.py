"""An Inspect hook that closes the judges a run built (their HTTP clients, their models) in the
loop that built them, when the run ends; and the math grader's worker process."""

from __future__ import annotations

from inspect_ai.hooks import Hooks, RunEnd, hooks

from offline.eval.judges import close_judges
from offline.eval.mathgrade import shutdown


@hooks(name="guardrail-eval-judges", description="Closes guardrail eval's judges at run end.")
class CloseJudges(Hooks):
    async def on_run_end(self, data: RunEnd) -> None:
        await close_judges()
        shutdown()
