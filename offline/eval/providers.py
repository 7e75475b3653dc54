"""Two Inspect model providers of our own, registered by name with Inspect:

- ``guardrail-hf/<folder or hub id>``: a transformers model with its own chat template. Inspect's
  ``hf/`` provider loads a local folder too, but it reports every output as finished (a trace cut
  at ``max_tokens`` would be scored as an answer), samples unless told otherwise (temperature 0
  fails), and takes no repetition penalty (STAR-1's decoding); this one does all three. It
  generates one request at a time: for throughput on a GPU use vLLM (``vllm/``).
- ``guardrail-openai/<served model>``: Inspect's OpenAI-compatible provider, which also keeps the
  response's ``guardrail`` field (the proxy's own account: action, checks, flagged steps) in the
  output's metadata. Any OpenAI-compatible endpoint works; the proxy adds that field.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from inspect_ai.model import (
    ChatCompletionChoice,
    ChatMessage,
    ChatMessageAssistant,
    GenerateConfig,
    ModelAPI,
    ModelOutput,
    ModelUsage,
    StopReason,
    modelapi,
)
from inspect_ai.model._model_call import ModelCall
from inspect_ai.model._providers.openai_compatible import OpenAICompatibleAPI
from inspect_ai.tool import ToolChoice, ToolInfo

from guardrail.reasoning import OPEN_TAG

DEFAULT_MAX_TOKENS = 4096
_DEFAULT_CONFIG = GenerateConfig()


class TransformersAPI(ModelAPI):
    def __init__(self, model_name: str, base_url: str | None = None, api_key: str | None = None,
                 config: GenerateConfig = _DEFAULT_CONFIG, **model_args: Any) -> None:
        super().__init__(model_name=model_name, base_url=base_url, api_key=api_key,
                         api_key_vars=[], config=config)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = str(model_args.pop("device", "cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_name)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{model_name}: the tokenizer has no chat template")
        model: Any = AutoModelForCausalLM.from_pretrained(model_name, **model_args)
        self.model: Any = model.to(device)
        self.model.eval()
        self.device = device
        self._lock = threading.Lock()

    def max_tokens(self) -> int | None:
        return DEFAULT_MAX_TOKENS

    def max_connections(self) -> int:
        return 1

    async def generate(self, input: list[ChatMessage], tools: list[ToolInfo],
                       tool_choice: ToolChoice, config: GenerateConfig) -> ModelOutput:
        messages = [{"role": message.role, "content": message.text} for message in input]
        return await asyncio.to_thread(self._generate, messages, config)

    def _generate(self, messages: list[dict[str, str]], config: GenerateConfig) -> ModelOutput:
        import torch

        prompt: str = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                         tokenize=False)
        # The template may open the think block itself (R1-Distill): the output then holds only
        # the closing tag, and text with none is reasoning that never ended.
        think_open = prompt.rstrip().endswith(OPEN_TAG)
        encoded = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        encoded = {key: value.to(self.device) for key, value in encoded.items()}
        max_new = config.max_tokens or DEFAULT_MAX_TOKENS
        temperature = config.temperature or 0.0
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": temperature > 0,
                                  "pad_token_id": self.tokenizer.pad_token_id
                                  or self.tokenizer.eos_token_id}
        if temperature > 0:
            kwargs["temperature"] = temperature
            if config.top_p is not None:
                kwargs["top_p"] = config.top_p
        penalty = (config.extra_body or {}).get("repetition_penalty")
        if penalty is not None:
            kwargs["repetition_penalty"] = float(penalty)
        with self._lock, torch.no_grad():
            if config.seed is not None:
                torch.manual_seed(config.seed)
            generated = self.model.generate(**encoded, **kwargs)
        new = generated[0][encoded["input_ids"].shape[1]:]
        eos = self.tokenizer.eos_token_id
        finished = len(new) > 0 and int(new[-1]) == eos
        stop: StopReason = "stop" if finished or len(new) < max_new else "max_tokens"
        text: str = self.tokenizer.decode(new, skip_special_tokens=True)
        input_tokens = int(encoded["input_ids"].shape[1])
        return ModelOutput(
            model=self.model_name,
            choices=[ChatCompletionChoice(
                message=ChatMessageAssistant(content=text, model=self.model_name,
                                             source="generate"),
                stop_reason=stop)],
            usage=ModelUsage(input_tokens=input_tokens, output_tokens=len(new),
                             total_tokens=input_tokens + len(new)),
            metadata={"think_open": think_open},
        )


class ProxyAwareOpenAIAPI(OpenAICompatibleAPI):
    def __init__(self, model_name: str, base_url: str | None = None, api_key: str | None = None,
                 config: GenerateConfig = _DEFAULT_CONFIG, **model_args: Any) -> None:
        super().__init__(model_name=model_name, base_url=base_url, api_key=api_key or "EMPTY",
                         config=config, service=str(model_args.pop("service", "endpoint")),
                         **model_args)

    async def generate(self, input: list[ChatMessage], tools: list[ToolInfo],
                       tool_choice: ToolChoice, config: GenerateConfig
                       ) -> ModelOutput | tuple[ModelOutput | Exception, ModelCall]:
        result = await super().generate(input, tools, tool_choice, config)
        if isinstance(result, tuple):
            output, call = result
            response = call.response if isinstance(call.response, dict) else {}
            proxy = response.get("guardrail")
            if isinstance(output, ModelOutput) and isinstance(proxy, dict):
                output.metadata = {**(output.metadata or {}), "guardrail": proxy}
        return result


@modelapi(name="guardrail-hf")
def guardrail_hf() -> type[ModelAPI]:
    return TransformersAPI


@modelapi(name="guardrail-openai")
def guardrail_openai() -> type[ModelAPI]:
    return ProxyAwareOpenAIAPI
