"""A Chat → the text the model sees (through the tokenizer's own chat template) and the character spans of
the assistant turns, which are what it learns.

    text, spans = chat_text(tok, chat, where)

Tool calling: when the template renders tools (a probe conversation with a tool definition, a call and a
result comes out with all three, and append-only), rows go through it with `tools=`. Otherwise (SmolLM2's
template, the fallback template, most small models) they are rewritten into plain turns, the documented
fallback (README, "Tool calling"): the tool definitions join the system message inside <tools></tools>,
an assistant call becomes <tool_call>{"name": ..., "arguments": {...}}</tool_call> in its turn, and tool
results become a user turn of <tool_response>...</tool_response> blocks. Either way the loss is on the
assistant's calls and answers and never on tool results.

Labels come from character spans, never from comparing token ids with the pad id: SmolLM2's pad token is
<|im_end|>, the end-of-turn token, and masking by id would teach the model never to stop (offline-assets.md).
"""

from __future__ import annotations

import json
from typing import Any

from jinja2.exceptions import TemplateError

from engine.ml.data.diagnose import DatasetError
from engine.ml.data.formats import ASSISTANT, SYSTEM, TOOL, USER, Chat

FALLBACK_TOOLS_PROMPT = (
    'You can call these tools. To call one, answer with <tool_call>{"name": ..., "arguments": {...}}</tool_call>; '
    "each result comes back as <tool_response>...</tool_response>.\n<tools>\n{tools}\n</tools>"
)
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "probe_fn_zq",
        "description": "probe-description-zq",
        "parameters": {"type": "object", "properties": {"xq": {"type": "string"}}, "required": ["xq"]},
    },
}
_PROBE = [
    {"role": SYSTEM, "content": "sys"},
    {"role": USER, "content": "question"},
    {
        "role": ASSISTANT,
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "probe_fn_zq", "arguments": {"xq": "argument-zq"}}}],
    },
    {"role": TOOL, "content": "result-zq", "name": "probe_fn_zq"},
    {"role": ASSISTANT, "content": "answer"},
]
_native: dict[tuple[str, int], bool] = {}


def render(tok, messages: list[dict[str, Any]], tools: list | None = None, add_generation_prompt: bool = False) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


def native_tools(tok) -> bool:
    """Does this tokenizer's chat template render tool definitions, calls and results (append-only)?"""
    template = getattr(tok, "chat_template", None) or ""
    key = (str(getattr(tok, "name_or_path", "")), hash(str(template)))
    if key not in _native:
        try:
            text = render(tok, _PROBE, [_PROBE_TOOL])
            shown = all(s in text for s in ("probe-description-zq", "argument-zq", "result-zq"))
            _native[key] = shown and bool(assistant_spans(tok, _PROBE, [_PROBE_TOOL], set())[1])
        except (TemplateError, TypeError, KeyError, ValueError, DatasetError):
            _native[key] = False
    return _native[key]


def chat_text(tok, chat: Chat, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trained assistant turns."""
    messages, tools, masked = chat.messages, chat.tools, chat.masked
    if chat.uses_tools and not native_tools(tok):
        messages, masked = plain_messages(chat)
        tools = []
    try:
        return assistant_spans(tok, messages, tools, masked)
    except (TemplateError, TypeError) as e:
        raise DatasetError(f"{where}: the model's chat template refuses this conversation: {e}") from None
    except DatasetError as e:
        raise DatasetError(f"{where}: {e}") from None


def assistant_spans(
    tok, msgs: list[dict[str, Any]], tools: list | None, masked: set[int]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of each trained assistant turn (content + end-of-turn).

    Turn i's span is what rendering msgs[:i+1] adds after the generation prompt of msgs[:i]; this needs
    an append-only template (ChatML and nearly all others are).
    """
    full = render(tok, msgs, tools)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != ASSISTANT or i in masked:
            continue
        prefix = render(tok, msgs[:i], tools, add_generation_prompt=True)
        upto = render(tok, msgs[: i + 1], tools)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise DatasetError(
                "the tokenizer's chat template is not append-only, so response-only labels cannot be placed; "
                "set train_on: all"
            )
        spans.append((len(prefix), len(upto)))
    return full, spans


def plain_messages(chat: Chat) -> tuple[list[dict[str, str]], set[int]]:
    """The fallback rendering of tool use as plain system/user/assistant turns (see the module docstring)."""
    out: list[dict[str, str]] = []
    masked: set[int] = set()
    if chat.tools:
        listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in chat.tools)
        tools_text = FALLBACK_TOOLS_PROMPT.replace("{tools}", listing)
        first = chat.messages[0] if chat.messages else None
        if first is not None and first["role"] == SYSTEM:
            out.append({"role": SYSTEM, "content": f"{first['content']}\n\n{tools_text}"})
        else:
            out.append({"role": SYSTEM, "content": tools_text})
    for i, m in enumerate(chat.messages):
        if chat.tools and i == 0 and m["role"] == SYSTEM:
            continue  # merged with the tool listing above
        if m["role"] == TOOL:
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == USER and out[-1]["content"].startswith("<tool_response>"):
                out[-1] = {"role": USER, "content": f"{out[-1]['content']}\n{block}"}
            else:
                out.append({"role": USER, "content": block})
            continue
        content = m["content"]
        if m.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False
                )
                + "\n</tool_call>"
                for c in m["tool_calls"]
            )
            content = f"{content}\n{calls}" if content.strip() else calls
        if i in chat.masked:
            masked.add(len(out))
        out.append({"role": m["role"], "content": content})
    return out, masked
