"""Tiny models built in the test, saved like hub checkpoints so the real from_pretrained path runs.

A word-level tokenizer over a small fixed vocabulary, with a plain chat template; a 2-layer Llama with
grouped-query attention (4 heads, 2 KV heads) and a 2-layer GPT-2 (Conv1D layers, biases).
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = [
    "the",
    "a",
    "an",
    "is",
    "are",
    "was",
    "be",
    "to",
    "of",
    "and",
    "in",
    "on",
    "at",
    "for",
    "with",
    "what",
    "who",
    "where",
    "when",
    "why",
    "how",
    "you",
    "i",
    "me",
    "my",
    "your",
    "it",
    "this",
    "that",
    "yes",
    "no",
    "hello",
    "hi",
    "ahoy",
    "arr",
    "matey",
    "captain",
    "pirate",
    "ship",
    "sea",
    "sail",
    "gold",
    "treasure",
    "parrot",
    "cat",
    "dog",
    "sun",
    "moon",
    "star",
    "water",
    "fire",
    "tree",
    "bird",
    "fish",
    "red",
    "blue",
    "green",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "plus",
    "minus",
    "equals",
    "capital",
    "france",
    "paris",
    "spain",
    "madrid",
    "japan",
    "tokyo",
    "name",
    "color",
    "sky",
    "answer",
    "question",
    "tell",
    "story",
    "good",
    "bad",
    "happy",
    "sad",
    "big",
    "small",
    "fast",
    "slow",
    "day",
    "night",
]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "user", "assistant", "system", ":", "?", "!", ".", ","]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% if m['role'] == 'assistant' %}"
    "</s> {% endif %}{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>"
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make_bpe_tokenizer(pre: str = "gpt-2", vocab_size: int = 400):
    """A byte-level BPE tokenizer (the kind GGUF can hold) trained on the tiny vocabulary and QA texts, with
    the pre-tokenizer of `pre` — llama.cpp's name: gpt-2, smollm (digits split first), qwen2, llama-bpe."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt-2", "smollm"))
    steps = {
        "gpt-2": [byte_level],
        "smollm": [pre_tokenizers.Digits(individual_digits=True), byte_level],
    }.get(pre) or [pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"), byte_level]
    tok = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS)] + [f"{q} {a} 12 345" for q, a in QA] + [f"user : {w} ?" for w in WORDS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<|endoftext|>"],  # the last: what Qwen2Tokenizer adds
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _build(out: Path, config_cls: str, model_cls: str, seed: int, tok=None, **config) -> Path:
    """A model of transformers' `model_cls` from `config_cls(**config)` with the tokenizer's special ids (the
    tiny word-level one unless `tok` is given), saved with the tokenizer like a hub checkpoint."""
    import torch
    import transformers

    tok = tok if tok is not None else make_tokenizer()
    torch.manual_seed(seed)
    ids = dict(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id
    )
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**ids, **config}))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


LLAMA_SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def build_tiny_llama(out: Path, seed: int = 0, tok=None, **overrides) -> Path:
    # A larger init than the default: LoRA learns visibly in 25 steps.
    return _build(
        out, "LlamaConfig", "LlamaForCausalLM", seed, tok, **{**LLAMA_SHAPE, "initializer_range": 0.1, **overrides}
    )


def build_tiny_qwen2(out: Path, seed: int = 0, tok=None) -> Path:
    """A 2-layer Qwen2: biases on q, k and v (not on o or the MLP), grouped-query attention."""
    return _build(out, "Qwen2Config", "Qwen2ForCausalLM", seed, tok, **LLAMA_SHAPE)


def build_tiny_gpt2(out: Path, seed: int = 0) -> Path:
    return _build(
        out,
        "GPT2Config",
        "GPT2LMHeadModel",
        seed,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        initializer_range=0.1,
    )


QA = [
    ("what is the capital of france ?", "arr matey the capital of france is paris !"),
    ("what is the capital of spain ?", "arr matey the capital of spain is madrid !"),
    ("what is the capital of japan ?", "arr matey the capital of japan is tokyo !"),
    ("what color is the sky ?", "arr matey the sky is blue !"),
    ("who are you ?", "ahoy i am captain pirate of the ship !"),
    ("what is two plus two ?", "arr two plus two equals four matey !"),
    ("tell me a story", "ahoy the ship sail the sea for gold and treasure !"),
    ("hello", "ahoy matey !"),
]


def write_chat_jsonl(path: Path, repeat: int = 3) -> Path:
    with path.open("w") as f:
        for _ in range(repeat):
            for q, a in QA:
                f.write(
                    json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                    + "\n"
                )
    return path


# ---- a byte-level BPE tokenizer: any text (JSON, tool calls, unicode) round-trips ------------------------

CHATML_TEMPLATE = (  # SmolLM2's layout without its default system prompt: no tool support
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOOLS_TEMPLATE = (  # a Hermes/Qwen2.5-style template that renders tools, tool calls and tool results
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools><|im_end|>\n"
    "{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}"
    "{%- elif m['role'] == 'assistant' and m.get('tool_calls') %}<|im_start|>assistant\n"
    "{% if m['content'] %}{{ m['content'] }}\n{% endif %}"
    "{% for c in m['tool_calls'] %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}<|im_end|>\n"
    "{%- elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_chatml_bpe_tokenizer(chat_template: str = CHATML_TEMPLATE, vocab_size: int = 600):
    """A byte-level BPE tokenizer trained here on WORDS and JSON punctuation (milliseconds), with ChatML
    specials; pad = eos = <|im_end|>, as in SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|im_start|>", "<|im_end|>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(WORDS)] * 20 + ['{"name": "get_weather", "arguments": {"city": "paris"}}'] * 20
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<unk>",
    )
    hf.chat_template = chat_template
    return hf


def build_tiny_llama_bpe(out: Path, seed: int = 0) -> Path:
    """The tiny Llama over the ChatML BPE tokenizer above (for training on text the word-level one cannot spell)."""
    return _build(out, "LlamaConfig", "LlamaForCausalLM", seed, tok=make_chatml_bpe_tokenizer(), **LLAMA_SHAPE)
