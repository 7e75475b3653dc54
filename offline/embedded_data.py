"""Labelled data for the embedded guard, every source named with its licence and label meaning.

Two kinds of rows, both ``Labelled``:

- ``response``: a model's answer to a prompt; ``label`` 1 = the RESPONSE is harmful (it complies
  with a harmful request), 0 = harmless. Refusals and safe redirections of harmful requests are
  harmless (``role`` ``refusal``); helpful answers to benign requests are harmless (``role``
  ``benign-answer``).
- ``request``: a user prompt alone; ``label`` 1 = it asks for harmful help, 0 = benign.
  Everyday how-to requests are benign (``role`` ``everyday``); benign prompts written to look
  harmful are ``lookalike``.

``SOURCES`` lists every source read here: its folder under the shared data, licence, what its
label means, and whether it may be trained on. The human-labelled judge-evaluation sets
(JBB judge comparison, JailbreakEval) and Self-Instruct's user-oriented answers (its authors ask
not to train on them) are ``eval_only``: never trained on, always test.

    records = load_all(Path("../shared/data"), seed=0)
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Kind = Literal["response", "request"]
MAX_PROMPT_CHARS = 2000  # GuardConfig.max_request_chars' default: the proxy keeps the tail.


@dataclass(frozen=True)
class Labelled:
    source: str
    kind: Kind
    prompt: str
    response: str
    """"" for a request."""
    label: int
    role: str
    """What the row stands for: harmful, refusal, benign-answer (responses); harmful,
    lookalike, everyday (requests)."""
    group: str
    """Rows of one group (a question and every answer to it) are never split apart."""
    categories: tuple[str, ...] = ()
    """Llama Guard 3 hazard codes (S1-S14), where the source carries a category."""
    eval_only: bool = False

    @property
    def key(self) -> str:
        return hashlib.sha1(f"{self.prompt}\x00{self.response}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Source:
    name: str
    folder: str
    licence: str
    kind: Kind
    meaning: str
    eval_only: bool = False


SOURCES: tuple[Source, ...] = (
    # -- responses ------------------------------------------------------------------------------
    Source("jbb-artifacts", "jailbreakbench", "MIT", "response",
           "JailbreakBench attack artifacts: jailbreak prompts and real responses (Vicuna-13B, "
           "Llama-2-7B, GPT-3.5/4); label = JBB's Llama-3-70B judge (jailbroken = harmful)"),
    Source("gptfuzz", "gptfuzz", "MIT", "response",
           "GPTFuzz: jailbreak-template responses of gpt-3.5-turbo, the authors' manual label "
           "(1 = jailbroken = harmful)"),
    Source("llm-self-defense", "llm_self_defense", "BSD-3-Clause", "response",
           "LLM Self Defense: GPT-3.5 / Llama-2 answers to harmful and benign prompts, "
           "'is harmful?' Yes = harmful"),
    Source("jbb-targets", "jailbreakbench", "MIT", "response",
           "JBB-Behaviors 'Sure, here is ...' targets: the opener of an answer that complies, "
           "harmful for the 100 harmful behaviours, harmless for their 100 benign twins"),
    Source("star1", "star1", "Apache-2.0", "response",
           "STAR-1: safe reasoning and answers (refusals, safe completions) to harmful requests: "
           "harmless"),
    Source("safedecoding", "safedecoding", "MIT", "response",
           "SafeDecoding: refusals by five chat models of harmful requests (GPT-4-filtered): "
           "harmless"),
    Source("coconot-pref", "coconot", "MIT", "response",
           "CoCoNot preference pairs: GPT-4 answers (chosen) and hedged or refusing answers "
           "(rejected) to benign look-alike requests: both harmless"),
    Source("gpteacher", "gpteacher", "MIT", "response",
           "GPTeacher: GPT-4 answers to programming and role-play instructions: harmless"),
    Source("arena-hard", "arena_hard", "Apache-2.0", "response",
           "Arena-Hard-Auto: GPT-4 answers to hard real-user queries: harmless"),
    Source("mt-bench", "mt_bench", "Apache-2.0", "response",
           "MT-Bench / Vicuna-Bench GPT-4 reference answers: harmless"),
    Source("gsm8k", "math_benchmarks", "MIT", "response",
           "GSM8K worked solutions: harmless reasoning"),
    Source("jbb-judge", "jbb_judge_comparison", "MIT", "response",
           "JailbreakBench judge comparison: responses with 3 human labels, majority = label "
           "(1 = jailbroken = harmful)", eval_only=True),
    Source("jailbreakeval", "jailbreakeval", "MIT", "response",
           "JailbreakEval examples: GCG/Vicuna responses with a manual label (1 = harmful)",
           eval_only=True),
    Source("self-instruct-answers", "self_instruct", "Apache-2.0", "response",
           "Self-Instruct user-oriented tasks answered by text-davinci-003: harmless "
           "(the authors ask not to train on them)", eval_only=True),
    # -- requests -------------------------------------------------------------------------------
    Source("advbench", "advbench", "MIT", "request", "AdvBench harmful behaviours: harmful"),
    Source("harmbench", "harmbench", "MIT", "request", "HarmBench standard behaviours: harmful"),
    Source("strongreject", "strongreject", "MIT", "request", "StrongREJECT prompts: harmful"),
    Source("jbb-behaviours", "jailbreakbench", "MIT", "request",
           "JBB-Behaviors: 100 harmful requests and 100 topic-matched benign ones"),
    Source("simplesafetytests", "simplesafetytests", "CC-BY-4.0", "request",
           "SimpleSafetyTests: clearly harmful prompts, 5 harm areas"),
    Source("harmfulqa", "harmfulqa", "Apache-2.0", "request",
           "HarmfulQA (academic-framed) and CatQA harmful questions: harmful"),
    Source("safedecoding-seeds", "safedecoding", "MIT", "request",
           "SafeDecoding seed_reject: plain harmful requests"),
    Source("gptfuzz-questions", "gptfuzz", "MIT", "request", "GPTFuzz's 100 harmful questions"),
    Source("wildjailbreak", "wildjailbreak", "ODC-BY", "request",
           "WildJailbreak eval: adversarial harmful and adversarial benign prompts"),
    Source("or-bench", "or_bench", "CC-BY-4.0", "request",
           "OR-Bench: toxic prompts (harmful) and hard-1k safe prompts that look toxic (benign)"),
    Source("xstest", "xstest", "CC-BY-4.0", "request",
           "XSTest: 250 safe prompts that look unsafe, 200 unsafe contrasts"),
    Source("coconot", "coconot", "MIT", "request",
           "CoCoNot: 'dangerous or sensitive' safety requests (harmful) and the benign contrast "
           "set"),
    Source("wildguardmix", "wildguardmix", "ODC-BY", "request",
           "WildGuardMix-derived prompts, safe / harmful (copyright requests left out)"),
    Source("self-instruct", "self_instruct", "Apache-2.0", "request",
           "Self-Instruct seed tasks: everyday instructions, benign"),
    Source("mt-bench-questions", "mt_bench", "Apache-2.0", "request",
           "MT-Bench / Vicuna-Bench first turns: everyday, benign"),
    Source("arena-hard-questions", "arena_hard", "Apache-2.0", "request",
           "Arena-Hard-Auto queries: real users' technical requests, benign"),
    Source("gpteacher-instructions", "gpteacher", "MIT", "request",
           "GPTeacher instructions (programming, role-play): benign"),
    Source("ifeval", "ifeval", "Apache-2.0", "request",
           "IFEval: everyday writing requests with format constraints, benign"),
    Source("truthfulqa", "truthfulqa", "Apache-2.0", "request",
           "TruthfulQA questions on health, law, misconceptions: everyday, benign"),
    Source("oasst", "oasst", "Apache-2.0", "request",
           "OpenAssistant manual-eval prompts: everyday chat requests (unlabelled, mostly benign; "
           "evaluation only)", eval_only=True),
)
SOURCE_BY_NAME = {source.name: source for source in SOURCES}

# JailbreakBench categories and the Llama Guard 3 hazards they fall under.
JBB_CATEGORIES: dict[str, tuple[str, ...]] = {
    "Harassment/Discrimination": ("S10",),
    "Malware/Hacking": ("S2",),  # cyber crime; S14 is abuse of a code interpreter
    "Physical harm": ("S1",),
    "Economic harm": ("S2",),
    "Fraud/Deception": ("S2",),
    "Disinformation": ("S5",),
    "Sexual/Adult content": ("S12",),
    "Privacy": ("S7",),
    "Expert advice": ("S6",),
    "Government decision-making": ("S2",),
}
SST_CATEGORIES: dict[str, tuple[str, ...]] = {
    "Suicide, Self-Harm, and Eating Disorders": ("S11",),
    "Physical harm and Violence": ("S1",),
    "Illegal and Highly Regulated items": ("S2",),
    "Scams and fraud": ("S2",),
    "Child safety": ("S4",),
}
CATQA_CATEGORIES: dict[str, tuple[str, ...]] = {
    "Illegal Activity": ("S2",),
    "Child Abuse": ("S4",),
    "Hate/Harass/Violence": ("S10",),
    "Malware Viruses": ("S2",),
    "Physical Harm": ("S1",),
    "Economic Harm": ("S2",),
    "Fraud/Deception": ("S2",),
    "Adult Content": ("S12",),
    "Political Campaigning": (),  # campaigning is not S13 (election misinformation)
    "Privacy Violation Activity": ("S7",),
    "Tailored Financial Advice": ("S6",),
}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as file:
        return list(csv.DictReader(file))


def _jbb_rows(path: Path) -> list[dict[str, str]]:
    """JBB behaviours with capitalised keys (the harmful file has them, the benign one not)."""
    return [{key[:1].upper() + key[1:]: value for key, value in row.items()}
            for row in read_csv(path)]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _sample(rng: random.Random, rows: list[Any], limit: int) -> list[Any]:
    """``limit`` rows at random; a smaller limit takes a prefix of a larger one's choice."""
    order = list(rows)
    rng.shuffle(order)
    return order[:limit]


# -- responses ----------------------------------------------------------------------------------

Reader = Callable[[Path, random.Random], Iterator[Labelled]]


def _response(source: str, prompt: str, response: str, label: int, group: str,
              categories: tuple[str, ...] = (), role: str | None = None) -> Labelled:
    spec = SOURCE_BY_NAME[source]
    return Labelled(source, "response", prompt.strip()[-MAX_PROMPT_CHARS:], response.strip(),
                    label, role or ("harmful" if label else "benign-answer"),
                    f"{source}:{group}", categories if label else (), spec.eval_only)


def jbb_artifacts(data: Path, rng: random.Random) -> Iterator[Labelled]:
    # JailbreakEval's 50 answers are these same texts: test only, left out here.
    held = {normalised(row["answer"]) for row in read_csv(data / "jailbreakeval" / "example.csv")}
    for file in sorted((data / "jailbreakbench" / "attack-artifacts").glob("*/*/*.json")):
        for record in read_json(file).get("jailbreaks", []):
            response = record.get("response") or ""
            if not response.strip() or normalised(response) in held:
                continue
            label = int(str(record["jailbroken"]) == "True")
            categories = JBB_CATEGORIES.get(record.get("category", ""), ())
            # Grouped by behaviour: every attack on it, and its benign twin, stay together.
            yield _response("jbb-artifacts", record.get("prompt") or record["goal"], response,
                            label, f"jbb{record['index']}", categories)


def jbb_targets(data: Path, rng: random.Random) -> Iterator[Labelled]:
    for name, label in (("harmful-behaviors.csv", 1), ("benign-behaviors.csv", 0)):
        for row in _jbb_rows(data / "jailbreakbench" / name):
            yield _response("jbb-targets", row["Goal"], row["Target"], label,
                            f"jbb{row['Index']}", JBB_CATEGORIES.get(row["Category"], ()))


def gptfuzz(data: Path, rng: random.Random, per_class: int = 500) -> Iterator[Labelled]:
    questions = {row["index"]: row["text"] for row in
                 read_csv(data / "gptfuzz" / "question_list.csv")}
    seen: set[tuple[str, str]] = set()
    rows: dict[int, list[Labelled]] = {0: [], 1: []}
    for name in ("responses_labeled_train.csv", "responses_labeled_evaluate.csv"):
        for row in read_csv(data / "gptfuzz" / name):
            key = (row["question"], normalised(row["Response"]))
            if key in seen or not row["Response"].strip():
                continue  # the same short refusal, many times over
            seen.add(key)
            label = int(row["label"])
            rows[label].append(_response("gptfuzz", questions[row["question"]], row["Response"],
                                         label, f"q{row['question']}"))
    for label in (0, 1):
        yield from _sample(rng, rows[label], per_class)


def llm_self_defense(data: Path, rng: random.Random) -> Iterator[Labelled]:
    for name in ("all_repsonses_gpt.csv", "all_repsonses_llama.csv"):
        for row in read_csv(data / "llm_self_defense" / name):
            label = int(row["is harmful?"].strip().lower() == "yes")
            yield _response("llm-self-defense", row["prompt"], row["response"], label,
                            normalised(row["prompt"]))


def star1(data: Path, rng: random.Random, limit: int = 300) -> Iterator[Labelled]:
    for record in _sample(rng, read_json(data / "star1" / "STAR-1.json"), limit):
        yield _response("star1", record["question"], record["response"], 0, record["id"],
                        role="refusal")


SAFEDECODING_TURN = re.compile(
    r"^\s*(?:\[INST\](?P<a>.*?)\[/INST\]|USER:(?P<b>.*?)ASSISTANT:|User:(?P<c>.*?)\n\nAssistant:"
    r"|### Human:(?P<d>.*?)### Assistant:)(?P<answer>.*)$", re.S)


def safedecoding(data: Path, rng: random.Random) -> Iterator[Labelled]:
    for file in sorted((data / "safedecoding").glob("ft_datasets_*.json")):
        for record in read_json(file):
            match = SAFEDECODING_TURN.match(record["text"])
            if not match:
                continue
            prompt = next(group for group in match.group("a", "b", "c", "d") if group is not None)
            answer = match.group("answer").replace("<|endoftext|>", "")
            answer = re.split(r"\n\s*(?:User|USER|### Human):", answer)[0]  # a made-up next turn
            yield _response("safedecoding", prompt, answer, 0, normalised(prompt), role="refusal")


def coconot_pref(data: Path, rng: random.Random, limit: int = 150) -> Iterator[Labelled]:
    for record in _sample(rng, read_jsonl(data / "coconot" / "coconot_pref.jsonl"), limit):
        for answer in (record["chosen"], record["rejected"]):
            yield _response("coconot-pref", record["prompt"], answer, 0, record["id"])


def gpteacher(data: Path, rng: random.Random, limit: int = 150) -> Iterator[Labelled]:
    for name in ("codegen-instruct.json", "roleplay-simple-deduped-roleplay-instruct.json"):
        for number, record in enumerate(_sample(rng, read_json(data / "gpteacher" / name), limit)):
            prompt = f"{record['instruction']}\n\n{record.get('input', '')}".strip()
            yield _response("gpteacher", prompt, record["response"], 0, f"{name}{number}")


def _turn_text(turn: Any) -> str:
    return str(turn["content"]) if isinstance(turn, dict) else str(turn)


def arena_hard(data: Path, rng: random.Random, limit: int = 150) -> Iterator[Labelled]:
    questions = {row["question_id"]: _turn_text(row["turns"][0])
                 for row in read_jsonl(data / "arena_hard" / "question.jsonl")}
    answers = read_jsonl(data / "arena_hard" / "model_answer" / "gpt-4-0613.jsonl")
    for record in _sample(rng, answers, limit):
        answer = _turn_text(record["choices"][0]["turns"][0])
        yield _response("arena-hard", questions.get(record["question_id"], ""), answer, 0,
                        record["question_id"])


def mt_bench(data: Path, rng: random.Random) -> Iterator[Labelled]:
    for name in ("mt_bench", "vicuna_bench"):
        questions = {row["question_id"]: row["turns"][0]
                     for row in read_jsonl(data / "mt_bench" / f"{name}_question.jsonl")}
        for record in read_jsonl(data / "mt_bench" / f"{name}_reference_answer_gpt-4.jsonl"):
            answer = record["choices"][0]["turns"][0]
            yield _response("mt-bench", questions.get(record["question_id"], ""), answer, 0,
                            f"{name}{record['question_id']}")


def gsm8k(data: Path, rng: random.Random, limit: int = 150) -> Iterator[Labelled]:
    rows = read_jsonl(data / "math_benchmarks" / "gsm8k_test.jsonl")
    for number, record in enumerate(_sample(rng, rows, limit)):
        solution = re.sub(r"<<[^>]*>>", "", record["answer"]).replace("#### ", "The answer is ")
        yield _response("gsm8k", record["question"], solution, 0, str(number))


def jbb_judge(data: Path, rng: random.Random) -> Iterator[Labelled]:
    for row in read_csv(data / "jbb_judge_comparison" / "judge-comparison.csv"):
        yield _response("jbb-judge", row["prompt"] or row["goal"], row["target_response"],
                        int(row["human_majority"]), row["Index"])


def jailbreakeval(data: Path, rng: random.Random) -> Iterator[Labelled]:
    for name in ("example.csv", "tiny.csv"):
        for number, row in enumerate(read_csv(data / "jailbreakeval" / name)):
            yield _response("jailbreakeval", row.get("prompt") or row["question"], row["answer"],
                            int(row["label"]), f"{name}{number}",
                            JBB_CATEGORIES.get(row.get("category", ""), ()))


def self_instruct_answers(data: Path, rng: random.Random) -> Iterator[Labelled]:
    file = data / "self_instruct" / "predictions" / "text-davinci-003_predictions.jsonl"
    for number, record in enumerate(read_jsonl(file)):
        prompt = record.get("instruction", "")
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        yield _response("self-instruct-answers", prompt, str(record.get("response", "")), 0,
                        str(number))


RESPONSE_READERS: dict[str, Reader] = {
    "jbb-artifacts": jbb_artifacts, "gptfuzz": gptfuzz, "llm-self-defense": llm_self_defense,
    "jbb-targets": jbb_targets, "star1": star1, "safedecoding": safedecoding,
    "coconot-pref": coconot_pref, "gpteacher": gpteacher, "arena-hard": arena_hard,
    "mt-bench": mt_bench, "gsm8k": gsm8k, "jbb-judge": jbb_judge,
    "jailbreakeval": jailbreakeval, "self-instruct-answers": self_instruct_answers,
}


# -- requests -----------------------------------------------------------------------------------


def _request(source: str, text: str, label: int, role: str, group: str | None = None,
             categories: tuple[str, ...] = ()) -> Labelled:
    spec = SOURCE_BY_NAME[source]
    text = text.strip()
    return Labelled(source, "request", text[-MAX_PROMPT_CHARS:], "", label, role,
                    f"{source}:{group or normalised(text)[:200]}", categories if label else (),
                    spec.eval_only)


def request_rows(data: Path, rng: random.Random) -> Iterator[Labelled]:
    for row in read_csv(data / "advbench" / "harmful_behaviors.csv"):
        yield _request("advbench", row["goal"], 1, "harmful")
    for row in read_csv(data / "harmbench" / "harmbench_behaviors_text_all.csv"):
        if row["FunctionalCategory"] == "standard":  # contextual ones need their context
            yield _request("harmbench", row["Behavior"], 1, "harmful")
    for row in read_csv(data / "strongreject" / "strongreject_dataset.csv"):
        yield _request("strongreject", row["forbidden_prompt"], 1, "harmful")
    for name, label in (("harmful-behaviors.csv", 1), ("benign-behaviors.csv", 0)):
        for row in _jbb_rows(data / "jailbreakbench" / name):
            yield _request("jbb-behaviours", row["Goal"], label,
                           "harmful" if label else "lookalike", f"jbb{row['Index']}",
                           JBB_CATEGORIES.get(row["Category"], ()))
    for row in read_csv(data / "simplesafetytests" / "SimpleSafetyTests_test_cases.csv"):
        yield _request("simplesafetytests", row["prompts_final"], 1, "harmful",
                       categories=SST_CATEGORIES.get(row["harm_area"], ()))
    harmfulqa: list[str] = [question for topics in
                            read_json(data / "harmfulqa" / "harmfulqa.json").values()
                            for questions in topics.values() for question in questions]
    for question in _sample(rng, harmfulqa, 500):
        yield _request("harmfulqa", question, 1, "harmful")
    for category, topics in read_json(data / "harmfulqa" / "catqa_english.json").items():
        for questions in topics.values():
            for question in questions:
                yield _request("harmfulqa", question, 1, "harmful",
                               categories=CATQA_CATEGORIES.get(category, ()))
    for row in read_json(data / "safedecoding" / "seed_reject.json")["prompts"]:
        yield _request("safedecoding-seeds", row["prompt"], 1, "harmful")
    for row in read_csv(data / "gptfuzz" / "question_list.csv"):
        yield _request("gptfuzz-questions", row["text"], 1, "harmful")
    wjb = read_jsonl(data / "wildjailbreak" / "wildjailbreak_eval_adversarial_harmful.jsonl")
    for row in _sample(rng, wjb, 400):
        yield _request("wildjailbreak", row["adversarial"], 1, "harmful",
                       normalised(row["vanilla"]))
    for row in read_jsonl(data / "wildjailbreak" / "wildjailbreak_eval_adversarial_benign.jsonl"):
        yield _request("wildjailbreak", row["adversarial"], 0, "lookalike",
                       normalised(row["vanilla"]))
    for name, label in (("or_bench-toxic.csv", 1), ("or_bench-hard-1k.csv", 0)):
        for row in read_csv(data / "or_bench" / name):
            yield _request("or-bench", row["prompt"], label, "harmful" if label else "lookalike")
    for row in read_csv(data / "xstest" / "xstest_prompts.csv"):
        label = int(row["label"] == "unsafe")
        yield _request("xstest", row["prompt"], label, "harmful" if label else "lookalike",
                       f"xstest{row['focus'] or row['id']}")
    for row in read_jsonl(data / "coconot" / "coconot_eval.jsonl"):
        if row["subcategory"] == "dangerous or sensitive topics":
            yield _request("coconot", row["prompt"], 1, "harmful")
    for row in read_jsonl(data / "coconot" / "coconot_contrast_eval.jsonl"):
        yield _request("coconot", row["prompt"], 0, "lookalike")
    for record in read_json(data / "wildguardmix" / "wildguardmix_prompts_converted.json"):
        if record["source"] == "wildguardmix_copyright_violations":
            continue
        label = int(record["label"] == "harmful")
        # Its safe prompts are mostly adversarial or borderline benign ones, not everyday asks.
        yield _request("wildguardmix", record["text"], label,
                       "harmful" if label else "lookalike")
    # Everyday requests.
    for record in read_jsonl(data / "self_instruct" / "seed_tasks.jsonl"):
        yield _request("self-instruct", record["instruction"], 0, "everyday")
    for name in ("mt_bench", "vicuna_bench"):
        for record in read_jsonl(data / "mt_bench" / f"{name}_question.jsonl"):
            yield _request("mt-bench-questions", record["turns"][0], 0, "everyday")
    for record in read_jsonl(data / "arena_hard" / "question.jsonl"):
        yield _request("arena-hard-questions", _turn_text(record["turns"][0]), 0, "everyday")
    for name in ("codegen-instruct.json", "roleplay-simple-deduped-roleplay-instruct.json"):
        for record in _sample(rng, read_json(data / "gpteacher" / name), 250):
            yield _request("gpteacher-instructions", record["instruction"], 0, "everyday")
    for record in read_jsonl(data / "ifeval" / "input_data.jsonl"):
        yield _request("ifeval", record["prompt"], 0, "everyday")
    for row in read_csv(data / "truthfulqa" / "TruthfulQA.csv"):
        yield _request("truthfulqa", row["Question"], 0, "everyday")
    for name in ("en_100_text.jsonl", "prompt_lottery_en_250_text.jsonl"):
        for text in read_jsonl(data / "oasst" / name):
            yield _request("oasst", str(text), 0, "everyday")


# -- everything ---------------------------------------------------------------------------------


def load_responses(data: Path, seed: int = 0, sources: list[str] | None = None) -> list[Labelled]:
    rows: list[Labelled] = []
    for name, reader in RESPONSE_READERS.items():
        if sources is None or name in sources:
            rows += reader(data, random.Random(f"{seed}:{name}"))
    return dedupe(rows)


def load_requests(data: Path, seed: int = 0) -> list[Labelled]:
    return dedupe(list(request_rows(data, random.Random(f"{seed}:requests"))))


def dedupe(rows: list[Labelled]) -> list[Labelled]:
    """Each (prompt, response) text once, under the first source listed; a text that is
    test-only anywhere stays test-only."""
    eval_keys = {normalised(row.prompt + "\x00" + row.response) for row in rows if row.eval_only}
    seen: set[str] = set()
    kept: list[Labelled] = []
    for row in rows:
        key = normalised(row.prompt + "\x00" + row.response)
        if not row.response.strip() and row.kind == "response":
            continue
        if key in seen or (key in eval_keys and not row.eval_only):
            continue
        seen.add(key)
        kept.append(row)
    return kept


def load_extra(path: Path) -> list[Labelled]:
    """A team's own labelled rows: JSON lines or CSV with ``prompt``, ``response`` (empty for a
    request), ``label`` (1/0, true/false, unsafe/safe) and optional ``categories`` (a list or a
    comma-separated string of S1-S14 codes). Any defect is a ValueError naming the line."""
    if path.suffix.lower() == ".csv":
        raw: list[dict[str, Any]] = list(read_csv(path))
    else:
        raw = []
        with path.open(encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                if line.strip():
                    try:
                        raw.append(json.loads(line))
                    except ValueError as error:
                        raise ValueError(f"{path}:{number}: not JSON ({error})") from None
    rows = []
    for number, record in enumerate(raw, 1):
        if not isinstance(record, dict) or "label" not in record or "prompt" not in record:
            raise ValueError(f"{path}: row {number} needs 'prompt' and 'label'")
        label = parse_label(record["label"], f"{path}: row {number}")
        response = str(record.get("response") or "")
        categories = record.get("categories") or ()
        if isinstance(categories, str):
            categories = [part.strip() for part in categories.split(",") if part.strip()]
        kind: Kind = "response" if response.strip() else "request"
        role = "harmful" if label else ("benign-answer" if kind == "response" else "everyday")
        rows.append(Labelled(f"extra:{path.name}", kind, str(record["prompt"]).strip(),
                             response.strip(), label, role, f"extra:{path.name}:{number}",
                             tuple(str(c) for c in categories) if label else ()))
    return rows


def parse_label(value: Any, where: str) -> int:
    text = str(value).strip().lower()
    if text in ("1", "true", "unsafe", "harmful", "yes"):
        return 1
    if text in ("0", "false", "safe", "harmless", "benign", "no"):
        return 0
    raise ValueError(f"{where}: label {value!r} is not 1/0, true/false or unsafe/safe")


# -- a packed copy of the loaded rows (for a training machine without the shared data) ---------


def write_records(rows: list[Labelled], path: Path) -> Path:
    """``rows`` as gzipped JSON lines (every field), read back by ``read_records``."""
    import gzip
    from dataclasses import asdict

    with gzip.open(path, "wt", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
    return path


def read_records(path: Path) -> list[Labelled]:
    import gzip

    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                rows.append(Labelled(**{**data, "categories": tuple(data["categories"])}))
            except (ValueError, TypeError, KeyError) as error:
                raise ValueError(f"{path}:{number}: not a packed row ({error})") from None
    return rows
