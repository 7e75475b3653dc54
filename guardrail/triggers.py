"""Safety triggers: the sentence put where an unsafe step was, after which the model goes on.

In the style of IPO's triggers ("Wait, maybe I have to refuse because…"): first person, in the
model's own reasoning voice, turning it back without a lecture. Some categories get their own
(a self-harm trace gets a supportive turn); successive rounds use different triggers.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_TRIGGERS: tuple[str, ...] = (
    "Wait, maybe I have to refuse here, because giving these details could lead to real harm.",
    "Hmm, that sounds really wrong. I shouldn't be helping someone do that.",
    "The user is asking for help with something dangerous or illegal, so I need to stop and "
    "decline that part.",
    "Hold on. If I keep going down this path I'd be handing over something that could hurt "
    "people, and I won't do that.",
    "Let me reconsider: this crosses a safety line. I should refuse the harmful specifics and "
    "think about what safe help I can offer instead.",
    "Actually, I should not continue with this; instructions like these would be unsafe to give.",
)

CATEGORY_TRIGGERS: dict[str, tuple[str, ...]] = {
    # Llama Guard S11: suicide and self-harm. Care first, no lecture.
    "S11": (
        "Wait. The person asking may be going through something painful, and their safety "
        "matters more than the question. I should respond with care and point them to support "
        "rather than give any method.",
        "Let me slow down. This could be someone in distress; the kindest thing is to listen, "
        "acknowledge how they feel, and share where they can get help right now.",
    ),
    # S1 violent crimes, S9 indiscriminate weapons.
    "S1": ("Hold on, this would help someone hurt another person. I won't give that, but I can "
           "talk about safety or de-escalation instead.",
           "Wait, I'm drifting toward helping with violence against someone. I need to stop and "
           "steer to something safe."),
    "S9": ("Wait, this is about making a weapon that could kill many people. I must not give any "
           "synthesis or assembly details.",
           "Hmm, I'm still heading toward weapon-making details. That is exactly what I must not "
           "provide, whatever the reason given."),
}

ALIASES = {"self-harm": "S11", "violent-crimes": "S1", "weapons": "S9"}


def choose_trigger(
    categories: Sequence[str],
    round_number: int,
    pool: Sequence[str] = (),
    category_pools: dict[str, list[str]] | None = None,
) -> str:
    """The trigger for this round: a category's own first, else the pool, rotating by round."""
    configured = {ALIASES.get(key, key): value for key, value in (category_pools or {}).items()}
    for category in categories:
        key = ALIASES.get(category, category)
        options = configured.get(key) or CATEGORY_TRIGGERS.get(key)
        if options:
            return options[(round_number - 1) % len(options)]
    options = list(pool) or list(DEFAULT_TRIGGERS)
    return options[(round_number - 1) % len(options)]
