"""`python -m engine export ID --gguf / --gguf-adapter` for a trained run and for an adapter folder, the
never-overwrite rule, and the Chat tab's GGUF row running the real CLI in a child process."""

from __future__ import annotations

import gguf
import pytest

from tests.test_chat import finished_run
from tests.tiny import build_tiny_llama, make_bpe_tokenizer


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, chat_jsonl):
    """(home, store, run id) of a succeeded run on a tiny Llama with a byte-level BPE tokenizer."""
    from storage import Store

    model = build_tiny_llama(tmp_path_factory.mktemp("bpe-llama"), tok=make_bpe_tokenizer())
    home = tmp_path_factory.mktemp("gguf-home")
    store = Store.for_home(home)
    run_id = finished_run(store, home, model, chat_jsonl, name="pirate", lr=3e-2, steps=4)
    yield home, store, run_id
    store.close()


def test_export_a_run_as_merged_and_adapter_gguf_without_overwriting(bpe_run, tmp_path, capsys):
    from engine.cli import main

    home, store, run_id = bpe_run
    merged, lora = tmp_path / "pirate.gguf", tmp_path / "pirate-lora.gguf"
    argv = ["--home", str(home), "export", str(run_id), "--gguf", str(merged), "--gguf-adapter", str(lora)]
    assert main([*argv, "--gguf-type", "q8_0"]) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert lines[0].startswith("adapter GGUF (q8_0; 14 LoRA pairs, r 8, alpha 16, llama)")
    assert lines[1].startswith(f"merged GGUF (q8_0; byte-level BPE, pre-tokenizer gpt-2): {merged}")
    assert "gguf: q8_0 tensors 21/21" in out.err  # progress, on stderr
    r = gguf.GGUFReader(merged)
    assert r.fields["general.name"].contents() == "pirate (LoRA Lab run 1)"
    assert "FROM ./pirate.gguf" in (tmp_path / "pirate.Modelfile").read_text()
    assert "ADAPTER ./pirate-lora.gguf" in (tmp_path / "pirate-lora.Modelfile").read_text()

    # nothing is replaced without --force: refused before any work, files untouched
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert main([*argv]) == 2
    assert "exists; choose another name (or pass --force to replace it)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    (tmp_path / "pirate.Modelfile").unlink()  # a Modelfile left behind blocks too: its GGUF is not written
    (tmp_path / "other.Modelfile").write_text("mine")
    assert main(["--home", str(home), "export", str(run_id), "--gguf", str(tmp_path / "other.gguf")]) == 2
    assert not (tmp_path / "other.gguf").exists() and (tmp_path / "other.Modelfile").read_text() == "mine"
    assert main([*argv, "--force"]) == 0 and (tmp_path / "pirate.Modelfile").is_file()
    assert main(["--home", str(home), "export", str(run_id), "--gguf", str(merged), "--gguf-adapter", str(merged)]) == 2
    assert "name the same file" in capsys.readouterr().err


def test_export_an_adapter_folder(bpe_run, tmp_path, capsys):
    from engine.cli import main

    home, store, run_id = bpe_run
    folder = store.get_run(run_id).adapter_dir  # its loralab.json names the base
    out = tmp_path / "folder-lora.gguf"
    assert main(["--home", str(home), "export", folder, "--gguf-adapter", str(out), "--gguf-type", "f16"]) == 0
    assert capsys.readouterr().out.startswith("adapter GGUF (f16; 14 LoRA pairs")
    types = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types == {"F16"}
    assert main(["--home", str(home), "export", folder, "--zip", str(tmp_path / "a.zip")]) == 2
    assert "take a run id" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: neither a run id nor an adapter folder
        main(["--home", str(home), "export", str(tmp_path), "--gguf", str(out)])
    assert "neither a run id nor a PEFT adapter folder" in capsys.readouterr().err


def test_chat_tab_gguf_row_runs_the_cli_and_shows_its_last_line(bpe_run, tmp_path):
    import gradio as gr

    from ui.backend import Backend
    from ui.gguf_panel import export_gguf

    home, store, run_id = bpe_run
    backend = Backend(home, db_url=store.url)
    shown = export_gguf(run_id, "", "default", False, adapter=True, store=store, home=home, backend=backend)
    default = home / "exports" / f"run-{run_id}-lora.gguf"
    assert shown.startswith("adapter GGUF (f32; 14 LoRA pairs") and str(default) in shown and default.is_file()
    with pytest.raises(gr.Error, match="exists; choose another name"):  # "overwrite" is not ticked
        export_gguf(run_id, "", "q8_0", False, adapter=True, store=store, home=home, backend=backend)
