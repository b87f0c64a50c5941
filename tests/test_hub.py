"""Model resolution: local folders, a fake Hugging Face cache, offline mode and readable errors; never the network."""

from __future__ import annotations

import socket
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants

from idfusion.errors import IdfusionError, ModelFilesError
from idfusion.hub import hf_cache_dir, is_offline, resolve_model_folder

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REQUIRED = ["arc2face/config.json", "arc2face/diffusion_pytorch_model.safetensors"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Offline mode, no sockets, and an empty Hugging Face cache in tmp."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path / "hf_cache"


def _touch(folder: Path, *names: str) -> Path:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    return folder


def _cache_repo(cache: Path, repo_id: str, *names: str, commit: str = COMMIT, ref: str = "main") -> Path:
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return _touch(storage / "snapshots" / commit, *names)


def _check_readable(message: str) -> None:
    assert "Traceback" not in message


def test_offline_helpers(offline):
    assert is_offline()
    assert hf_cache_dir() == offline


def test_local_folder_with_all_files(tmp_path):
    folder = _touch(tmp_path / "model", *REQUIRED)
    assert resolve_model_folder(folder, required=REQUIRED, what="Arc2Face") == folder
    assert resolve_model_folder(str(folder), required=REQUIRED, what="Arc2Face") == folder


def test_local_folder_lists_each_missing_file(tmp_path):
    folder = _touch(tmp_path / "model", "arc2face/config.json")
    required = [*REQUIRED, "encoder/config.json", "encoder/pytorch_model.bin|encoder/model.safetensors"]
    with pytest.raises(ModelFilesError) as info:
        resolve_model_folder(folder, required=required, what="Arc2Face")
    message = str(info.value)
    _check_readable(message)
    assert "Arc2Face" in message and str(folder) in message and "3 of the 4" in message
    for name in ("arc2face/diffusion_pytorch_model.safetensors", "encoder/config.json", "encoder/pytorch_model.bin"):
        assert f"\n  {name}" in message
    assert "encoder/model.safetensors" in message
    assert "\n  arc2face/config.json" not in message  # present files are not listed as missing
    assert isinstance(info.value, IdfusionError) and isinstance(info.value, FileNotFoundError)


def test_alternatives_accept_either_file(tmp_path):
    required = ["encoder/pytorch_model.bin|encoder/model.safetensors"]
    bin_folder = _touch(tmp_path / "a", "encoder/pytorch_model.bin")
    safetensors_folder = _touch(tmp_path / "b", "encoder/model.safetensors")
    assert resolve_model_folder(bin_folder, required=required, what="X") == bin_folder
    assert resolve_model_folder(safetensors_folder, required=required, what="X") == safetensors_folder


def test_nonexistent_path_is_folder_not_found(tmp_path):
    for model in (str(tmp_path / "nope"), "./no/such/folder", "~/no-such-idfusion-folder-xyz"):
        with pytest.raises(ModelFilesError, match="folder not found"):
            resolve_model_folder(model, required=REQUIRED, what="Arc2Face")


def test_file_instead_of_folder(tmp_path):
    file = _touch(tmp_path, "weights.bin") / "weights.bin"
    with pytest.raises(ModelFilesError, match="expected a folder"):
        resolve_model_folder(file, required=REQUIRED, what="Arc2Face")


@pytest.mark.parametrize("model", ["justaname", "a/b/c", "owner/", "owner/na me", "owner--x/name", "-owner/name"])
def test_bad_repo_id(model):
    with pytest.raises(ModelFilesError, match="owner/name") as info:
        resolve_model_folder(model, required=REQUIRED, what="Arc2Face")
    assert repr(model) in str(info.value)


def test_repo_from_cache_offline(offline):
    snapshot = _cache_repo(offline, "FoivosPar/Arc2Face", *REQUIRED, "encoder/model.safetensors")
    required = [*REQUIRED, "encoder/pytorch_model.bin|encoder/model.safetensors"]
    assert resolve_model_folder("FoivosPar/Arc2Face", required=required, what="Arc2Face") == snapshot
    # a commit hash as revision goes straight to its snapshot folder
    assert resolve_model_folder("FoivosPar/Arc2Face", required=REQUIRED, what="Arc2Face", revision=COMMIT) == snapshot


def test_repo_from_cache_with_named_revision(offline):
    snapshot = _cache_repo(offline, "owner/model", *REQUIRED, ref="v1", commit="f" * 40)
    assert resolve_model_folder("owner/model", required=REQUIRED, what="M", revision="v1") == snapshot
    with pytest.raises(ModelFilesError, match="offline"):
        resolve_model_folder("owner/model", required=REQUIRED, what="M")  # main was never cached


def test_repo_not_in_cache_offline(offline):
    _cache_repo(offline, "FoivosPar/Arc2Face", "arc2face/config.json")  # partial snapshot
    required = [*REQUIRED, "encoder/pytorch_model.bin|encoder/model.safetensors"]
    with pytest.raises(ModelFilesError) as info:
        resolve_model_folder("FoivosPar/Arc2Face", required=required, what="Arc2Face")
    message = str(info.value)
    _check_readable(message)
    assert "offline" in message and "Arc2Face" in message
    for name in [*REQUIRED, "encoder/pytorch_model.bin", "encoder/model.safetensors"]:
        assert name in message
    assert "https://huggingface.co/FoivosPar/Arc2Face" in message and "--model DIR" in message
    assert str(offline) in message  # the cache location


def test_local_files_only_wins_over_online_env(offline, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not is_offline()
    with pytest.raises(ModelFilesError, match="local_files_only"):
        resolve_model_folder("owner/model", required=REQUIRED, what="M", local_files_only=True)


def test_online_download_and_hub_failures(offline, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    downloaded = _touch(tmp_path / "downloaded", *REQUIRED)
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(downloaded)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model_folder("owner/model", required=REQUIRED, what="M") == downloaded
    assert calls[0][0] == "owner/model" and calls[0][1]["allow_patterns"] == REQUIRED

    # the download succeeded but lacks a file
    with pytest.raises(ModelFilesError, match="does not contain encoder/x.bin"):
        resolve_model_folder("owner/model", required=[*REQUIRED, "encoder/x.bin"], what="M")

    class GatedRepoError(Exception):  # same name as the hub's, which is all the classification looks at
        pass

    def gated(repo_id, **kwargs):
        raise GatedRepoError("401 Client Error\nTraceback-looking hub noise")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(ModelFilesError, match="gated") as info:
        resolve_model_folder("owner/model", required=REQUIRED, what="M")
    _check_readable(str(info.value))
    assert isinstance(info.value.__cause__, GatedRepoError)


def test_required_must_be_relative(tmp_path):
    with pytest.raises(ValueError, match="relative"):
        resolve_model_folder(tmp_path, required=["../escape.bin"], what="M")
