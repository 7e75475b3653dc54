"""A fake LLM judge for the fake OpenAI server: answers the llm-judge guard's prompt the way a
real judge model would, from the text between the judged markers, with keyword rules.

    judge = FakeJudge(rules={"nerve agent": "S9"})
    app = create_fake_openai_app(responder=judge.respond, models=("judge",))

It finds the markers as a model reading the prompt would: the id is announced in the system
message, and the judged text is what lies between ``<judged-ID>`` and ``</judged-ID>`` in the
user message. ``judge.seen`` records the judged texts; ``judge.output`` replaces the answer
(malformed answers); ``judge.score`` is the score for matched text (``1 - score`` otherwise;
None leaves the score out).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.openai_server import FakeReply

_NONCE = re.compile(r"<judged-([0-9a-f]+)>")


@dataclass
class FakeJudge:
    rules: dict[str, str] = field(default_factory=lambda: {
        "nerve agent": "S9", "pipe bomb": "S9", "launder": "S2",
    })
    score: float | None = 0.95
    """None: the answer has no score (some judges give only the verdict)."""
    output: str | None = None
    fence_answer: bool = False
    """Wrap the JSON in a markdown code fence and prose, as judges without JSON mode do."""
    seen: list[str] = field(default_factory=list)
    nonces: list[str] = field(default_factory=list)

    def judged_text(self, body: dict[str, Any]) -> str:
        messages = body["messages"]
        system, user = messages[0]["content"], messages[1]["content"]
        found = _NONCE.search(system)
        if found is None:
            raise AssertionError("the system message announces no marker id")
        nonce = found.group(1)
        self.nonces.append(nonce)
        start = user.index(f"<judged-{nonce}>\n") + len(f"<judged-{nonce}>\n")
        end = user.index(f"\n</judged-{nonce}>", start)
        return str(user[start:end])

    def respond(self, body: dict[str, Any]) -> FakeReply:
        text = self.judged_text(body)
        self.seen.append(text)
        if self.output is not None:
            return FakeReply(reasoning="", answer=self.output, reasoning_format="none")
        lowered = text.lower()
        codes = [code for keyword, code in self.rules.items() if keyword in lowered]
        unsafe = bool(codes)
        verdict: dict[str, Any] = {
            "unsafe": unsafe,
            "categories": sorted(set(codes)),
            "reason": "gives harmful detail" if unsafe else "no harmful content",
        }
        if self.score is not None:
            verdict["score"] = self.score if unsafe else round(1 - self.score, 6)
        answer = json.dumps(verdict)
        if self.fence_answer:
            answer = f"Here is my assessment.\n```json\n{answer}\n```\nThat is all."
        return FakeReply(reasoning="", answer=answer, reasoning_format="none")
