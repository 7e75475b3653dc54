"""An Inspect hook that releases, when a run ends and in the loop that opened them, what a run's
judges and models hold: the guards' clients and the model clients' connections.

Inspect closes neither a model passed to it nor a memoized judge model; their HTTP connections
would outlive the run's event loop. A model is closed and re-initialised (as Inspect's own
credential refresh does), so an eval set's retry, a new run, can use it again.
"""

from __future__ import annotations

from inspect_ai.hooks import Hooks, RunEnd, hooks
from inspect_ai.model import Model

from offline.eval.judges import close_judges

_MODELS: dict[int, Model] = {}


def track(model: Model) -> Model:
    """Closes ``model``'s connections when the run ends."""
    _MODELS[id(model)] = model
    return model


@hooks(name="guardrail-eval-judges", description="Closes guardrail eval's judges at run end.")
class CloseJudges(Hooks):
    async def on_run_end(self, data: RunEnd) -> None:
        await close_judges()
        for model in list(_MODELS.values()):
            await model.api.aclose()
            model.api.initialize()
