"""Cases to Label Studio tasks and review labels back: the common task JSON, so a team labels
cases in a tool it already runs and no review UI has to be built here.

A task's ``data`` carries what a reviewer needs (the prompt, what the client saw, what was
withheld, the corrections); its label is a ``Choices`` control named ``label`` over the three
review verdicts and an optional ``TextArea`` named ``note`` (``LABEL_CONFIG`` is the labelling
interface to paste into the project). A case already labelled goes out with its label as an
annotation, so a reviewer sees it; coming back, each task's latest annotation that was not
cancelled is its label. Both of Label Studio's JSON exports are read: the full one (tasks with
``data`` and ``annotations[].result[]``) and JSON-MIN (one flat object per task).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, get_args

from guardrail.cases.model import Case, ReviewLabel, ReviewVerdict
from guardrail.views import request_text

VERDICTS: tuple[str, ...] = get_args(ReviewVerdict)
LABEL_CONTROL = "label"
NOTE_CONTROL = "note"
TEXT_OBJECT = "prompt"
SOURCE = "label-studio"

LABEL_CONFIG = f"""<View>
  <Header value="Prompt"/>
  <Text name="{TEXT_OBJECT}" value="$prompt"/>
  <Header value="Reasoning the client saw"/>
  <Text name="reasoning" value="$reasoning"/>
  <Header value="Withheld: what the model wrote before it was stopped"/>
  <Text name="withheld" value="$withheld"/>
  <Header value="Inserted (trigger or rewrite) and the continuation"/>
  <Text name="correction" value="$correction"/>
  <Header value="Answer the client saw"/>
  <Text name="answer" value="$answer"/>
  <Header value="$summary"/>
  <Choices name="{LABEL_CONTROL}" toName="{TEXT_OBJECT}" choice="single" required="true">
    <Choice value="confirmed" hint="rightly flagged, and the correction is good"/>
    <Choice value="false_positive" hint="the guard was wrong: nothing unsafe"/>
    <Choice value="bad_correction" hint="rightly flagged, but the correction is not usable"/>
  </Choices>
  <TextArea name="{NOTE_CONTROL}" toName="{TEXT_OBJECT}" placeholder="note (optional)"
            maxSubmissions="1"/>
</View>
"""


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat().replace("+00:00", "Z")


def to_task(case: Case) -> dict[str, Any]:
    """One Label Studio task for a case."""
    messages = case.request.get("messages")
    prompt = request_text([message for message in messages if isinstance(message, dict)],
                          1_000_000) if isinstance(messages, list) else ""
    categories = sorted({category for flag in case.flagged for category in flag.categories})
    correction = "\n\n".join(
        f"[round {item.round}, {item.strategy}] {item.inserted}{item.continuation}"
        for item in case.corrections)
    task: dict[str, Any] = {
        "data": {
            "case_id": case.id,
            "prompt": prompt,
            "reasoning": case.client_reasoning,
            "withheld": case.withheld,
            "correction": correction,
            "answer": case.client_content,
            "action": case.action,
            "categories": categories,
            "model": case.model,
            "guard": case.guard,
            "created_at": _iso(case.created_at),
            "summary": f"{case.action}; categories: {', '.join(categories) or 'none'}; "
                       f"finish: {case.finish_reason or 'n/a'}",
        },
    }
    if case.review is not None:
        review = case.review
        result: list[dict[str, Any]] = [{
            "from_name": LABEL_CONTROL, "to_name": TEXT_OBJECT, "type": "choices",
            "value": {"choices": [review.label]},
        }]
        if review.note:
            result.append({"from_name": NOTE_CONTROL, "to_name": TEXT_OBJECT,
                           "type": "textarea", "value": {"text": [review.note]}})
        task["data"]["reviewed_by"] = review.by
        task["annotations"] = [{"result": result, "was_cancelled": False,
                                "created_at": _iso(review.at), "updated_at": _iso(review.at)}]
    return task


# -- reading labels back ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskLabel:
    case_id: str
    review: ReviewLabel


@dataclass(frozen=True, slots=True)
class TaskProblem:
    """A task that carries no usable label; ``unlabelled`` when it simply has none yet."""

    index: int
    case_id: str | None
    problem: str
    unlabelled: bool = False


def _verdict(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    word = "_".join(value.strip().lower().replace("-", " ").split())
    return word if word in VERDICTS else None


def _time(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def _who(value: Any) -> str:
    """``completed_by`` is a user id in most exports, an object with an email in some."""
    if isinstance(value, dict):
        value = value.get("email") or value.get("id")
    if isinstance(value, bool) or value is None or value == "":
        return SOURCE
    if isinstance(value, int):
        return f"{SOURCE}:user-{value}"
    return f"{SOURCE}:{value}"


def _full_task_label(index: int, case_id: str, task: dict[str, Any]) -> TaskLabel | TaskProblem:
    annotations = task.get("annotations") or []
    if not isinstance(annotations, list):
        return TaskProblem(index, case_id, "'annotations' is not a list")
    usable = [annotation for annotation in annotations
              if isinstance(annotation, dict) and not annotation.get("was_cancelled")
              and isinstance(annotation.get("result"), list)]
    labelled = []
    for annotation in usable:
        choices = [item for item in annotation["result"]
                   if isinstance(item, dict) and item.get("type") == "choices"
                   and item.get("from_name", LABEL_CONTROL) == LABEL_CONTROL]
        if choices:
            labelled.append((annotation, choices[0]))
    if not labelled:
        return TaskProblem(index, case_id, "no label yet", unlabelled=True)
    # The latest annotation wins (a reviewer's second look, or a second reviewer).
    annotation, choice = max(
        labelled, key=lambda pair: _time(pair[0].get("updated_at"))
        or _time(pair[0].get("created_at")) or 0.0)
    value = choice.get("value")
    picked = value.get("choices") if isinstance(value, dict) else None
    if not isinstance(picked, list) or len(picked) != 1 or _verdict(picked[0]) is None:
        return TaskProblem(index, case_id, f"label {picked!r} is not one of "
                                           f"{', '.join(VERDICTS)}")
    note = None
    for item in annotation["result"]:
        if isinstance(item, dict) and item.get("from_name") == NOTE_CONTROL:
            texts = (item.get("value") or {}).get("text")
            if isinstance(texts, list) and texts and isinstance(texts[0], str):
                note = "\n".join(str(text) for text in texts).strip() or None
    at = _time(annotation.get("updated_at")) or _time(annotation.get("created_at"))
    review = ReviewLabel.model_validate({
        "label": _verdict(picked[0]), "by": _who(annotation.get("completed_by")),
        "note": note, **({"at": at} if at is not None else {})})
    return TaskLabel(case_id, review)


def _min_task_label(index: int, case_id: str, task: dict[str, Any]) -> TaskLabel | TaskProblem:
    """JSON-MIN: ``{"case_id": ..., "label": "confirmed", "note": ..., "annotator": ...}``
    (``label`` is ``{"choices": [...]}`` when the control allows several)."""
    value = task.get(LABEL_CONTROL)
    if value is None:
        return TaskProblem(index, case_id, "no label yet", unlabelled=True)
    if isinstance(value, dict):
        value = value.get("choices")
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else None
    verdict = _verdict(value)
    if verdict is None:
        return TaskProblem(index, case_id,
                           f"label {task.get(LABEL_CONTROL)!r} is not one of {', '.join(VERDICTS)}")
    note = task.get(NOTE_CONTROL)
    at = _time(task.get("updated_at")) or _time(task.get("created_at"))
    review = ReviewLabel.model_validate({
        "label": verdict, "by": _who(task.get("annotator")),
        "note": note.strip() or None if isinstance(note, str) else None,
        **({"at": at} if at is not None else {})})
    return TaskLabel(case_id, review)


def read_labels(document: Any) -> Iterator[TaskLabel | TaskProblem]:
    """The label of every task in an exported document (a list of tasks, or one task)."""
    tasks = document if isinstance(document, list) else [document]
    for index, task in enumerate(tasks):
        if not isinstance(task, dict):
            yield TaskProblem(index, None, f"a task must be a JSON object, not "
                                           f"{type(task).__name__}")
            continue
        full = isinstance(task.get("data"), dict)
        fields = task["data"] if full else task
        case_id = fields.get("case_id")
        if not isinstance(case_id, str) or not case_id:
            yield TaskProblem(index, None, "no data.case_id: not a task exported from here")
            continue
        yield (_full_task_label if full else _min_task_label)(index, case_id, task)
