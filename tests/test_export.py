"""Export: merged logits equal base + adapter, the zip, the model card, and push against stand-ins for the
Hub (monkeypatched HfApi, and a local HTTP server behind HF's real client), with the token kept secret."""

from __future__ import annotations

import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.test_chat import finished_run

TOKEN = "hf_SeCrEt0123456789abcdefTOKEN"


@pytest.fixture(scope="module")
def run_in_store(tmp_path_factory, tiny_llama_dir, chat_jsonl):
    """(home, store, run id) of one succeeded tiny run with spectra."""
    from storage import Store

    home = tmp_path_factory.mktemp("export-home")
    store = Store.for_home(home)
    run_id = finished_run(store, home, tiny_llama_dir, chat_jsonl, name="pirate", lr=3e-2, steps=6)
    yield home, store, run_id
    store.close()


def test_merged_model_logits_equal_base_plus_adapter(run_in_store, tiny_llama_dir, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.cli import main

    home, store, run_id = run_in_store
    out = tmp_path / "merged"
    assert main(["--home", str(home), "export", str(run_id), "--merged", str(out)]) == 0
    assert f"merged model: {out}" in capsys.readouterr().out
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and "library_name: transformers" in (out / "README.md").read_text()

    ids = torch.tensor([[2, 30, 40, 50, 7, 60, 70, 8]])
    adapter = store.get_run(run_id).adapter_dir
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        base_logits = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, adapter).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        merged_logits = merged(ids).logits
    assert not any(".lora_" in n for n, _ in merged.named_parameters())  # a plain model, LoRA folded in
    assert (peft_logits - base_logits).abs().max() > 1e-3  # the adapter changes the output ...
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-5, rtol=0)  # ... and the merge keeps exactly that

    # the folder is not overwritten by accident
    assert main(["--home", str(home), "export", str(run_id), "--merged", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_export_never_deletes_a_folder_it_did_not_write(run_in_store, tmp_path, capsys):
    from engine.cli import main
    from engine.core.export import EXPORT_MARKER

    home, store, run_id = run_in_store

    def export(out, *flags) -> tuple[int, str]:
        code = main(["--home", str(home), "export", str(run_id), "--merged", str(out), *flags])
        return code, capsys.readouterr().err

    mine = tmp_path / "my-project"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for flags in ((), ("--force",)):  # with or without --force: a folder of the user's is left alone
        code, err = export(mine, *flags)
        assert code == 2 and str(mine) in err and (mine / "notes.txt").read_text() == "keep me"
    assert "not a merged model LoRA Lab wrote" in err
    for where in (home, home.parent):  # the data home, or a folder holding it
        code, err = export(where, "--force")
        assert code == 2 and "holds the data home" in err
    assert store.get_run(run_id).status.value == "succeeded" and (home / "loralab.db").is_file()

    out = tmp_path / "merged"
    assert export(out)[0] == 0 and (out / EXPORT_MARKER).is_file()
    assert export(out, "--force")[0] == 0  # an earlier export of ours is replaced on request
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "my-project"]  # no temp folders left
    (out / "extra.bin").write_bytes(b"someone else's")
    code, err = export(out, "--force")
    assert code == 2 and "files LoRA Lab did not write there (extra.bin)" in err and (out / "extra.bin").is_file()


def test_merge_refuses_a_quantized_base(tiny_llama_dir, tmp_path):
    from engine.core.export import ExportError
    from engine.ml.merge import merge

    with pytest.raises(ExportError, match="full-precision base"):
        merge(str(tiny_llama_dir), tmp_path / "adapter", tmp_path / "out", quant="4bit")


def test_zip_holds_the_adapter_and_its_card(run_in_store, tmp_path, capsys):
    from engine.cli import main

    home, store, run_id = run_in_store
    out = tmp_path / "run.zip"
    assert main(["--home", str(home), "export", str(run_id), "--zip", str(out)]) == 0
    names = zipfile.ZipFile(out).namelist()
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(names)
    card = zipfile.ZipFile(out).read("README.md").decode()
    assert "library_name: peft" in card and "# pirate" in card


def test_model_card_has_base_dataset_every_hyperparameter_losses_and_spectra(run_in_store, tiny_llama_dir):
    from engine.core.export import flatten, model_card, show, stored_summary
    from engine.core.spectrum import summarize

    home, store, run_id = run_in_store
    run = store.get_run(run_id)
    summary = stored_summary(store, run_id)
    card = model_card(run, summary)
    head, body = card.split("---\n", 2)[1:]
    assert "library_name: peft" in head and "- lora" in head
    assert "base_model:" not in head  # a local folder is not a hub id: named in the text only
    assert f"**{tiny_llama_dir}**" in body and f"`{run.config['dataset']}`" in body
    for key, value in flatten(run.config):  # every hyper-parameter, lora.* and train.* included
        assert f"| `{key}` | {show(value)} |" in body, key
    assert "`lora.r`" in body and "`train.lr`" in body and "`train.max_steps` | 6 |" in body
    assert f"| final train loss | {run.final_loss:.4f} |" in body
    assert f"| best validation loss | {run.best_val_loss:.4f} |" in body
    assert f"| final validation loss | {run.final_val_loss:.4f} |" in body
    assert summary["modules"] == 14 and f"mean effective rank {summary['effective_rank_mean']:.2f}" in body
    top = summary["top"][0]
    assert f"| `{top['module']}` | {top['fro_norm']:.4f} |" in body
    # the summary agrees with engine.ml.spectra's own numbers for the saved adapter
    from engine.ml.spectra import adapter_spectra

    direct = summarize({n: s.to_stats() for n, s in adapter_spectra(run.adapter_dir).items()})
    assert direct["top"][0]["module"].endswith(top["module"].split("model.", 1)[-1])
    assert abs(direct["effective_rank_mean"] - summary["effective_rank_mean"]) < 1e-3

    # an embedded-model run names the hub id in the metadata, as the Hub expects
    from types import SimpleNamespace

    emb = SimpleNamespace(**{**run.__dict__, "config": {**run.config, "model": "embedded:SmolLM2-135M-Instruct"}})
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in model_card(emb, summary)


class FakeApi:
    """Records what push() asks of HfApi; the folder's files are read while it still exists."""

    calls: list[tuple[str, dict]] = []
    fail_with: Exception | None = None

    def install(self, monkeypatch) -> None:
        import huggingface_hub

        FakeApi.calls, FakeApi.fail_with = [], None

        def create_repo(api, repo_id, **kw):
            FakeApi.calls.append(("create_repo", {"repo_id": repo_id, "token": api.token, **kw}))
            if FakeApi.fail_with:
                raise FakeApi.fail_with
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api, *, repo_id, folder_path, **kw):
            files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
            FakeApi.calls.append(("upload_folder", {"repo_id": repo_id, "files": files, **kw}))

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


def test_push_is_private_by_default_and_never_shows_the_token(run_in_store, monkeypatch, capsys, caplog):
    import logging

    from engine.cli import main
    from engine.core.export import ExportError
    from engine.core.export import push_adapter as push

    caplog.set_level(logging.DEBUG)
    home, store, run_id = run_in_store
    FakeApi().install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    assert main(["--home", str(home), "push", str(run_id), "--repo", "me/pirate-lora"]) == 0
    out = capsys.readouterr()
    assert "pushed run" in out.out and "(private)" in out.out
    (op1, create), (op2, upload) = FakeApi.calls
    assert (op1, op2) == ("create_repo", "upload_folder")
    assert create["repo_id"] == "me/pirate-lora" and create["private"] is True and create["exist_ok"] is True
    assert create["token"] == TOKEN  # the token reaches the client that sends it ...
    assert upload["repo_id"] == "me/pirate-lora"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(upload["files"])
    card = upload["files"]["README.md"].decode()
    assert "me/pirate-lora" in card and "REPO_ID" not in card and "final train loss" in card

    # --public flips it; --merged uploads a plain model with its card
    assert main(["--home", str(home), "push", str(run_id), "--repo", "me/pirate-merged", "--public", "--merged"]) == 0
    create, upload = FakeApi.calls[2][1], FakeApi.calls[3][1]
    assert create["private"] is False and "model.safetensors" in upload["files"] and "config.json" in upload["files"]
    assert "adapter_config.json" not in upload["files"]

    # a failing Hub call whose text includes the token: redacted in the CLI's output and the exception
    FakeApi.fail_with = RuntimeError(f"401 Unauthorized: invalid token {TOKEN} for me/x")
    assert main(["--home", str(home), "push", str(run_id), "--repo", "me/x"]) == 1
    err = capsys.readouterr().err
    assert "401 Unauthorized" in err and "hf_***" in err
    with pytest.raises(ExportError) as e:
        push(store.get_run(run_id), "me/x", token=TOKEN)
    import traceback

    shown = "".join(traceback.format_exception(e.value))
    assert "hf_***" in shown and e.value.__context__ is None and e.value.__cause__ is None

    # ... and nowhere else: stdout/stderr, log records, the database, the run folder
    out = capsys.readouterr()
    db_bytes = b"".join(p.read_bytes() for p in home.glob("loralab.db*"))
    run_files = b"".join(p.read_bytes() for p in (home / "runs").rglob("*") if p.is_file())
    for where in (out.out, out.err, caplog.text, shown, str(e.value)):
        assert TOKEN not in where
    assert TOKEN.encode() not in db_bytes and TOKEN.encode() not in run_files


def test_push_without_a_token_says_how_to_get_one(run_in_store, monkeypatch):
    import huggingface_hub

    from engine.core.export import ExportError
    from engine.core.export import push_adapter as push

    home, store, run_id = run_in_store
    FakeApi().install(monkeypatch)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ExportError, match="no Hugging Face token: set HF_TOKEN"):
        push(store.get_run(run_id), "me/x")
    with pytest.raises(ExportError, match="not a repo id"):
        push(store.get_run(run_id), "no-slash", token=TOKEN)
    assert FakeApi.calls == []


class HubStandIn(BaseHTTPRequestHandler):
    """Just enough of the Hub's HTTP API for create_repo + upload_folder (all files as regular uploads)."""

    seen: list[dict] = []

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, body: dict, code: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        HubStandIn.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.path == "/api/repos/create":
            req = json.loads(body)
            return self._reply({"url": f"http://{self.headers['Host']}/{req.get('organization')}/{req['name']}"})
        if self.path == "/api/validate-yaml":  # the client checks README.md's front matter before the commit
            import yaml

            meta = yaml.safe_load(json.loads(body)["content"].split("---\n")[1])
            HubStandIn.seen[-1]["meta"] = meta
            return self._reply({"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if "/commit/" in self.path:
            return self._reply(
                {
                    "commitUrl": f"http://{self.headers['Host']}/me/pirate/commit/{'a' * 40}",
                    "commitOid": "a" * 40,
                    "success": True,
                }
            )
        return self._reply({"error": f"stand-in has no {self.path}"}, 404)

    def do_GET(self):
        HubStandIn.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": b""})
        return self._reply({"error": f"stand-in has no {self.path}"}, 404)


def test_push_through_the_real_hub_client_to_a_local_stand_in(run_in_store, monkeypatch):
    """No monkeypatching of HfApi: huggingface_hub sends real HTTP requests, to a server on localhost."""
    import huggingface_hub.constants

    from engine.core.export import push_adapter as push

    home, store, run_id = run_in_store
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests run offline otherwise
    HubStandIn.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubStandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        url = push(store.get_run(run_id), "me/pirate", token=TOKEN, endpoint=endpoint)
    finally:
        server.shutdown()
    assert "me/pirate" in url
    create = next(r for r in HubStandIn.seen if r["path"] == "/api/repos/create")
    req = json.loads(create["body"])
    assert req["name"] == "pirate" and req["organization"] == "me"
    assert req.get("visibility") == "private" or req.get("private") is True  # hub client 2.x sends "visibility"
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in HubStandIn.seen)  # sent only as the header
    commit = next(r for r in HubStandIn.seen if "/commit/" in r["path"])
    paths = {
        json.loads(line)["value"].get("path")
        for line in commit["body"].splitlines()
        if json.loads(line)["key"] == "file"
    }
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= paths
    meta = next(r["meta"] for r in HubStandIn.seen if r["path"] == "/api/validate-yaml")
    assert meta["library_name"] == "peft" and "lora" in meta["tags"]  # the front matter is valid YAML
