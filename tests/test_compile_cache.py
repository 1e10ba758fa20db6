"""torch.compile's on-disk caches are keyed by the ops' sources (smile_fast/compile_cache.py)."""

from __future__ import annotations

import sys

import pytest
import torch

from smile_fast.compile_cache import ops_source_digest, tag_compile_cache


@pytest.fixture(autouse=True)
def restore_tag():
    before = torch.compiler.config.cache_key_tag
    yield
    torch.compiler.config.cache_key_tag = before


def _sources(tmp_path):
    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "a.py").write_text("def backward(x, y): ...\n")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "k.py").write_text("BLOCK = 1024\n")
    return (tmp_path / "ops", tmp_path / "kernels")


def test_the_digest_follows_the_sources(tmp_path):
    folders = _sources(tmp_path)
    first = ops_source_digest(folders)
    assert first == ops_source_digest(folders) and len(first) == 12
    (folders[0] / "a.py").write_text("def backward(x, y, loss): ...\n")  # an op's backward changes
    changed = ops_source_digest(folders)
    assert changed != first
    (folders[1] / "new.py").write_text("")  # a new file counts too
    assert ops_source_digest(folders) != changed


def test_the_tag_keeps_the_users_and_is_idempotent(tmp_path):
    folders = _sources(tmp_path)
    torch.compiler.config.cache_key_tag = "my-experiment"
    tag = tag_compile_cache(folders)
    assert tag == f"my-experiment;smile-fast-ops-{ops_source_digest(folders)}"
    assert tag_compile_cache(folders) == tag, "a second call must not append again"
    (folders[0] / "a.py").write_text("changed\n")
    assert tag_compile_cache(folders) == f"my-experiment;smile-fast-ops-{ops_source_digest(folders)}"


def test_a_compiled_training_step_tags_the_cache():
    from smile_fast.config import build_config
    from smile_fast.methods import build_method
    from smile_fast.models import build_models
    from smile_fast.step import TrainingStep

    torch.compiler.config.cache_key_tag = ""
    config = build_config(overrides=dict(method="finetune", model="resnet18", weights="none", compile=True))
    student, source, _ = build_models("resnet18", 3, "none", with_aux_head=False, log=lambda m: None)
    TrainingStep(config, build_method("finetune"), student, source, torch.device("cpu")).finalize()  # compiles lazily
    assert torch.compiler.config.cache_key_tag == f"smile-fast-ops-{ops_source_digest()}"


def test_a_torch_without_the_setting_is_left_alone(tmp_path, monkeypatch):
    class OldConfig:  # torch.compiler.config of a release that predates cache_key_tag
        pass

    monkeypatch.setitem(sys.modules, "torch.compiler.config", OldConfig())
    assert tag_compile_cache(_sources(tmp_path)) == ""
