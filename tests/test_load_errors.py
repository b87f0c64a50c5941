"""A broken or unsafe model folder is a clear, typed error naming the file (never "internal error")."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

from idfusion.errors import ModelFilesError
from idfusion.serialization import UnsafeCheckpointError, model_load_error, refused_global


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo never-run",))


def _write_exploit(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump({"weight": _Exploit()}, handle, protocol=4)


def test_refused_global_is_read_without_running_anything(tmp_path):
    _write_exploit(tmp_path / "legacy.bin")
    assert refused_global(tmp_path / "legacy.bin") == "posix.system"
    zipped = tmp_path / "zipped.pt"
    torch.save({"w": torch.zeros(2)}, zipped)
    assert refused_global(zipped) is None  # tensors only: nothing refused
    with zipfile.ZipFile(zipped) as archive:
        assert any(n.endswith("data.pkl") for n in archive.namelist())


def test_torch_refusal_names_the_file_and_the_global(tmp_path):
    _write_exploit(tmp_path / "encoder" / "pytorch_model.bin")
    torch.save({"w": torch.zeros(2)}, tmp_path / "unet.bin")
    with pytest.raises(pickle.UnpicklingError) as raised:
        torch.load(tmp_path / "encoder" / "pytorch_model.bin", weights_only=True)
    error = model_load_error(tmp_path, raised.value)
    assert isinstance(error, UnsafeCheckpointError)
    assert error.refused == "posix.system" and error.source.endswith("encoder/pytorch_model.bin")
    assert "weights_only=False" not in str(error) and "nothing from the file was executed" in str(error)


def test_truncated_safetensors_in_a_diffusers_folder(tmp_path):
    from diffusers import UNet2DModel

    UNet2DModel(sample_size=8, block_out_channels=(8,), down_block_types=("DownBlock2D",),
                up_block_types=("UpBlock2D",), norm_num_groups=4, layers_per_block=1).save_pretrained(tmp_path)  # fmt: skip
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises((OSError, ValueError, RuntimeError)) as raised:
        UNet2DModel.from_pretrained(tmp_path)
    error = model_load_error(tmp_path, raised.value)
    assert isinstance(error, ModelFilesError)
    assert str(error) == f"{weights}: truncated or corrupt weights file; download it again"


def test_unrelated_errors_are_left_alone():
    assert model_load_error(None, ValueError("something else")) is None


def test_a_method_published_elsewhere_has_one_source_of_advice(tmp_path, monkeypatch):
    from idfusion.hub import resolve_model_folder

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelFilesError) as raised:
        resolve_model_folder("owner/name", required=["a.bin"], what="X", source="on ModelScope (owner/name)")
    message = str(raised.value)
    assert "They are published on ModelScope (owner/name)" in message and "a.bin" in message
    assert "huggingface" not in message.lower()
