"""--model by Hugging Face Hub name: the local cache first, then the Hub, and a clear
error when neither works (this machine has no network)."""
import os
import subprocess
import sys

import pytest

import real.model.loading as models
from real.model.tiny import build_tiny_model, build_tiny_tokenizer


class _Recorder:
    def __init__(self, make, fail_cached=False):
        self.make, self.fail_cached, self.calls = make, fail_cached, []

    def from_pretrained(self, name, **kwargs):
        self.calls.append((name, kwargs.get("local_files_only", False)))
        if kwargs.get("local_files_only") and self.fail_cached:
            raise OSError("not in the cache")
        return self.make()


@pytest.mark.parametrize("cached", [True, False])
def test_a_hub_name_loads_from_the_cache_first(monkeypatch, cached):
    tok = build_tiny_tokenizer()
    tokenizers = _Recorder(lambda: tok, fail_cached=not cached)
    model_loader = _Recorder(lambda: build_tiny_model(tok), fail_cached=not cached)
    monkeypatch.setattr(models, "AutoTokenizer", tokenizers)
    monkeypatch.setattr(models, "AutoModelForCausalLM", model_loader)
    model, tokenizer = models.load_model_and_tokenizer("Qwen/Qwen3-8B")
    assert tokenizer is tok and model is not None
    expected = [("Qwen/Qwen3-8B", True)] if cached else [("Qwen/Qwen3-8B", True), ("Qwen/Qwen3-8B", False)]
    assert tokenizers.calls == expected and model_loader.calls == expected


def test_a_missing_local_path_is_not_taken_for_a_hub_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_model_and_tokenizer(str(tmp_path / "no" / "such" / "model"))


def test_offline_a_hub_name_gives_a_clear_error():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    code = ("from real.model.loading import load_model_and_tokenizer\n"
            "load_model_and_tokenizer('real-kernels-test/no-such-model')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "not in the Hugging Face cache" in proc.stderr and "HF_HUB_OFFLINE is set" in proc.stderr
    assert "huggingface-cli download real-kernels-test/no-such-model" in proc.stderr
