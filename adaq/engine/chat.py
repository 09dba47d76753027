"""Chat prompts through the tokenizer's own chat template (apply_chat_template), as transformers and vLLM do."""

from adaq.errors import AdaqError


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}]), ending where the assistant's turn starts."""
    if tokenizer is None or not has_chat_template(tokenizer):
        raise AdaqError("the tokenizer has no chat template: use --no-chat (plain completion) or add a "
                        "chat_template to tokenizer_config.json")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # jinja errors: a bad role order, a template that raises on purpose
        raise AdaqError(f"the chat template rejected the messages ({type(error).__name__}: {error})") from None


def chat_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the rendered chat; the template already writes BOS, so the tokenizer must not add another."""
    return tokenizer.encode(render_chat(tokenizer, messages), add_special_tokens=False)
