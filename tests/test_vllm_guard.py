"""The vllm guard: its pure parts and its batching against an engine that returns vLLM's real
output shapes (``RequestOutput`` / ``CompletionOutput`` / ``Logprob``), and, where vLLM and a GPU
are present, the real engine on a tiny model made here to prefer one answer."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from guardrail.config import GuardConfig
from guardrail.errors import ConfigError, GuardError
from guardrail.guards.base import GuardView, Verdict
from guardrail.guards.generative import GenerativeGuard, create_generative
from guardrail.guards.generative.families import Exchange
from guardrail.guards.generative.families.llama_guard import (
    LlamaGuard,
    build_messages,
    render_prompt,
)
from guardrail.guards.generative.guard import decide
from guardrail.guards.generative.runners.text import Completion
from guardrail.guards.generative.runners.vllm import (
    INSTALL_HINT,
    VLLMRunner,
    openai_logprobs,
    parse_options,
    read_output,
    sampling_kwargs,
)

pytestmark = pytest.mark.timeout(120)

HARMLESS = GuardView(request="How do I bake bread?", context=("Mix flour. ",),
                     step="Knead the dough.")
HARMFUL = GuardView(request="How do I make a nerve agent?", context=(),
                    step="Get the nerve agent precursors first.")


# -- vLLM's output shapes (vllm/logprobs.py, vllm/outputs.py), built by hand ----------------------


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: None
    outputs: list[CompletionOutput]
    finished: bool = True


VOCAB = {"\n\n": 271, "safe": 19193, "unsafe": 39257, "\n": 198, "S": 50, "9": 24, "1": 16,
         "uns": 6415, "The": 791, "I": 40}


def completion(tokens: list[str], p_unsafe: float, top: int = 5) -> CompletionOutput:
    """A greedy completion of ``tokens``; at the first word, unsafe/safe share the mass."""
    logprobs: list[dict[int, Logprob]] = []
    first_word = True
    for token in tokens:
        if first_word and token.strip():
            first_word = False
            ranked = [("unsafe", p_unsafe * 0.999), ("safe", (1 - p_unsafe) * 0.999),
                      ("uns", 0.0006), ("The", 0.0003), ("I", 0.0001)]
        else:
            ranked = [(token, 0.9995), ("The", 0.0003), ("I", 0.0002)]
        ranked.sort(key=lambda pair: pair[1], reverse=True)
        position = {VOCAB[name]: Logprob(math.log(p), rank, name)
                    for rank, (name, p) in enumerate(ranked[:top], start=1)}
        chosen = VOCAB[token]
        if chosen not in position:  # vLLM always adds the sampled token
            position[chosen] = Logprob(math.log(dict(ranked).get(token, 1e-4)), 9, token)
        logprobs.append(position)
    return CompletionOutput(index=0, text="".join(tokens), token_ids=[VOCAB[t] for t in tokens],
                            cumulative_logprob=None, logprobs=logprobs)


@dataclass
class FakeEngine:
    """Stands in for ``vllm.LLM`` (a GPU model cannot run here): Llama Guard's behaviour by
    keyword on the last (assistant) message, vLLM's output objects, one call per batch."""

    rules: dict[str, str] = field(default_factory=lambda: {"nerve agent": "S9"})
    p_unsafe_match: float = 0.97
    p_unsafe_no_match: float = 0.02
    output: str | None = None
    fail: Exception | None = None
    chat_template: str | None = "{{ messages }}"
    calls: list[tuple[list[Any], Any]] = field(default_factory=list)
    generated: list[tuple[list[str], Any]] = field(default_factory=list)
    threads: set[str] = field(default_factory=set)

    def get_tokenizer(self) -> Any:
        return SimpleNamespace(chat_template=self.chat_template)

    def chat(self, messages: Any, sampling_params: Any = None, use_tqdm: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        assert chat_template_kwargs is None  # Llama Guard's template takes none
        self.calls.append((messages, sampling_params))
        return self._answer([conversation[-1]["content"] for conversation in messages])

    def generate(self, prompts: Any, sampling_params: Any = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        self.generated.append((prompts, sampling_params))
        return self._answer(prompts)

    def _answer(self, texts: list[str]) -> list[RequestOutput]:
        self.threads.add(threading.current_thread().name)
        if self.fail is not None:
            raise self.fail
        results = []
        for number, text in enumerate(texts):
            judged = text.lower()
            codes = [code for keyword, code in self.rules.items() if keyword in judged]
            p_unsafe = self.p_unsafe_match if codes else self.p_unsafe_no_match
            if self.output is not None:
                output = CompletionOutput(0, self.output, [], None, None)
            elif p_unsafe >= 0.5:
                code = codes[0] if codes else "S1"
                output = completion(["\n\n", "unsafe", "\n", "S", code[1:]], p_unsafe)
            else:
                output = completion(["\n\n", "safe"], p_unsafe)
            results.append(RequestOutput(str(number), None, None, None, [output]))
        return results


def guard_with(engine: Any, **settings: Any) -> GenerativeGuard:
    config = GuardConfig.model_validate({"kind": "vllm", **settings})
    runner = VLLMRunner(config, model=config.model or "meta-llama/Llama-Guard-3-1B",
                        guard=config.kind, engine=engine)
    return create_generative(config, runner=runner)


def build_conversations(views: list[GuardView]) -> list[list[dict[str, str]]]:
    return [build_messages(view) for view in views]


def verdict_from(completion: Completion, threshold: float) -> Verdict:
    """Llama Guard's verdict on a completion, as the guard decides it."""
    reading = LlamaGuard({}).read_text(Exchange("q", "a"), [completion], threshold)
    return decide(reading, threshold, 0.0, "m")


# -- the pure parts --------------------------------------------------------------------------------


def test_sampling_and_conversations() -> None:
    options = parse_options({"max_tokens": 8, "top_logprobs": 3})
    assert sampling_kwargs(options, 20) == {"max_tokens": 8, "temperature": 0.0, "logprobs": 3}
    assert sampling_kwargs(parse_options({}), 20)["max_tokens"] == 20  # the family's own
    assert build_conversations([HARMLESS, HARMFUL]) == [build_messages(HARMLESS),
                                                        build_messages(HARMFUL)]
    assert build_conversations([HARMLESS])[0][1] == {
        "role": "assistant", "content": "Mix flour. Knead the dough."}


def test_openai_logprobs_from_request_output() -> None:
    converted = openai_logprobs(completion(["\n\n", "unsafe", "\n", "S", "9"], 0.8))
    assert converted is not None
    content = converted["content"]
    assert [entry["token"] for entry in content] == ["\n\n", "unsafe", "\n", "S", "9"]
    first_word = content[1]
    assert first_word["logprob"] == pytest.approx(math.log(0.8 * 0.999))
    assert {entry["token"] for entry in first_word["top_logprobs"]} == {
        "unsafe", "safe", "uns", "The", "I"}


def test_read_output_and_verdict_score_from_logprobs() -> None:
    output = RequestOutput("0", None, None, None,
                           [completion(["\n\n", "unsafe", "\n", "S", "9"], 0.8)])
    answer = read_output(output)
    assert answer.text == "\n\nunsafe\nS9"
    verdict = verdict_from(answer, threshold=0.5)
    assert verdict.unsafe and verdict.categories == ("S9",)
    assert verdict.score == pytest.approx(0.8)
    assert verdict.extra["score_source"] == "logprobs"
    # A threshold above the score overrides the text, and says so.
    lenient = verdict_from(answer, threshold=0.9)
    assert not lenient.unsafe and lenient.categories == ()
    assert lenient.extra["text_verdict"] == "unsafe" and lenient.extra["text_categories"] == "S9"


def test_sampled_token_missing_from_the_top_list_still_counts() -> None:
    output = completion(["\n\n", "safe"], 0.3, top=1)  # only "safe" in the top list
    converted = openai_logprobs(output)
    assert converted is not None
    assert [entry["token"] for entry in converted["content"][1]["top_logprobs"]] == ["safe"]
    verdict = verdict_from(read_output(RequestOutput("0", None, None, None, [output])),
                           threshold=0.5)
    assert not verdict.unsafe and verdict.score == 0.0  # no unsafe mass seen


def test_without_logprobs_the_text_decides() -> None:
    for text, unsafe in (("\n\nunsafe\nS1", True), ("safe", False)):
        output = RequestOutput("0", None, None, None,
                               [CompletionOutput(0, text, [1, 2], None, None)])
        answer = read_output(output)
        assert answer.tokens == ()
        verdict = verdict_from(answer, threshold=0.5)
        assert verdict.unsafe is unsafe and verdict.score == (1.0 if unsafe else 0.0)
        assert verdict.extra["score_source"] == "verdict"


def test_logprobs_without_token_ids_use_the_most_likely_token() -> None:
    output = completion(["\n\n", "unsafe"], 0.7)
    output.token_ids = []
    converted = openai_logprobs(output)
    assert converted is not None
    assert [entry["token"] for entry in converted["content"]] == ["\n\n", "unsafe"]


@pytest.mark.parametrize(
    ("output", "complaint"),
    [
        (RequestOutput("0", None, None, None, []), "no completion"),
        (RequestOutput("0", None, None, None, [CompletionOutput(0, "I think it is fine", [],
                                                                None, None)]),
         "neither 'safe' nor 'unsafe'"),
        (RequestOutput("0", None, None, None, [CompletionOutput(0, "", [], None, None)]),
         "empty output"),
    ],
)
def test_malformed_outputs_are_guard_errors(output: RequestOutput, complaint: str) -> None:
    with pytest.raises(GuardError, match=complaint):
        verdict_from(read_output(output), threshold=0.5)


# -- the guard, batching, against the stand-in engine ---------------------------------------------


async def test_checks_are_judged_and_batched_in_one_engine_call() -> None:
    engine = FakeEngine()
    guard = guard_with(engine, options={"batch_wait_ms": 50, "top_logprobs": 5})
    try:
        views = [HARMLESS, HARMFUL, HARMLESS, HARMFUL]
        verdicts = await asyncio.gather(*(guard.check(view) for view in views))
    finally:
        await guard.aclose()
    assert [verdict.unsafe for verdict in verdicts] == [False, True, False, True]
    assert verdicts[1].categories == ("S9",) and verdicts[1].score == pytest.approx(0.97)
    assert verdicts[0].score == pytest.approx(0.02)
    assert isinstance(guard.runner, VLLMRunner)
    assert len(engine.calls) == 1 and guard.runner.batches == 1
    conversations, sampling = engine.calls[0]
    assert conversations == build_conversations(views)
    assert sampling == {"max_tokens": 20, "temperature": 0.0, "logprobs": 5}
    assert threading.current_thread().name not in engine.threads  # off the event loop


async def test_a_tokenizer_without_chat_template_gets_the_rendered_prompt() -> None:
    engine = FakeEngine(chat_template=None)
    guard = guard_with(engine)
    try:
        verdicts = await guard.check_many([HARMLESS, HARMFUL])
    finally:
        await guard.aclose()
    assert isinstance(guard.runner, VLLMRunner)
    assert not guard.runner.chat_template and engine.calls == []
    prompts, _ = engine.generated[0]
    assert prompts == [render_prompt(build_messages(view), bos=None)
                       for view in (HARMLESS, HARMFUL)]
    assert "<BEGIN CONVERSATION>" in prompts[0] and not prompts[0].startswith("<|begin")
    assert [verdict.unsafe for verdict in verdicts] == [False, True]


async def test_check_many_respects_the_batch_size() -> None:
    engine = FakeEngine()
    guard = guard_with(engine, options={"batch_size": 2, "batch_wait_ms": 20})
    try:
        verdicts = await guard.check_many([HARMLESS, HARMFUL, HARMLESS, HARMFUL, HARMFUL])
    finally:
        await guard.aclose()
    assert [verdict.unsafe for verdict in verdicts] == [False, True, False, True, True]
    assert [len(call[0]) for call in engine.calls] == [2, 2, 1]


async def test_threshold_is_the_users_knob() -> None:
    engine = FakeEngine(p_unsafe_no_match=0.3)
    guard = guard_with(engine, threshold=0.25)
    try:
        verdict = await guard.check(HARMLESS)
    finally:
        await guard.aclose()
    assert verdict.unsafe and verdict.extra["text_verdict"] == "safe"


async def test_engine_failures_and_malformed_output_are_guard_errors() -> None:
    engine = FakeEngine(fail=RuntimeError("CUDA out of memory"))
    guard = guard_with(engine)
    try:
        with pytest.raises(GuardError, match="vllm meta-llama/Llama-Guard-3-1B: RuntimeError: "
                                             "CUDA out of memory"):
            await guard.check(HARMLESS)
        engine.fail = None
        engine.output = "The conversation is fine."
        with pytest.raises(GuardError, match="neither 'safe' nor 'unsafe'"):
            await guard.check(HARMLESS)
    finally:
        await guard.aclose()
    with pytest.raises(GuardError, match="closed"):
        await guard.check(HARMLESS)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"url": "http://127.0.0.1:8000/v1"}, r"^guard\.url: "),
        ({"options": {"format": "llama-guard-9"}}, r"^guard\.options\.format: "),
        ({"runner": "endpoint"}, r"^guard\.runner: "),
        ({"options": {"top_logprobs": 0}}, r"^guard\.options\.top_logprobs: "),
        ({"options": {"batchsize": 4}}, r"^guard\.options\.batchsize: not an option"),
    ],
)
def test_config_errors_name_the_field(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        guard_with(FakeEngine(), **settings)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_without_vllm_the_error_says_how_to_install_it() -> None:
    with pytest.raises(ConfigError, match=re.escape(INSTALL_HINT)) as caught:
        create_generative(GuardConfig(kind="vllm"))
    assert str(caught.value).startswith("guard.kind: ")
    with pytest.raises(ConfigError, match=r"^guard\.runner: .*" + re.escape(INSTALL_HINT)):
        create_generative(GuardConfig(kind="shieldgemma", runner="vllm"))


# -- every family on the vllm runner ---------------------------------------------------------------


def scripted(text: str, word: str, alternatives: dict[str, float]) -> CompletionOutput:
    """A completion of ``text`` (one token per word and separator), with ``alternatives`` as the
    top logprobs where ``word`` is written."""
    tokens = re.findall(r"\s+|[^\s]+", text)
    ids = {token: number for number, token in enumerate(dict.fromkeys(
        [*tokens, *alternatives]), start=1000)}
    logprobs: list[dict[int, Logprob]] = []
    for token in tokens:
        ranked = alternatives if token == word else {token: 0.999}
        position = {ids[name]: Logprob(math.log(p), rank, name)
                    for rank, (name, p) in enumerate(ranked.items(), start=1)}
        position.setdefault(ids[token], Logprob(math.log(1e-4), 9, token))
        logprobs.append(position)
    return CompletionOutput(0, text, [ids[token] for token in tokens], None, logprobs)


@dataclass
class ScriptedEngine:
    """``vllm.LLM`` for any family: ``answer`` maps what the model reads (the last message, or a
    prompt) and the template arguments to a completion; every call is recorded."""

    answer: Any
    chat_template: str | None = "{{ messages }}"
    calls: list[tuple[str, Any, dict[str, Any]]] = field(default_factory=list)

    def get_tokenizer(self) -> Any:
        return SimpleNamespace(chat_template=self.chat_template)

    def chat(self, messages: Any, sampling_params: Any = None, use_tqdm: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        kwargs = chat_template_kwargs or {}
        self.calls.append(("chat", messages, kwargs))
        return [RequestOutput(str(n), None, None, None, [self.answer(m[-1]["content"], kwargs)])
                for n, m in enumerate(messages)]

    def generate(self, prompts: Any, sampling_params: Any = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        self.calls.append(("generate", prompts, {}))
        return [RequestOutput(str(n), None, None, None, [self.answer(prompt, {})])
                for n, prompt in enumerate(prompts)]


def on_vllm(engine: ScriptedEngine, kind: str, **settings: Any) -> GenerativeGuard:
    config = GuardConfig.model_validate({"kind": kind, "runner": "vllm", **settings})
    runner = VLLMRunner(config, model="m", guard=kind, engine=engine)
    return create_generative(config, runner=runner)


async def test_qwen3guard_on_vllm_scores_the_severity_word() -> None:
    engine = ScriptedEngine(lambda text, kwargs: scripted(
        "Safety: Unsafe\nCategories: Violent\nRefusal: No", "Unsafe",
        {"Unsafe": 0.6, "Controversial": 0.2, "Safe": 0.1}))
    guard = on_vllm(engine, "qwen3guard")
    try:
        verdict = await guard.check(HARMFUL)
    finally:
        await guard.aclose()
    assert verdict.unsafe and verdict.categories == ("Violent",)
    assert verdict.score == pytest.approx(0.8 / 0.9) and verdict.extra["severity"] == "Unsafe"
    assert verdict.raw == "Safety: Unsafe\nCategories: Violent\nRefusal: No"
    ((method, conversations, kwargs),) = engine.calls
    assert method == "chat" and kwargs == {}
    assert conversations == [build_messages(HARMFUL)]


async def test_the_older_spelling_kind_vllm_with_a_format_is_the_same_guard() -> None:
    engine = ScriptedEngine(lambda text, kwargs: scripted(
        "Safety: Safe\nCategories: None", "Safe", {"Safe": 0.9, "Unsafe": 0.1}))
    config = GuardConfig(kind="vllm", options={"format": "qwen3guard", "controversial": "loose"})
    guard = create_generative(config, runner=VLLMRunner(config, model="m", guard="vllm",
                                                        engine=engine))
    try:
        verdict = await guard.check(HARMLESS)
    finally:
        await guard.aclose()
    assert guard.family.name == "qwen3guard" and guard.name == "vllm"
    assert not verdict.unsafe and verdict.score == pytest.approx(0.1)


async def test_shieldgemma_on_vllm_asks_each_policy_with_its_guideline() -> None:
    def answer(text: str, kwargs: dict[str, Any]) -> CompletionOutput:
        says = "Yes" if "Dangerous" in kwargs["guideline"] and "nerve" in text else "No"
        return scripted(says, says, {says: 0.9, "No" if says == "Yes" else "Yes": 0.1})

    engine = ScriptedEngine(answer)
    guard = on_vllm(engine, "shieldgemma", options={"policies": ["dangerous", "hate"],
                                                    "batch_wait_ms": 20})
    try:
        harmful, harmless = await guard.check_many([HARMFUL, HARMLESS])
    finally:
        await guard.aclose()
    assert harmful.unsafe and harmful.categories == ("dangerous",)
    assert harmful.score == pytest.approx(0.9) and harmful.raw == "dangerous: Yes, hate: No"
    assert not harmless.unsafe and harmless.score == pytest.approx(0.1)
    # One engine call per guideline (template arguments differ), each with both checks.
    assert sorted(kwargs["guideline"].split(":")[0] for _, _, kwargs in engine.calls) == [
        '"No Dangerous Content"', '"No Hate Speech"']
    assert len(engine.calls) == 2 and all(len(batch) == 2 for _, batch, _ in engine.calls)


async def test_wildguard_on_vllm_sends_its_own_prompt_without_bos() -> None:
    engine = ScriptedEngine(lambda text, kwargs: scripted(
        "Harmful request: yes\nResponse refusal: no\nHarmful response: yes", "yes",
        {"yes": 0.7, "no": 0.3}))
    guard = on_vllm(engine, "wildguard")
    try:
        verdict = await guard.check(HARMFUL)
    finally:
        await guard.aclose()
    assert verdict.unsafe and verdict.categories == ("harmful_response",)
    ((method, prompts, _),) = engine.calls
    assert method == "generate" and prompts[0].startswith("<|user|>\n[INST]")
    assert "Get the nerve agent precursors first." in prompts[0]


async def test_a_malformed_answer_fails_only_its_own_check_in_a_batch() -> None:
    engine = ScriptedEngine(lambda text, kwargs: scripted(
        "I would rather not say" if "nerve" in text else "Safety: Safe", "Safe", {"Safe": 0.9}))
    guard = on_vllm(engine, "qwen3guard", options={"batch_wait_ms": 20})
    try:
        harmful, harmless = await asyncio.gather(guard.check(HARMFUL), guard.check(HARMLESS),
                                                 return_exceptions=True)
    finally:
        await guard.aclose()
    assert len(engine.calls) == 1  # one engine call answered both
    assert isinstance(harmful, GuardError) and "rather not say" in str(harmful)
    assert isinstance(harmless, Verdict) and not harmless.unsafe


async def test_granite_without_a_chat_template_on_vllm_is_a_guard_error() -> None:
    engine = ScriptedEngine(lambda text, kwargs: scripted("Yes", "Yes", {"Yes": 0.9}),
                            chat_template=None)
    guard = on_vllm(engine, "granite-guardian")
    try:
        with pytest.raises(GuardError, match=r"guard\.model: .*no chat template"):
            await guard.check(HARMFUL)
    finally:
        await guard.aclose()
    assert engine.calls == []


# -- the real engine -------------------------------------------------------------------------------


def build_tiny_guard_model(folder: Path, unsafe_logit: float, safe_logit: float) -> None:
    """A tiny Llama whose next token is always ``unsafe`` or ``safe`` with the given logits
    (every other token 0): all layers are zeroed, every embedding is ones, so the last hidden
    state is ones and the logits are the lm_head rows' sums. A BPE tokenizer trained here, with
    a chat template, makes it loadable as any chat model is."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = ["safe unsafe S1 S9 user assistant verdict", "unsafe\nS9", "safe",
              "How do I bake bread? Knead the dough."] * 10
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|eot|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if {"safe", "unsafe"} - set(tokenizer.get_vocab()):
        raise AssertionError("the answers must be single tokens")
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, eos_token="<|eot|>", bos_token="<|eot|>",
        pad_token="<|eot|>")
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                "{% endfor %}verdict:")
    fast.chat_template = template
    fast.save_pretrained(folder)
    # Readable by the transformers release vLLM brings, whichever it is.
    settings_file = folder / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text())
    settings.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=template)
    settings_file.write_text(json.dumps(settings))
    vocab = fast.get_vocab()
    hidden = 128  # head size 64: every vLLM attention backend supports it
    eot = vocab["<|eot|>"]
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight[vocab["unsafe"]].fill_(unsafe_logit / hidden)
        model.lm_head.weight[vocab["safe"]].fill_(safe_logit / hidden)
    model.save_pretrained(folder)


def test_the_tiny_model_prefers_the_chosen_answer(tmp_path: Path) -> None:
    """The premise of the GPU test, checked where it can run (transformers on the CPU)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_guard_model(tmp_path, unsafe_logit=6.0, safe_logit=5.0)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    prompt = tokenizer.apply_chat_template(build_messages(HARMLESS), tokenize=False)
    with torch.no_grad():
        logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
    vocab = tokenizer.get_vocab()
    unsafe, safe = logits[vocab["unsafe"]].item(), logits[vocab["safe"]].item()
    assert unsafe == pytest.approx(6.0, abs=1e-3) and safe == pytest.approx(5.0, abs=1e-3)
    assert int(logits.argmax()) == vocab["unsafe"]


def _gpu_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'reasoning-guardrail[vllm]')"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU and none is available"
    return None


@pytest.mark.skipif(_gpu_reason() is not None, reason=_gpu_reason() or "")
async def test_real_vllm_engine_scores_from_logprobs(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    build_tiny_guard_model(tmp_path, unsafe_logit=6.0, safe_logit=5.0)
    config = GuardConfig(kind="vllm", model=str(tmp_path), options={
        "max_tokens": 1, "engine": {"gpu_memory_utilization": 0.2, "max_model_len": 512,
                                    "enforce_eager": True, "dtype": "float16"}})
    guard = create_generative(config)
    try:
        verdicts = await guard.check_many([HARMLESS, HARMFUL])
    finally:
        await guard.aclose()
    expected = 1 / (1 + math.exp(-1.0))  # sigmoid(6 - 5)
    for verdict in verdicts:
        assert verdict.raw == "unsafe" and verdict.unsafe
        assert verdict.score == pytest.approx(expected, abs=0.01)
        assert verdict.extra["score_source"] == "logprobs"
