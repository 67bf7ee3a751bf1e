"""Outcome comparison: the scores equal hand-computed values (chrF equals sacrebleu's own), base + two
adapters generate in one process on one base copy, an adapter with B = 0 writes the base's text with the
base's perplexity, the perplexity is exp(mean response-token loss) computed directly, and the CLI writes
one CSV row per prompt × model and the result into each run's folder."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from engine.core import compare as C


def test_scores_equal_hand_computed_values():
    from sacrebleu.metrics import CHRF

    assert C.exact_match(" Paris\n", "Paris") == 1.0 and C.exact_match("paris", "Paris") == 0.0
    # hyp words: the cat sat on the mat (6), ref: the cat on a mat (5); LCS = the cat on mat (4)
    p, r = 4 / 6, 4 / 5
    assert C.rouge_l("The cat sat on the mat.", "the cat on a mat") == pytest.approx(2 * p * r / (p + r))
    assert C.rouge_l("", "a b") == 0.0 and C.rouge_l("a b", "a b") == 1.0
    pairs = [("the cat sat", "the cat sat on the mat"), ("ahoy matey", "ahoy captain")]
    for h, ref in pairs:
        assert C.chrf(h, ref) == pytest.approx(CHRF().sentence_score(h, [ref]).score)
    assert C.chrf("gold", "gold") == 100.0
    hyps, refs = zip(*pairs)
    assert C.corpus_chrf(hyps, refs) == pytest.approx(CHRF().corpus_score(list(hyps), [list(refs)]).score)
    assert C.parse_models(["3", "best:3", "run:3", "7"], base=True) == ["base", "run:3", "best:3", "run:7"]
    with pytest.raises(ValueError, match="best:ID"):
        C.parse_models(["last:3"])
    prompts = [
        {"prompt": "q1", "reference": "a b", "outputs": {"m": C.score_output("a b", "a b", 2.0, 2)}},
        {"prompt": "q2", "reference": "c", "outputs": {"m": C.score_output("d", "c", 4.0, 1)}},
    ]
    s = C.summarize(prompts, ["m"])["m"]
    assert s["exact_match"] == 0.5 and s["rouge_l"] == 0.5 and s["response_tokens"] == 3
    assert s["perplexity"] == pytest.approx(math.exp(6.0 / 3))  # token-weighted, not a mean of perplexities
    rows = C.csv_rows({"models": ["m"], "labels": {"m": "#1 x"}, "prompts": prompts})
    assert [(r["prompt_index"], r["model"], r["exact_match"]) for r in rows] == [(1, "#1 x", 1.0), (2, "#1 x", 0.0)]


def make_adapter(base_dir: Path, out: Path, zero_b: bool) -> Path:
    """A LoRA adapter of the tiny model: B = 0 (peft's init, the base's function) or random B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    pm = get_peft_model(m, cfg)
    if not zero_b:
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    pm.save_pretrained(out)
    return out


def direct_perplexity(base_dir: Path, examples) -> float:
    """exp(mean loss) of the base on the response tokens, computed with the plain HF model."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.ml.data import IGNORE

    m = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    total, n = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        labels = torch.tensor([ex.labels])
        with torch.no_grad():
            logits = m(input_ids=ids).logits[0, :-1].double()
        target = labels[0, 1:]
        keep = target != IGNORE
        total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
        n += int(keep.sum())
    return math.exp(total / n)


def test_base_and_two_adapters_in_one_process(tiny_llama_dir, chat_jsonl, tmp_path):
    from engine.core.chat import GenParams
    from engine.core.config import RunConfig
    from engine.ml import compare as MC
    from engine.ml.generate import ChatModel

    home = tmp_path / "home"
    zero = make_adapter(tiny_llama_dir, tmp_path / "zero", zero_b=True)
    rand = make_adapter(tiny_llama_dir, tmp_path / "rand", zero_b=False)
    chat = ChatModel.load(str(tiny_llama_dir), {"zero": str(zero), "rand": str(rand)}, home=home, device="cpu")
    plain = ChatModel.load(str(tiny_llama_dir), home=home, device="cpu")
    assert chat.report()["base_bytes"] == plain.report()["base_bytes"]  # one base copy for both adapters
    cfg = RunConfig.from_dict({"model": str(tiny_llama_dir), "dataset": str(chat_jsonl), "train": {"val_split": 0}})
    examples, source = MC.prompt_examples(cfg, chat.tok, home, val=False, limit=2)
    assert len(examples) == 2 and "first 2" in source
    models = {"base": None, "run:1": "zero", "run:2": "rand"}
    res = MC.compare(chat, examples, models, GenParams(max_new_tokens=4, repetition_penalty=1.0))
    assert res["models"] == list(models) and len(res["prompts"]) == 2
    for p in res["prompts"]:
        o = p["outputs"]
        assert p["reference"] and p["prompt"]
        assert o["run:1"]["text"] == o["base"]["text"]
        assert o["run:1"]["perplexity"] == pytest.approx(o["base"]["perplexity"], rel=1e-6)
        assert o["run:2"]["perplexity"] != pytest.approx(o["base"]["perplexity"], rel=1e-3)
        assert o["base"]["tokens"] == sum(1 for x in examples[res["prompts"].index(p)].labels[1:] if x >= 0)
    s = res["scores"]
    assert s["base"]["perplexity"] == pytest.approx(direct_perplexity(tiny_llama_dir, examples), rel=1e-5)
    assert s["run:1"]["perplexity"] == pytest.approx(s["base"]["perplexity"], rel=1e-6)
    # the texts are what the model writes alone from the same prompt ids
    ids = MC.split_prompt(examples[0])[0]
    assert (
        plain.complete(ids, None, GenParams(max_new_tokens=4, repetition_penalty=1.0)).strip()
        == (res["prompts"][0]["outputs"]["base"]["text"])
    )


def test_cli_compare_writes_csv_and_the_run_s_result(tiny_llama_dir, chat_jsonl, home, capsys):
    import shutil

    from engine.cli import main
    from engine.core.config import RunConfig
    from engine.core.home import open_store, run_dir
    from engine.core.runs import compare_path

    store = open_store(home, None)
    cfg = RunConfig.from_dict(
        {"model": str(tiny_llama_dir), "dataset": str(chat_jsonl), "name": "t", "train": {"val_split": 0.2}}
    )
    rid = store.create_run("t", cfg.to_dict(), "", model=cfg.model)
    out = run_dir(home, rid)
    store.set_out_dir(rid, str(out))
    make_adapter(tiny_llama_dir, out / "adapter", zero_b=False)
    shutil.copytree(make_adapter(tiny_llama_dir, home / "z", zero_b=True), out / "best_adapter")
    (out / "best.json").write_text(json.dumps({"step": 2, "val_loss": 1.0}))
    csv_path = home / "out.csv"
    argv = ["--home", str(home), "compare", "--runs", str(rid), f"best:{rid}", "--base", "--val"]
    rc = main([*argv, "--limit", "2", "--max-new-tokens", "3", "--csv", str(csv_path), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    n = len(res["prompts"])
    assert n == 2 and "validation rows" in res["source"]
    rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    assert len(rows) == n * 3 and list(rows[0]) == list(C.CSV_FIELDS)
    assert {r["model"] for r in rows} == {"base", "#1 t", "#1 t (best)"}
    stored = C.load_result(compare_path(store.get_run(rid)))
    assert stored is not None and stored["scores"] == res["scores"]
    for p in res["prompts"]:
        assert p["outputs"][f"best:{rid}"]["text"] == p["outputs"]["base"]["text"]
    assert main(["--home", str(home), "compare", "--runs", "99", "--val"]) == 2
    assert main(["--home", str(home), "compare", "--runs", str(rid)]) == 2  # neither --prompts nor --val
    assert "error:" in capsys.readouterr().err
