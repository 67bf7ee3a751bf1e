import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# 🤗 datasets' Arrow cache (before datasets is imported): the tests never write to ~/.cache
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="loralab-test-datasets-"))

import pytest

from tests.tiny import build_tiny_gpt2, build_tiny_llama, write_chat_jsonl

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's; playwright cannot download its own here


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests that take more than a few seconds")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")
    config.addinivalue_line("markers", "browser: drives Debian's chromium through Playwright")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh data home for one test."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("LORALAB_HOME", str(h))
    return h


@pytest.fixture
def page():
    """A headless page in Debian's chromium, driven by Playwright."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (CI installs Debian's chromium with apt-get)")
    from playwright.sync_api import expect, sync_playwright

    # A loaded CI machine can take well over expect's 5 s default to render the app's first screen.
    expect.set_options(timeout=30_000)

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.set_default_timeout(30_000)
        yield page
        browser.close()


@pytest.fixture(scope="session")
def anatomy_of(tmp_path_factory):
    """engine.ml.model.inspect_model's dict per model folder, computed once per session."""
    from engine.ml.model import inspect_model

    home = tmp_path_factory.mktemp("inspect-home")
    cache: dict[str, dict] = {}

    def get(path: Path) -> dict:
        if str(path) not in cache:
            cache[str(path)] = inspect_model(str(path), home)
        return cache[str(path)]

    return get


@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database for one test, on the server of $LORALAB_TEST_PG_URL (CI starts a
    throwaway cluster with .ci/postgres.sh); skipped with the reason when no server is configured."""
    base = os.environ.get("LORALAB_TEST_PG_URL")
    if not base:
        pytest.skip('no PostgreSQL: set LORALAB_TEST_PG_URL (`eval "$(bash .ci/postgres.sh start)"` starts one)')
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    name = f"loralab_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(base).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
