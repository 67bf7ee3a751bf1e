"""Generation with a base model and any number of LoRA adapters on ONE copy of the base weights.

    session = ChatModel.load(base="embedded:SmolLM2-135M-Instruct", adapters={"pirate": "runs/1/adapter"})
    text = session.reply([{"role": "user", "content": "Who are you?"}], adapter="pirate")
    text = session.reply(messages, adapter=None)      # the base model: adapters disabled

Adapters are loaded by name with PeftModel.load_adapter and switched with set_adapter; the base pane
runs inside disable_adapter(). Sampling is seeded per request so every pane sees the same random
numbers and differences come from the weights alone.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from engine import model as M
from engine.config import RunConfig
from engine.home import data_home


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 128
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 0.95
    seed: int = 0
    repetition_penalty: float = 1.1


def adapter_base_model(adapter_dir: str | Path) -> str | None:
    """The base model an adapter was trained on (our loralab.json first, then peft's config)."""
    d = Path(adapter_dir)
    ours = d / "loralab.json"
    if ours.is_file():
        return json.loads(ours.read_text())["run_config"]["model"]
    cfg = d / "adapter_config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("base_model_name_or_path")
    raise FileNotFoundError(f"{d} is not an adapter folder (no adapter_config.json)")


class ChatModel:
    """One base model in memory, adapters attached by name."""

    def __init__(self, base_name: str, model, tok, device: torch.device):
        self.base_name, self.model, self.tok, self.device = base_name, model, tok, device
        self.adapters: dict[str, str] = {}
        self.lock = threading.Lock()

    @classmethod
    def load(cls, base: str, adapters: dict[str, str] | None = None, *, quant: str = "none",
             home: Path | None = None) -> "ChatModel":
        home = home or data_home()
        ref = M.resolve_model(base, home)
        device = M.pick_device()
        cfg = RunConfig(model=base, quant=quant)
        tok = M.load_tokenizer(ref)
        model = M.load_base_model(ref, cfg, device, for_training=False)
        model.eval()
        self = cls(base, model, tok, device)
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)
        return self

    def add_adapter(self, name: str, path: str | Path) -> None:
        from peft import PeftModel

        path = str(path)
        if not (Path(path) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter {name!r}: {path} has no adapter_config.json")
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        self.model.eval()
        self.adapters[name] = path

    def prompt_ids(self, messages: list[dict[str, str]]) -> torch.Tensor:
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = out["input_ids"] if hasattr(out, "keys") else out  # transformers 5 may return a BatchEncoding
        return ids.to(self.device)

    def stream(self, messages: list[dict[str, str]], adapter: str | None = None,
               params: GenParams = GenParams()) -> Iterator[str]:
        """Yield the reply text piece by piece (the growing reply is the concatenation)."""
        from transformers import TextIteratorStreamer

        ids = self.prompt_ids(messages)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self.lock, self._adapter_ctx(adapter), torch.no_grad():
                    torch.manual_seed(params.seed)
                    self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                        **self._gen_kwargs(params))
            except BaseException as e:  # re-raised in the consumer's thread below
                errors.append(e)
                streamer.end()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        yield from streamer
        t.join()
        if errors:
            raise errors[0]

    def reply(self, messages: list[dict[str, str]], adapter: str | None = None,
              params: GenParams = GenParams()) -> str:
        return "".join(self.stream(messages, adapter, params))

    def _gen_kwargs(self, p: GenParams) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_new_tokens": p.max_new_tokens, "repetition_penalty": p.repetition_penalty,
                              "pad_token_id": self.tok.pad_token_id, "eos_token_id": self.tok.eos_token_id}
        if p.temperature > 0:
            kw.update(do_sample=True, temperature=p.temperature, top_p=p.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def _adapter_ctx(self, adapter: str | None):
        import contextlib

        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            if adapter is not None:
                raise KeyError(f"adapter {adapter!r} is not loaded; loaded: none")
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        if adapter not in self.adapters:
            raise KeyError(f"adapter {adapter!r} is not loaded; loaded: {', '.join(self.adapters)}")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()
