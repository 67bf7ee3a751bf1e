"""Row formats: which one a dataset is, and each row as a Chat, a (prompt, completion) pair or plain text.

    fmt = detect_format(part.ds.column_names, part.name)     # or cfg.dataset_format
    item = to_item(row, fmt, where="d.jsonl line 3")         # Chat | (prompt, completion) | str

Formats (auto-detected from the columns; README "Datasets" has a one-line example of each):

    messages           OpenAI chat: {"messages": [{"role": "user", "content": ...}, ...]}; content a string or a
                       list of parts ({"type": "text", "text"|"value": ...}); assistant `tool_calls`, `role: tool`
                       results, a top-level `tools` list; `weight: 0` on an assistant message masks it
    sharegpt           {"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation",
                       "value": ...}]} with optional `system` and `tools` columns (LLaMA-Factory's layout)
    alpaca             {"instruction", "input", "output"} with optional `system` and `history` [[q, a], ...]
    prompt_completion  {"prompt", "completion"|"response"}: raw continuation; or lists of messages (TRL)
    text               {"text"} rows, or .txt files: continued pre-training (engine.ml.data.tokens groups them)

Preference data (chosen/rejected), KTO labels and anything else get an error saying what the data looks
like and what is supported. Keys whose value is null are absent (Arrow fills missing struct keys with
null when it unifies rows).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from engine.ml.data.diagnose import DatasetError

USER, ASSISTANT, SYSTEM, TOOL, CALL = "user", "assistant", "system", "tool", "call"
ROLE_ALIASES = {
    "user": USER,
    "human": USER,
    "assistant": ASSISTANT,
    "gpt": ASSISTANT,
    "bot": ASSISTANT,
    "model": ASSISTANT,
    "chatgpt": ASSISTANT,
    "system": SYSTEM,
    "tool": TOOL,
    "observation": TOOL,
    "function": TOOL,  # OpenAI's older function-calling result message
    "ipython": TOOL,
    "function_call": CALL,  # ShareGPT: an assistant turn whose value is the call as JSON
    "tool_call": CALL,
}
TEXT_PARTS = {None, "text", "input_text", "output_text"}
MEDIA_PARTS = {"image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file", "image_file"}
SUPPORTED = (
    "messages (OpenAI chat, with tool calls), conversations (ShareGPT), instruction+output (alpaca), "
    "prompt+completion, or text"
)


@dataclass
class Chat:
    """A conversation in the OpenAI layout transformers' chat templates take, and its tool definitions."""

    messages: list[dict[str, Any]]  # role system|user|assistant|tool; content str; assistant may have tool_calls
    tools: list[dict[str, Any]] = field(default_factory=list)
    masked: set[int] = field(default_factory=set)  # assistant messages not trained on (OpenAI weight 0)

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or any(m["role"] == TOOL or m.get("tool_calls") for m in self.messages)


Item = Chat | tuple[str, str] | str


# ---- which format ---------------------------------------------------------------------------------------


def detect_format(columns: list[str], name: str) -> str:
    """The format of a dataset with these columns; DatasetError for preference data and unknown layouts."""
    c = set(columns)
    if {"chosen", "rejected"} <= c:
        raise DatasetError(
            f"{name}: looks like preference data (columns {sorted(c)}: chosen/rejected pairs for DPO/ORPO); "
            "LoRA Lab trains supervised: keep the chosen side, e.g. columns: {messages: chosen} when chosen is a "
            "conversation, or {prompt: prompt, completion: chosen}, and drop the rejected one"
        )
    if {"prompt", "completion", "label"} <= c:
        raise DatasetError(
            f"{name}: looks like unpaired preference (KTO) data: 'label' marks completions good or bad, and "
            "supervised training would learn the bad ones too; keep only the rows labelled true and drop the column"
        )
    for fmt, need in (
        ("messages", {"messages"}),
        ("sharegpt", {"conversations"}),
        ("alpaca", {"instruction", "output"}),
        ("prompt_completion", {"prompt", "completion"}),
        ("prompt_completion", {"prompt", "response"}),
        ("text", {"text"}),
    ):
        if need <= c:
            return fmt
    raise DatasetError(
        f"{name}: cannot tell the format from columns {sorted(c)}; expected {SUPPORTED}. Map your names with "
        "columns (e.g. 'prompt=question, response=answer') or set dataset_format"
    )


FORMAT_COLUMNS = {
    "messages": ({"messages"},),
    "sharegpt": ({"conversations"},),
    "alpaca": ({"instruction", "output"},),
    "prompt_completion": ({"prompt", "completion"}, {"prompt", "response"}),
    "text": ({"text"},),
}


def check_format(fmt: str, columns: list[str], name: str) -> None:
    """A forced dataset_format must find its columns."""
    options = FORMAT_COLUMNS[fmt]
    if not any(need <= set(columns) for need in options):
        need = " or ".join("+".join(sorted(n)) for n in options)
        raise DatasetError(f"{name}: dataset_format {fmt} needs columns {need}; the data has {sorted(columns)}")


# ---- a row as an item ---------------------------------------------------------------------------------------


def to_item(row: dict[str, Any], fmt: str, where: str) -> Item:
    """A chat, a (prompt, completion) pair or plain text; errors name the row and what is wrong."""
    if fmt == "text":
        return _text(row, "text", where, fmt)
    if fmt == "prompt_completion":
        return _prompt_completion(row, where)
    if fmt == "alpaca":
        return _alpaca(row, where)
    key, role_key, content_key = (
        ("messages", "role", "content") if fmt == "messages" else ("conversations", "from", "value")
    )
    chat = Chat(_turns(row.get(key), key, role_key, content_key, where), tools=_tools(row.get("tools"), where))
    system = row.get("system")
    if system is not None and str(system).strip() and not any(m["role"] == SYSTEM for m in chat.messages):
        chat.messages.insert(0, {"role": SYSTEM, "content": _text(row, "system", where, fmt)})
    return _finish(chat, where)


def _finish(chat: Chat, where: str) -> Chat:
    chat.masked = {i for i, m in enumerate(chat.messages) if m.pop("weight", 1) == 0}
    if not any(m["role"] == ASSISTANT for m in chat.messages):
        raise DatasetError(f"{where}: the conversation has no assistant turn to learn from")
    return chat


def _text(row: dict[str, Any], key: str, where: str, fmt: str, required: bool = True) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise DatasetError(f"{where}: {fmt} row needs a non-empty {key!r} field")
        return ""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise DatasetError(f"{where}: {key!r} must be text, got {type(v).__name__}")
    return str(v)


def _prompt_completion(row: dict[str, Any], where: str) -> Item:
    out = "completion" if row.get("completion") is not None else "response"
    p, c = row.get("prompt"), row.get(out)
    if isinstance(p, list) and isinstance(c, list):  # TRL's conversational prompt/completion
        return _finish(Chat(_turns(p + c, "prompt", "role", "content", where), _tools(row.get("tools"), where)), where)
    return _text(row, "prompt", where, "prompt_completion"), _text(row, out, where, "prompt_completion")


def _alpaca(row: dict[str, Any], where: str) -> Chat:
    extra = _text(row, "input", where, "alpaca", required=False)
    msgs = []
    if row.get("system") is not None and str(row["system"]).strip():
        msgs.append({"role": SYSTEM, "content": _text(row, "system", where, "alpaca")})
    history = row.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        raise DatasetError(f"{where}: 'history' must be a list of [instruction, response] pairs")
    for q, a in history:
        msgs += [{"role": USER, "content": str(q)}, {"role": ASSISTANT, "content": str(a)}]
    user = _text(row, "instruction", where, "alpaca") + (f"\n\n{extra}" if extra else "")
    msgs += [{"role": USER, "content": user}, {"role": ASSISTANT, "content": _text(row, "output", where, "alpaca")}]
    return Chat(msgs)


def _turns(turns: Any, key: str, role_key: str, content_key: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: {key!r} must be a non-empty list of turns")
    msgs: list[dict[str, Any]] = []
    for j, t in enumerate(turns, 1):
        if not isinstance(t, dict):
            raise DatasetError(f"{where}: turn {j} must be an object with {role_key!r} and {content_key!r}")
        t = {k: v for k, v in t.items() if v is not None}
        raw_role = t.get(role_key, t.get("role", t.get("from")))
        role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise DatasetError(
                f"{where}: turn {j} has role {raw_role!r}; use user, assistant, system or tool "
                "(ShareGPT: human, gpt, system, function_call, observation)"
            )
        content = t.get(content_key, t.get("content", t.get("value")))
        if role == CALL:
            msgs.append({"role": ASSISTANT, "content": "", "tool_calls": _sharegpt_calls(content, where, j)})
            continue
        m: dict[str, Any] = {"role": role, "content": _content(content, where, j, role)}
        if role == ASSISTANT:
            calls = t.get("tool_calls") or ([t["function_call"]] if t.get("function_call") else [])
            if calls:
                m["tool_calls"] = [_call(c, where, j) for c in calls]
            if t.get("weight") is not None:
                m["weight"] = t["weight"]
        elif role == TOOL:
            for k in ("tool_call_id", "name"):
                if t.get(k) is not None:
                    m[k] = str(t[k])
        elif not m["content"].strip() and role == USER:
            raise DatasetError(f"{where}: turn {j} ({role}) is empty")
        msgs.append(m)
    return msgs


def _content(content: Any, where: str, j: int, role: str) -> str:
    """A message's text: a string, or the text parts of a list of parts joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (int, float)) and not isinstance(content, bool):
        return str(content)
    if isinstance(content, dict) and role == TOOL:
        return json.dumps(content, ensure_ascii=False)  # a structured tool result, as the model will see it
    parts = [content] if isinstance(content, dict) else content
    if not isinstance(parts, list):
        raise DatasetError(f"{where}: turn {j} content must be text or a list of parts, got {type(content).__name__}")
    texts = []
    for k, part in enumerate(parts, 1):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise DatasetError(f"{where}: turn {j} part {k} must be an object, got {type(part).__name__}")
        part = {a: b for a, b in part.items() if b is not None}
        kind = part.get("type")
        if kind in MEDIA_PARTS or (kind is None and MEDIA_PARTS & set(part)):
            raise DatasetError(
                f"{where}: turn {j} has an {kind or next(iter(MEDIA_PARTS & set(part)))} part: multimodal rows are "
                "not supported (LoRA Lab trains text-only language models); remove those rows or their media parts"
            )
        text = next((part[x] for x in ("text", "value", "content") if isinstance(part.get(x), str)), None)
        if kind not in TEXT_PARTS or text is None:
            raise DatasetError(
                f"{where}: turn {j} part {k} ({kind!r}) has no text; text parts look like "
                '{"type": "text", "text": "..."}'
            )
        texts.append(text)
    return "\n".join(texts)


def _arguments(args: Any, where: str, j: int) -> dict[str, Any]:
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: turn {j}: tool call arguments are not valid JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise DatasetError(f"{where}: turn {j}: tool call arguments must be a JSON object, got {type(args).__name__}")
    return args


def _call(c: Any, where: str, j: int) -> dict[str, Any]:
    """OpenAI {"type": "function", "function": {"name", "arguments"}} (or a bare {"name", "arguments"})."""
    if not isinstance(c, dict):
        raise DatasetError(f"{where}: turn {j}: a tool call must be an object, got {type(c).__name__}")
    fn = c.get("function") if isinstance(c.get("function"), dict) else c
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise DatasetError(f"{where}: turn {j}: a tool call needs a function name")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": _arguments(fn.get("arguments"), where, j)}}
    if c.get("id") is not None:
        out["id"] = str(c["id"])
    return out


def _sharegpt_calls(value: Any, where: str, j: int) -> list[dict[str, Any]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DatasetError(
                f'{where}: turn {j} (function_call) must hold JSON like {{"name": "...", "arguments": {{...}}}}'
            ) from None
    calls = value if isinstance(value, list) else [value]
    return [_call(c, where, j) for c in calls]


def _tools(value: Any, where: str) -> list[dict[str, Any]]:
    """The tools a row offers, as OpenAI {"type": "function", "function": {...}} (JSON strings are parsed)."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: 'tools' is not valid JSON ({e.msg})") from None
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list):
        raise DatasetError(f"{where}: 'tools' must be a list of function definitions")
    out = []
    for t in value:
        t = _drop_nulls(t)
        fn = t.get("function") if isinstance(t, dict) and isinstance(t.get("function"), dict) else t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DatasetError(f"{where}: each tool must be a function definition with a 'name'")
        out.append({"type": "function", "function": fn})
    return out


def _drop_nulls(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _drop_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_nulls(x) for x in v]
    return v


# ---- plain text ------------------------------------------------------------------------------------------


def split_text(text: str, mode: str) -> list[str]:
    """A .txt file's text as documents: paragraphs (blank lines), lines, or the whole file; auto = paragraphs
    when the text has a blank line, else lines."""
    if mode == "auto":
        mode = "paragraph" if re.search(r"\n[ \t]*\r?\n", text.strip()) else "line"
    if mode == "file":
        pieces = [text]
    elif mode == "paragraph":
        pieces = re.split(r"\n[ \t]*\r?\n", text)
    else:
        pieces = text.splitlines()
    return [p.strip("\r\n") for p in pieces if p.strip()]
