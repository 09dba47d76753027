"""From an OpenAI request to engine requests, and from engine outputs to OpenAI responses and stream chunks."""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from adaq.engine.chat import TemplateRenderer, has_chat_template, render_chat
from adaq.engine.llm_engine import LLMEngine, RequestOutput
from adaq.engine.sampling_params import SamplingParams
from adaq.errors import AdaqError
from adaq.serve.engine_loop import EngineFailed, EngineRequest, RequestGroup
from adaq.serve.errors import bad_request, context_length_exceeded, error_body
from adaq.serve.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                 ChatCompletionRequest, ChatCompletionResponse, CompletionChoice,
                                 CompletionRequest, CompletionResponse, Delta, SamplingFields, Usage)

DONE = "data: [DONE]\n\n"
# The longest text a token stands for in the vocabularies adaq runs is well under 32 characters (runs of spaces or
# dashes): a prompt longer than max_prompt_tokens x 32 characters cannot fit, and is refused before it is tokenized.
MAX_CHARS_PER_TOKEN = 32


@dataclass
class Limits:
    max_model_len: int
    max_prompt_tokens: int
    max_output_tokens: int

    @property
    def max_prompt_chars(self) -> int:
        return self.max_prompt_tokens * MAX_CHARS_PER_TOKEN


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None = None  # as given (echo)


@dataclass
class Plan:
    """What one HTTP request asks of the engine: its prompts, and n samples of each."""

    response_id: str
    model: str
    prompts: list[Prompt]
    requests: list[EngineRequest]
    n: int
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_tokens(self) -> int:
        return sum(len(prompt.token_ids) for prompt in self.prompts)

    def prompt_of(self, index: int) -> Prompt:
        return self.prompts[index // self.n]


# ---- requests ------------------------------------------------------------------------------------------------------
def reject_unsupported(body: SamplingFields) -> None:
    if body.presence_penalty or body.frequency_penalty:
        raise bad_request("presence_penalty and frequency_penalty are not supported", "presence_penalty")
    if body.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")
    if isinstance(body, CompletionRequest):
        if body.logprobs:
            raise bad_request("logprobs are not supported", "logprobs")
        if body.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if body.best_of not in (None, body.n):
            raise bad_request("best_of must equal n (no server-side ranking)", "best_of")
    if isinstance(body, ChatCompletionRequest):
        if body.logprobs or body.top_logprobs:
            raise bad_request("logprobs are not supported", "logprobs")
        if body.tools:
            raise bad_request("tools are not supported", "tools")
        if body.response_format is not None and body.response_format.type != "text":
            raise bad_request("only response_format {\"type\": \"text\"} is supported", "response_format")


async def completion_prompts(engine: LLMEngine, body: CompletionRequest, limits: Limits) -> list[Prompt]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return [Prompt(await _encode(engine, prompt, limits, "prompt"), prompt)]
    if isinstance(prompt[0], str):
        return [Prompt(await _encode(engine, text, limits, "prompt"), text) for text in prompt]
    id_lists = [list(prompt)] if isinstance(prompt[0], int) else [list(ids) for ids in prompt]
    # echo needs the prompt's text: the decoded ids (the vocabulary check comes later, in the engine)
    texts = [_decode(engine, ids) if body.echo else None for ids in id_lists]
    return [Prompt(ids, text) for ids, text in zip(id_lists, texts)]


def _decode(engine: LLMEngine, ids: list[int]) -> str | None:
    try:
        return engine.tokenizer.decode(ids)
    except (OverflowError, IndexError, TypeError, ValueError):
        return None


async def chat_prompt(engine: LLMEngine, body: ChatCompletionRequest, limits: Limits,
                      renderer: TemplateRenderer) -> list[Prompt]:
    if not has_chat_template(engine.tokenizer):
        raise bad_request("this model's tokenizer has no chat template (a base model?): use /v1/completions, or add "
                          "a chat_template to the checkpoint's tokenizer_config.json", "messages",
                          "chat_template_missing")
    messages = [{"role": message.role, "content": message.text()} for message in body.messages]
    _check_prompt_chars(sum(len(message["content"]) for message in messages), limits, "messages")
    try:
        # In a worker process with a time and a memory limit, waited for off the event loop.
        text = await asyncio.to_thread(render_chat, engine.tokenizer, messages, body.add_generation_prompt, renderer)
    except AdaqError as error:
        raise bad_request(str(error), "messages", "chat_template_failed") from None
    return [Prompt(await _encode(engine, text, limits, "messages", add_special_tokens=False))]


async def _encode(engine: LLMEngine, text: str, limits: Limits, param: str,
                  add_special_tokens: bool = True) -> list[int]:
    _check_prompt_chars(len(text), limits, param)
    # Off the event loop: even a prompt under the limit takes a while to tokenize.
    return await asyncio.to_thread(_tokenize, engine, text, add_special_tokens, param)


def _tokenize(engine: LLMEngine, text: str, add_special_tokens: bool, param: str) -> list[int]:
    try:
        return engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except (TypeError, ValueError, UnicodeError) as error:  # e.g. a lone surrogate ("\ud800"), valid JSON
        raise bad_request(f"the prompt cannot be tokenized: {str(error)[:200]}", param, "invalid_prompt") from None


def _check_prompt_chars(num_chars: int, limits: Limits, param: str) -> None:
    if num_chars > limits.max_prompt_chars:
        raise context_length_exceeded(
            f"the prompt has {num_chars} characters: it cannot fit in the {limits.max_prompt_tokens} tokens this "
            f"server accepts (--max-prompt-tokens; at most {MAX_CHARS_PER_TOKEN} characters a token)", param)


def plan_requests(body: SamplingFields, prompts: list[Prompt], limits: Limits, defaults: dict, model: str,
                  prefix: str, asked_max_tokens: int | None, prompt_param: str) -> Plan:
    if len(prompts) * body.n > 64:
        raise bad_request(f"{len(prompts)} prompts x n={body.n} is more than 64 sequences per request", "n")
    requests = []
    for prompt in prompts:
        _check_prompt_length(len(prompt.token_ids), limits, prompt_param)
        max_tokens = _max_tokens(asked_max_tokens, len(prompt.token_ids), limits)
        requests += [EngineRequest(prompt.token_ids, sampling_params(body, max_tokens, defaults, sample))
                     for sample in range(body.n)]
    return Plan(f"{prefix}-{uuid.uuid4().hex}", model, prompts, requests, body.n)


def _check_prompt_length(num_tokens: int, limits: Limits, param: str) -> None:
    if num_tokens > limits.max_prompt_tokens:
        raise context_length_exceeded(f"the prompt has {num_tokens} tokens, more than this server accepts "
                                      f"({limits.max_prompt_tokens}, --max-prompt-tokens)", param)


def _max_tokens(asked: int | None, prompt_len: int, limits: Limits) -> int:
    room = limits.max_model_len - prompt_len
    if asked is None:
        if room < 1:
            raise context_length_exceeded(f"this model's maximum context length is {limits.max_model_len} tokens "
                                          f"and the prompt has {prompt_len}: no room to generate", "max_tokens")
        return min(room, limits.max_output_tokens)
    if asked > limits.max_output_tokens:
        raise bad_request(f"max_tokens is {asked}, more than this server allows ({limits.max_output_tokens}, "
                          f"--max-output-tokens)", "max_tokens", "max_tokens_too_large")
    if asked > room:
        raise context_length_exceeded(
            f"this model's maximum context length is {limits.max_model_len} tokens, but {prompt_len + asked} were "
            f"requested ({prompt_len} in the prompt, {asked} for the completion): reduce the prompt or max_tokens",
            "max_tokens")
    return asked


def sampling_params(body: SamplingFields, max_tokens: int, defaults: dict, sample: int) -> SamplingParams:
    def pick(name: str, fallback):
        value = getattr(body, name)
        return value if value is not None else defaults.get(name, fallback)

    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0), min_p=pick("min_p", 0.0),
            seed=None if body.seed is None else (body.seed + sample) % 2**63, stop=list(body.stop or []),
            stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
            include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens)
    except AdaqError as error:
        raise bad_request(str(error)) from None


# ---- whole responses -----------------------------------------------------------------------------------------------
def usage(plan: Plan, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=plan.prompt_tokens + completion_tokens)


def completion_response(plan: Plan, finals: list[RequestOutput], echo: bool) -> CompletionResponse:
    choices = [CompletionChoice(index=index, text=_echoed(plan, index, echo) + output.text,
                                finish_reason=output.finish_reason) for index, output in enumerate(finals)]
    return CompletionResponse(id=plan.response_id, created=plan.created, model=plan.model, choices=choices,
                              usage=usage(plan, sum(len(output.token_ids) for output in finals)))


def chat_response(plan: Plan, finals: list[RequestOutput]) -> ChatCompletionResponse:
    choices = [ChatChoice(index=index, message=AssistantMessage(content=output.text),
                          finish_reason=output.finish_reason) for index, output in enumerate(finals)]
    return ChatCompletionResponse(id=plan.response_id, created=plan.created, model=plan.model, choices=choices,
                                  usage=usage(plan, sum(len(output.token_ids) for output in finals)))


def _echoed(plan: Plan, index: int, echo: bool) -> str:
    if not echo:
        return ""
    prompt = plan.prompt_of(index)
    return prompt.text if prompt.text is not None else ""


# ---- streams -------------------------------------------------------------------------------------------------------
def sse(payload) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


async def completion_stream(plan: Plan, group: RequestGroup, include_usage: bool, echo: bool) -> AsyncIterator[str]:
    def chunk(index: int, text: str, finish_reason: str | None, usage_: Usage | None = None) -> str:
        choices = [] if index < 0 else [CompletionChoice(index=index, text=text, finish_reason=finish_reason)]
        return sse(CompletionResponse(id=plan.response_id, created=plan.created, model=plan.model, choices=choices,
                                      usage=usage_))

    if echo:
        for index in range(len(plan.requests)):
            yield chunk(index, _echoed(plan, index, echo), None)
    async for piece in _stream(plan, group, include_usage, chunk):
        yield piece


async def chat_stream(plan: Plan, group: RequestGroup, include_usage: bool) -> AsyncIterator[str]:
    def chunk(index: int, text: str | None, finish_reason: str | None, usage_: Usage | None = None,
              role: str | None = None) -> str:
        choices = [] if index < 0 else [ChatChunkChoice(index=index, delta=Delta(role=role, content=text),
                                                        finish_reason=finish_reason)]
        return sse(ChatCompletionChunk(id=plan.response_id, created=plan.created, model=plan.model,
                                       choices=choices, usage=usage_))

    for index in range(len(plan.requests)):
        yield chunk(index, "", None, role="assistant")
    async for piece in _stream(plan, group, include_usage,
                               lambda i, text, reason, u=None: chunk(i, text or None, reason, u)):
        yield piece


async def _stream(plan: Plan, group: RequestGroup, include_usage: bool, chunk) -> AsyncIterator[str]:
    """Chunks of text as the engine produces them; the usage chunk (if asked), an error if the engine failed;
    then [DONE]."""
    counts = [0] * len(plan.requests)
    try:
        async for index, output in group.outputs():
            counts[index] = len(output.token_ids)
            if output.new_text or output.finished:
                yield chunk(index, output.new_text, output.finish_reason if output.finished else None)
        if include_usage:
            yield chunk(-1, "", None, usage(plan, sum(counts)))
    except EngineFailed as failure:
        yield sse(error_body(500, str(failure)))
    yield DONE
