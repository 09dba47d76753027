"""A hostile chat template and the server limits it is tried against (tests/test_serve_limits.py, scripts/fuzz_http.py)."""

READ_TIMEOUT_S = 2
TEMPLATE_TIMEOUT_S = 3
# One template, three behaviours picked by the last message: a runaway loop (10^10 iterations), a 10 GB string,
# or the tiny tokenizer's own plain rendering.
HOSTILE_TEMPLATE = (
    "{% if messages[-1].content == 'loop' %}"
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
    "{% elif messages[-1].content == 'big' %}{{ 'x' * 10000000000 }}"
    "{% else %}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>{% endif %}"
)
