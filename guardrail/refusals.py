"""The refusal rule: a sentence that declines or redirects is never cut as unsafe.

Guards trained on harmful conversations score a refusal that names the harmful topic ("I can't
help with making a pipe bomb") close to the harm itself; cutting it makes a correction loop on
its own safe answer. The step checker applies this rule before any guard, so it holds for every
backend alike: the declining and redirecting sentences are taken out of the step, and the guard
judges what is left (nothing left: the step is safe without a guard call). It is deliberately
narrow: a decline is first person, a step that commits to help (the compliance-cue rules) is
judged whole, and so is one where a decline turns ("but", "here's") to anything other than an
offer of safe help ("I can't give exact amounts, but you'd need…").
"""

from __future__ import annotations

import re

from guardrail.guards.plumbing.cues import commits_to_help

_WONT = (r"(?:can(?:no|')t|cannot|can\ not|won't|will\ not|am\ not\ able\ to|'m\ not\ able\ to"
         r"|am\ unable\ to|'m\ unable\ to|shouldn't|should\ not|must\ not|mustn't|do\ not"
         r"|don't|am\ not\ going\ to|'m\ not\ going\ to|refuse\ to|decline\ to)")
_DO = (r"(?:help|assist|provide|give|share|support|create|write|offer|comply|fulfil|fulfill|do"
       r"|engage|generate|produce|explain|describe|detail|walk|list|tell|go\ into|participate"
       r"|answer|continue|be\ of\ help)")

_DECLINE = re.compile(
    rf"""(?ix)
    \bI\ {_WONT}\ (?:\w+\ )?{_DO}\b
    |\bI(?:\ must|\ have\ to|\ need\ to|\ will|'ll|\ should|\ am\ going\ to|'m\ going\ to)
      \ (?:politely\ |firmly\ |clearly\ |respectfully\ )?(?:refuse|decline)\b
    |\b(?:sorry|apologi[sz]e)\b[^.!?\n]{{0,40}}\bI\ (?:can(?:no|')t|cannot|won't|am\ unable)
    |\bI'm\ not\ (?:comfortable|willing)\b
    |\bthat's\ not\ something\ I\ (?:can|will)\b
    |\bI\ can\ not\ help\b
    """
)

_REDIRECT = re.compile(
    r"""(?ix)
    \b(?:please|you\ should|you\ can|I'd\ encourage\ you\ to|I\ encourage\ you\ to|consider)
      \ (?:contact|reach\ out|call|talk\ to|speak\ (?:to|with)|seek|get\ in\ touch)
    |\bif\ you\ (?:or\ someone\ you\ know\ )?(?:are|'re)\ (?:struggling|in\ crisis|in\ danger
      |having\ thoughts|feeling)
    |\bif\ you\ know\ of\ someone\ (?:planning|who)
    |\binstead,?\ I\ (?:can|could|'d\ be\ happy\ to|am\ happy\ to)
    |\bI(?:'d|\ would)\ be\ (?:happy|glad)\ to\ help\ with\ (?:something|a\ related|anything)
    """
)

# After a decline, "but" may only turn to an offer of safe help.
_PIVOT = re.compile(
    r"(?i)[,;:]?\s*\b(?:but|however|though|although|that said|anyway|here(?:'s| is| are))\b"
    r",?\s*(.*)$", re.S)
_SAFE_OFFER = re.compile(
    r"""(?ix)^(?:I\ (?:can|could|'m\ happy\ to|am\ happy\ to|'d\ be\ happy\ to|would\ be\ happy
      \ to)\ (?:help|talk|tell|explain|share|point|suggest|offer|discuss|give\ you\ (?:general
      |some\ )?(?:information|context|resources))|if\ you|you\ (?:can|could|might|may)
      \ (?:contact|reach|talk|call|consider|look)|here\ are\ some\ (?:safe|resources|helplines))
    """
)
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")


def split_refusal(step: str) -> tuple[bool, str]:
    """Whether ``step`` declines or redirects, and the rest of it for the guard to judge.

    ``(False, step)`` when it does neither, commits to help, or turns from a decline to
    something other than safe help; otherwise ``(True, rest)`` where ``rest`` is the step
    without its declining and redirecting sentences (often empty)."""
    text = step.replace("\u2019", "'")
    if commits_to_help(text):
        return False, step
    found = False
    kept: list[str] = []
    for sentence in _SENTENCE.findall(text):
        decline = _DECLINE.search(sentence)
        if decline is not None:
            pivot = _PIVOT.search(sentence, decline.end())
            if pivot is not None and not _SAFE_OFFER.match(pivot.group(1).strip()):
                return False, step
            found = True
        elif _REDIRECT.search(sentence):
            found = True
        else:
            kept.append(sentence)
    if not found:
        return False, step
    return True, "".join(kept).strip()
