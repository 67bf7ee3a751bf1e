"""The Ollama Modelfile written beside a GGUF export: FROM (and ADAPTER), TEMPLATE, SYSTEM, stop tokens.

    text, notes = modelfile(tok, from_="./pirate.gguf")                      # merged model
    text, notes = modelfile(tok, from_=base_gguf, adapter="./pirate-lora.gguf")  # base + LoRA adapter

Ollama templates are Go templates, the model's is Jinja; there is no general translation. We render the
Jinja template (transformers' apply_chat_template) on conversations with marker texts, read off what
each role's message is wrapped in, build a Go template from those pieces and keep it only if it renders
the same text as the Jinja template for every test conversation (emulated here in Python; Ollama itself
is not run). A default system prompt the template inserts becomes Ollama's SYSTEM. When the template
has no such simple shape the Modelfile has no TEMPLATE (Ollama then picks one from the GGUF's
tokenizer.chat_template if it recognises it) and a note says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError

MARK = {"system": "SYSZQX", "user": "USRZQX", "assistant": "ASTZQX"}


@dataclass(frozen=True)
class ChatShape:
    """What a chat template wraps each role's content in, the generation prompt and a default system text."""

    wrap: dict[str, tuple[str, str]]  # role → (before content, after content)
    generation: str
    default_system: str | None

    def render(self, messages: list[dict[str, str]]) -> str:
        """The Go template below, emulated: what Ollama sends for `messages` (SYSTEM prepended if none)."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        text = "".join(self.wrap[m["role"]][0] + m["content"] + self.wrap[m["role"]][1] for m in messages)
        return text + (self.generation if messages and messages[-1]["role"] != "assistant" else "")

    def go_template(self) -> str:
        """The same as an Ollama TEMPLATE (no whitespace-trimming markers: every literal stays as it is)."""
        branches = "".join(
            f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{post}'
            for i, (role, (pre, post)) in enumerate(self.wrap.items())
        )
        return (
            "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            f"{branches}{{{{ end }}}}"
            f'{{{{ if and $last (ne .Role "assistant") }}}}{self.generation}{{{{ end }}}}{{{{ end }}}}'
        )


def _msgs(*roles: str, n: int = 0) -> list[dict[str, str]]:
    return [{"role": r, "content": f"{MARK[r]}{i + n}"} for i, r in enumerate(roles)]


def chat_shape(render) -> ChatShape | None:
    """The template's pieces from `render(messages, add_generation_prompt) -> str`, or None if it has no
    per-role shape (a template that refuses a system turn, joins turns differently, reorders ...)."""
    try:
        full = render(_msgs("system", "user", "assistant", "user", "assistant"), False)
        head = render(_msgs("system", "user", "assistant", "user"), False)
        gen = render(_msgs("system", "user", "assistant", "user"), True)
        nosys = render(_msgs("user", "assistant", n=1), False)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError):  # e.g. "system role not supported"
        return None
    marks = [f"{MARK[r]}{i}" for i, r in enumerate(("system", "user", "assistant", "user", "assistant"))]
    pos = [full.find(m) for m in marks]
    if -1 in pos or pos != sorted(pos) or not gen.startswith(head):
        return None
    cut = [full[: pos[0]]] + [full[pos[i] + len(marks[i]) : pos[i + 1]] for i in range(4)]
    a_post = full[pos[4] + len(marks[4]) :]
    u_post = head[head.find(marks[3]) + len(marks[3]) :]
    generation = gen[len(head) :]
    if not (cut[3].startswith(a_post) and cut[2].startswith(u_post) and cut[4].startswith(u_post)):
        return None
    u_pre = cut[3][len(a_post) :]
    if not cut[1].endswith(u_pre):
        return None
    wrap = {
        "system": (cut[0], cut[1][: len(cut[1]) - len(u_pre)]),
        "user": (u_pre, u_post),
        "assistant": (cut[2][len(u_post) :], a_post),
    }
    lead = nosys[: max(nosys.find(f"{MARK['user']}1") - len(u_pre), 0)]
    default = None
    if lead:
        s_pre, s_post = wrap["system"]
        if not (lead.startswith(s_pre) and lead.endswith(s_post)):
            return None
        default = lead[len(s_pre) : len(lead) - len(s_post)]
    return ChatShape(wrap, generation, default)


CHECKS = (("system", "user"), ("user",), ("system", "user", "assistant", "user"), ("user", "assistant", "user"))


def verified_shape(render) -> ChatShape | None:
    """chat_shape, kept only if it renders exactly like the template on every conversation in CHECKS."""
    shape = chat_shape(render)
    if shape is None:
        return None
    for roles in CHECKS:
        msgs = [{"role": r, "content": f"Hello there, {r} {i}!\nSecond line."} for i, r in enumerate(roles)]
        if shape.render(msgs) != render(msgs, True):
            return None
    return shape


def stop_tokens(tok, shape: ChatShape | None) -> list[str]:
    """The end-of-turn token(s): special tokens in what follows an assistant message, and eos."""
    specials = [t for t in getattr(tok, "all_special_tokens", []) if t]
    after = shape.wrap["assistant"][1] if shape else ""
    found = [t for t in specials if t in after]
    if tok.eos_token and tok.eos_token not in found:
        found.append(tok.eos_token)
    return found


def _quotable(text: str) -> bool:
    """Literal text a Go template inside a Modelfile triple-quoted string can hold as it is."""
    return '"""' not in text and "{{" not in text


def modelfile(tok, *, from_: str, adapter: str | None = None, title: str = "") -> tuple[str, list[str]]:
    """(Modelfile text, notes for the user) for a GGUF export."""

    def render(messages, gen):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    shape = verified_shape(render) if getattr(tok, "chat_template", None) else None
    notes: list[str] = []
    lines = [
        f"# {title or 'Exported by LoRA Lab'}",
        "# ollama create NAME -f THIS_FILE && ollama run NAME",
        f"FROM {from_}",
    ]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    pieces = (
        [p for pair in shape.wrap.values() for p in pair] + [shape.generation, shape.default_system or ""]
        if shape
        else []
    )
    if shape is not None and all(_quotable(p) for p in pieces):
        lines.append(f'TEMPLATE """{shape.go_template()}"""')
        if shape.default_system:
            lines.append(f'SYSTEM """{shape.default_system}"""')
    else:
        notes.append(
            "the chat template has no simple per-role shape, so the Modelfile has no TEMPLATE; Ollama uses the "
            "GGUF's tokenizer.chat_template if it recognises it, else write a TEMPLATE by hand"
        )
    for t in stop_tokens(tok, shape):
        lines.append(f"PARAMETER stop {_go_string(t)}")
    return "\n".join(lines) + "\n", notes


def _go_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
