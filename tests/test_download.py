"""``idfusion download``: each method's official files, fetched to where its pipeline looks for them.

Nothing touches the network. A fake Hub (``huggingface_hub.snapshot_download``) and a fake ``modelscope`` module
serve the repos' file lists (from the releases' READMEs and the specs) and write small files, in the Hugging Face
cache layout or into ``local_dir``. The expectations come from the pipelines themselves: each method's
``from_pretrained`` runs once against an empty cache, and what it resolves and would download is recorded.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import socket
import sys
import types
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants, errors
from huggingface_hub.utils import are_progress_bars_disabled, filter_repo_objects

from idfusion import hub, registry
from idfusion.cli.download import OFFLINE
from idfusion.cli.main import main
from idfusion.errors import ModelFilesError

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
ADAFACE_V2 = "models/adaface/VGGface2_HQ_masks2024-10-14T16-09-24_zero3-ada-3500.pt"

#: What each repo holds (the parts that matter), from the releases' READMEs and the specs' file lists.
HF_REPOS = {
    "FoivosPar/Arc2Face": [
        "arc2face/config.json", "arc2face/diffusion_pytorch_model.safetensors", "encoder/config.json",
        "encoder/pytorch_model.bin", "controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors",
        "arcface.onnx", "README.md",
    ],
    SD15: [
        "model_index.json", "v1-5-pruned.ckpt", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json", "safety_checker/config.json", "safety_checker/model.safetensors",
        "feature_extractor/preprocessor_config.json",
    ],
    "adaface-neurips/adaface-models": [
        ADAFACE_V2, "models/arc2face/encoder/config.json", "models/arc2face/encoder/pytorch_model.bin",
        "models/arc2face/arc2face/config.json", "models/arc2face/arc2face/diffusion_pytorch_model.safetensors",
        "models/insightface/models/antelopev2/scrfd_10g_bnkps.onnx",
        "models/insightface/models/antelopev2/arcface.onnx", "models/insightface/models/buffalo_l/det_10g.onnx",
        "models/insightface/models/buffalo_l/w600k_r50.onnx", "ConsistentID/models/ConsistentID-v1.bin",
        "ConsistentID/models/BiSeNet_pretrained_for_ConsistentID.pth",
    ],
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": [
        "config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin",
        "open_clip_pytorch_model.bin",
    ],
    "shilongz/FlashFace-SD1.5": [
        "flashface.ckpt", "openai-clip-vit-large-14.pth", "sd-v1-vae.pth", "bpe_simple_vocab_16e6.txt.gz",
        "retinaface_resnet50.pth", "README.md",
    ],
    "IntellectGen/FlashFace": [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "refnet/config.json",
        "refnet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
        "scheduler/scheduler_config.json", "README.md",
    ],
    "Xiang-cd/FeedFace": [
        "models/uvit_v1.pth", "models/autoencoder_kl.pth", "models/caption_decoder.pth", "models/feed-4800000.pt",
        "models/gpt2/config.json", "models/gpt2/pytorch_model.bin", "models/gpt2/vocab.json", "README.md",
    ],
    "openai/clip-vit-large-patch14": [
        "config.json", "vocab.json", "merges.txt", "model.safetensors", "pytorch_model.bin", "tf_model.h5",
        "tokenizer_config.json",
    ],
}  # fmt: skip
MODELSCOPE_REPOS = {
    "yucheng1996/FaceChain-FACT": [
        "ms1mv2_model_TransFace_S.pt", "adapter_maj_mask_large_new_reg001_faceshuffle_00290001.ckpt",
        "adapter_film_mask_large_new_reg001_faceshuffle_00290001.ckpt", "configuration.json", "README.md",
    ],
    "Cherrytest/zjz_mj_jiyi_small_addtxt_fromleo": ["zjz_mj_jiyi_small_addtxt_fromleo.safetensors"],
}  # fmt: skip

#: Files each method's loaders read, per repo (the READMEs' layouts, the specs' loading sections): the download
#: must fetch at least these.
NEEDED = {
    "arc2face": {
        "FoivosPar/Arc2Face": {"arc2face/diffusion_pytorch_model.safetensors", "encoder/pytorch_model.bin",
                               "arcface.onnx"},
        SD15: {"vae/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
               "scheduler/scheduler_config.json"},
        "adaface-neurips/adaface-models": {"models/insightface/models/antelopev2/scrfd_10g_bnkps.onnx"},
    },
    "adaface": {
        "adaface-neurips/adaface-models": {ADAFACE_V2, "models/arc2face/encoder/pytorch_model.bin",
                                           "models/insightface/models/antelopev2/scrfd_10g_bnkps.onnx",
                                           "ConsistentID/models/ConsistentID-v1.bin"},
        SD15: {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
               "vae/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json"},
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": {"config.json", "model.safetensors"},
    },
    "flashface": {"shilongz/FlashFace-SD1.5": {"flashface.ckpt", "openai-clip-vit-large-14.pth", "sd-v1-vae.pth"}},
    "open-flashface": {
        "IntellectGen/FlashFace": {"unet/diffusion_pytorch_model.safetensors",
                                   "refnet/diffusion_pytorch_model.safetensors",
                                   "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                                   "tokenizer/vocab.json", "scheduler/scheduler_config.json"},
    },
    "fact": {
        "yucheng1996/FaceChain-FACT": {"ms1mv2_model_TransFace_S.pt",
                                       "adapter_maj_mask_large_new_reg001_faceshuffle_00290001.ckpt",
                                       "adapter_film_mask_large_new_reg001_faceshuffle_00290001.ckpt"},
        "Cherrytest/zjz_mj_jiyi_small_addtxt_fromleo": {"zjz_mj_jiyi_small_addtxt_fromleo.safetensors"},
        SD15: {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"},
    },
    "feedface": {
        "Xiang-cd/FeedFace": {"models/uvit_v1.pth", "models/autoencoder_kl.pth", "models/caption_decoder.pth",
                              "models/feed-4800000.pt", "models/gpt2/config.json"},
        "openai/clip-vit-large-patch14": {"model.safetensors", "vocab.json", "merges.txt"},
    },
    "feedface-sd15": {SD15: {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}},
}  # fmt: skip

#: Where a pipeline's own first-use download fetches less than its loader reads (a pipeline bug, reported):
#: ``idfusion download`` fetches more there, so exact pattern equality is not expected.
PIPELINE_FETCHES_TOO_LITTLE: set[tuple[str, str]] = set()  # none left (open FlashFace fetched only configs)

METHODS = [spec.name for spec in registry.methods() if spec.downloads]
REAL_RESOLVE = hub.resolve_model_folder


# ---- the fake hubs --------------------------------------------------------------------------------------------


def _write(folder: Path, names, repo: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(f"{repo}/{name}".encode())


class FakeHub:
    """``snapshot_download``: records each call, then writes the repo's files that match ``allow_patterns`` (all
    of them with ``everything``), in the cache layout or into ``local_dir``."""

    def __init__(self, everything: bool = False):
        self.everything = everything
        self.calls: list[dict] = []
        self.written: dict[str, set[str]] = {}
        self.forbidden = False

    def __call__(self, repo_id, *, revision=None, cache_dir=None, local_dir=None, allow_patterns=None, **kwargs):
        assert not self.forbidden, f"downloaded {repo_id} although everything should be there"
        print(f"FAKE-DOWNLOAD {repo_id}")
        self.calls.append(
            {"repo": repo_id, "revision": revision, "patterns": tuple(allow_patterns or ()), "local_dir": local_dir,
             "bars": not are_progress_bars_disabled()}
        )  # fmt: skip
        if repo_id not in HF_REPOS:
            raise _hub_error(errors.RepositoryNotFoundError, f"404 Client Error: {repo_id}")
        names = HF_REPOS[repo_id]
        if not self.everything:
            names = list(filter_repo_objects(names, allow_patterns=allow_patterns))
        self.written.setdefault(repo_id, set()).update(names)
        if local_dir is not None:
            _write(Path(local_dir), names, repo_id)
            return str(local_dir)
        storage = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / (revision or "main")).write_text(commit)
        _write(storage / "snapshots" / commit, names, repo_id)
        return str(storage / "snapshots" / commit)


class FakeModelScope:
    """The ``modelscope`` client's ``snapshot_download`` (the parameters idfusion uses), writing into local_dir."""

    def __init__(self):
        self.calls: list[dict] = []
        self.written: dict[str, set[str]] = {}

    def snapshot_download(self, model_id, revision=None, cache_dir=None, local_dir=None, allow_patterns=None):
        self.calls.append({"repo": model_id, "revision": revision, "patterns": tuple(allow_patterns or ())})
        names = list(filter_repo_objects(MODELSCOPE_REPOS[model_id], allow_patterns=allow_patterns))
        self.written.setdefault(model_id, set()).update(names)
        _write(Path(local_dir), names, model_id)
        return local_dir

    def module(self) -> types.ModuleType:
        module = types.ModuleType("modelscope")
        module.__spec__ = importlib.machinery.ModuleSpec("modelscope", None)

        def snapshot_download(model_id, revision=None, cache_dir=None, local_dir=None, allow_patterns=None):
            return self.snapshot_download(model_id, revision, cache_dir, local_dir, allow_patterns)

        module.snapshot_download = snapshot_download
        return module


def _hub_error(cls, message: str) -> Exception:
    """An instance of a huggingface_hub error class without an HTTP response (its constructor's needs changed
    between releases; idfusion classifies by class)."""
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


def _split(patterns) -> set[str]:
    return {alt for pattern in patterns for alt in pattern.split("|")}


# ---- the pipelines, run against the fake hubs -----------------------------------------------------------------


class Resolutions:
    """Wraps ``hub.resolve_model_folder`` wherever the pipelines call it: records each call and its outcome. With
    ``modelscope_root``, a release published on ModelScope (``source=``) is served from the fake ModelScope files,
    as if the user had put them in a folder, so loading goes on to the base model."""

    def __init__(self, monkeypatch, modelscope_root: Path | None = None):
        self.calls: list[dict] = []
        self.modelscope_root = modelscope_root
        for name in METHODS:
            registry.pipeline_class(name)  # imported, so their module-level name can be patched
        for module in list(sys.modules.values()):
            found = getattr(module, "resolve_model_folder", None) if module is not None else None
            if found is REAL_RESOLVE or isinstance(found, Resolutions):
                monkeypatch.setattr(module, "resolve_model_folder", self)

    def __call__(self, model, *, required, what, allow_patterns=None, local_files_only=None, revision=None,
                 source=None):  # fmt: skip
        record = {"model": str(model), "required": list(required), "revision": revision, "source": source}
        self.calls.append(record)
        try:
            record["result"] = REAL_RESOLVE(
                model, required=required, what=what, allow_patterns=allow_patterns,
                local_files_only=local_files_only, revision=revision, source=source,
            )  # fmt: skip
        except ModelFilesError as error:
            if source is None or self.modelscope_root is None:
                record["error"] = error
                raise
            folder = self.modelscope_root / str(model).replace("/", "--")
            _write(folder, MODELSCOPE_REPOS[str(model)], str(model))
            record["result"] = folder
        return record["result"]


def _stub_feedface_loaders(monkeypatch) -> None:
    """FeedFace loads the U-ViT, VAE and caption decoder before it resolves the text encoder: stubbed, so the
    resolution of the text encoder is reached (the files are fakes)."""
    from idfusion.convert import feedface as ckpt

    for name in ("load_uvit", "load_autoencoder", "load_text_decoder"):
        monkeypatch.setattr(ckpt, name, lambda *args, **kwargs: None)


def _model_argument(method: str, tmp_path: Path) -> Path | None:
    """The model to load: the default release, except for FeedFace-SD1.5 (no official adapter: a fake one)."""
    if registry.get_method(method).default_model is not None:
        return None
    folder = tmp_path / "trained-adapter"
    _write(folder, ["feedface_sd15.safetensors"], "trained")
    return folder


def _load(method: str, model: Path | None) -> BaseException:
    """Run the method's ``from_pretrained``; the fake weights always stop it after the files were found."""
    with pytest.raises(Exception) as raised:  # noqa: B017 - any failure once the files are read is expected
        registry.load_pipeline(method, None if model is None else str(model))
    return raised.value


def _load_consistentid(folder: Path) -> None:
    """AdaFace's ConsistentID branch resolves CLIP-ViT-H-14 only for a v2 joint checkpoint: called directly."""
    from idfusion.pipelines import pipeline_adaface

    adaface = types.SimpleNamespace(has_consistentid=True, consistentid_projector=None)
    try:
        pipeline_adaface._load_consistentid(folder, types.SimpleNamespace(adaface=adaface, tokenizer=None), None,
                                            local_files_only=None)  # fmt: skip
    except Exception:  # the fake weights stop it after the resolution
        pass


def _consistentid_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "adaface-release"
    _write(folder, ["ConsistentID/models/ConsistentID-v1.bin", "models/insightface/models/buffalo_l/det_10g.onnx"],
           "adaface")  # fmt: skip
    return folder


# ---- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No sockets; empty caches in tmp; online unless a test says otherwise; the working folder is tmp."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "IDFUSION_FACE_MODELS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    bars = importlib.import_module("huggingface_hub.utils.tqdm")  # the module (the package exports a class so named)
    monkeypatch.setattr(bars, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("IDFUSION_CACHE", str(tmp_path / "idfusion_cache"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope_cache"))
    monkeypatch.chdir(tmp_path)
    states = dict(bars.progress_bar_states)
    yield tmp_path
    bars.progress_bar_states.clear()  # main() switches the library bars off, download on: as before
    bars.progress_bar_states.update(states)


@pytest.fixture
def fake_hub(monkeypatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


@pytest.fixture
def fake_modelscope(monkeypatch) -> FakeModelScope:
    fake = FakeModelScope()
    monkeypatch.setitem(sys.modules, "modelscope", fake.module())
    return fake


def _go_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _pipeline_requests(method: str, tmp_path: Path, monkeypatch) -> tuple[list[dict], list[dict]]:
    """What the method's pipeline downloads on first use from an empty cache (Hub calls) and what it resolves."""
    pipeline_hub = FakeHub(everything=True)  # every file, so resolution goes on past a pipeline's own gaps
    monkeypatch.setattr(huggingface_hub, "snapshot_download", pipeline_hub)
    resolutions = Resolutions(monkeypatch, modelscope_root=tmp_path / "modelscope-files")
    if method == "feedface":
        _stub_feedface_loaders(monkeypatch)
    _load(method, _model_argument(method, tmp_path))
    if method == "adaface":
        _load_consistentid(_consistentid_folder(tmp_path))
    return pipeline_hub.calls, resolutions.calls


# ---- the sources are the pipelines' own -------------------------------------------------------------------------


def test_every_release_has_its_downloads_first():
    for spec in registry.methods():
        if spec.default_model is not None:
            assert spec.downloads and spec.downloads[0].repo_id == spec.default_model, spec.name


@pytest.mark.parametrize("method", METHODS)
def test_download_fetches_what_the_pipeline_resolves_and_it_is_found_offline(
    method, tmp_path, monkeypatch, capsys, fake_modelscope
):
    # 1. the pipeline's own first use, from an empty cache: the ground truth
    pipeline_calls, pipeline_resolutions = _pipeline_requests(method, tmp_path / "pipeline", monkeypatch)
    assert pipeline_resolutions, "the pipeline resolved nothing"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "fresh_cache"))  # what follows starts from nothing
    capsys.readouterr()

    # 2. idfusion download, into the default places
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert main(["download", "--method", method]) == 0
    out = capsys.readouterr().out
    by_repo: dict[str, list[dict]] = {}
    for call in fake.calls:
        by_repo.setdefault(call["repo"], []).append(call)
    for call in pipeline_calls:  # the same repo, revision and patterns as the pipeline's own download
        assert call["repo"] in by_repo, f"{method}: {call['repo']} is not downloaded"
        ours = by_repo[call["repo"]]
        assert any(c["revision"] == call["revision"] for c in ours)
        fetched = set().union(
            *(filter_repo_objects(HF_REPOS[call["repo"]], allow_patterns=c["patterns"]) for c in ours)
        )
        theirs = set(filter_repo_objects(HF_REPOS[call["repo"]], allow_patterns=sorted(_split(call["patterns"]))))
        assert theirs <= fetched
        if (method, call["repo"]) in PIPELINE_FETCHES_TOO_LITTLE:
            assert theirs < fetched
        else:
            assert any(set(c["patterns"]) == _split(call["patterns"]) for c in ours), (method, call["repo"])
    for record in pipeline_resolutions:  # a release on ModelScope: its id, revision and required files
        if record["source"] is None:
            continue
        (ours,) = [c for c in fake_modelscope.calls if c["repo"] == record["model"]]
        assert f"revision {ours['revision']}" in record["source"]
        assert _split(record["required"]) <= fake_modelscope.written[record["model"]]
    written = {**fake.written, **fake_modelscope.written}
    for repo, files in NEEDED[method].items():
        assert files <= written.get(repo, set()), (method, repo, files - written.get(repo, set()))
    assert all(call["bars"] for call in fake.calls), "huggingface_hub's progress bars were off"
    lines = out.splitlines()
    steps = [line for line in lines if line.startswith("[")]
    assert lines[0] == steps[0] and len(steps) == len(hub.plan_downloads(registry.get_method(method).downloads))
    assert "done; the files are in:" in out  # then one line per folder

    # 3. offline, the pipeline finds every file where the download put it, and downloads nothing
    _go_offline(monkeypatch)
    fake.forbidden = True
    resolutions = Resolutions(monkeypatch)
    if method == "feedface":
        _stub_feedface_loaders(monkeypatch)
    release = registry.get_method(method).downloads[0]
    model = _model_argument(method, tmp_path)
    if release.hub == "modelscope":  # no cache: the folder the README passes as --model
        model = tmp_path / release.default
        assert f"--model {model}" in out
    error = _load(method, model)
    if method == "adaface":
        _load_consistentid(_consistentid_folder(tmp_path / "offline"))
    assert resolutions.calls and not [r for r in resolutions.calls if "error" in r], resolutions.calls
    assert not isinstance(error, ModelFilesError), error
    assert len(resolutions.calls) >= len([r for r in pipeline_resolutions if r["source"] is None])


def test_arc2face_face_models_go_where_the_face_backend_looks(fake_hub, capsys):
    from idfusion.faces.onnx_backend import resolve_onnx_model_dir

    assert main(["download", "--method", "arc2face"]) == 0
    folder = resolve_onnx_model_dir()
    assert (folder / "arcface.onnx").read_bytes() == b"FoivosPar/Arc2Face/arcface.onnx"
    assert (folder / "scrfd_10g_bnkps.onnx").is_file()  # flattened out of AdaFace's models/insightface/...
    assert str(folder) in capsys.readouterr().out
    # a second run finds everything in place (the cache answers; the links are kept)
    assert main(["download", "--method", "arc2face"]) == 0


def test_fact_default_style_lora_is_found(fake_hub, fake_modelscope, isolated):
    from idfusion.styles import facechain_default_lora_path

    assert main(["download", "--method", "fact"]) == 0
    folder = isolated / "FaceChain-FACT"
    assert facechain_default_lora_path(folder).is_relative_to(folder)
    assert [c["revision"] for c in fake_modelscope.calls] == ["v1.0.0", "v1.0.0"]


def test_modelscope_advice_is_the_pipelines():
    from idfusion.pipelines import pipeline_fact

    release = registry.get_method("fact").downloads[0]
    assert release.repo_id == pipeline_fact.MODEL_ID and release.published == pipeline_fact.SOURCE


@pytest.mark.parametrize("method", METHODS)
def test_out_folder_is_a_model_folder(method, tmp_path, monkeypatch, fake_hub, fake_modelscope, capsys):
    out = tmp_path / "models" / method
    assert main(["download", "--method", method, "--out", str(out)]) == 0
    assert f"--model {out}" in capsys.readouterr().out or registry.get_method(method).default_model is None
    _go_offline(monkeypatch)
    fake_hub.forbidden = True
    if registry.get_method(method).default_model is None:
        _write(out, ["feedface_sd15.safetensors"], "trained")
    resolutions = Resolutions(monkeypatch)
    if method == "feedface":
        _stub_feedface_loaders(monkeypatch)
    error = _load(method, out)
    assert not isinstance(error, ModelFilesError), error
    assert not [r for r in resolutions.calls if "error" in r]  # (FlashFace reads a folder without resolving)
    for record in resolutions.calls:  # everything from the folder, nothing from the cache
        assert Path(record["result"]).resolve().is_relative_to(out.resolve()), record
    if method == "arc2face":  # the pipeline's face_model_dir: the model folder's antelopev2/
        assert {p.name for p in (out / "antelopev2").glob("*.onnx")} == {"arcface.onnx", "scrfd_10g_bnkps.onnx"}
    if method == "adaface":  # CLIP-ViT-H from the release folder, not the Hub
        resolutions.calls.clear()
        _load_consistentid(out)
        assert not resolutions.calls


# ---- the command line -------------------------------------------------------------------------------------------


def test_dry_run_prints_everything_and_fetches_nothing(fake_hub, fake_modelscope, capsys, monkeypatch):
    _go_offline(monkeypatch)  # no network needed
    assert main(["download", "--method", "all", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not fake_hub.calls and not fake_modelscope.calls
    for spec in registry.methods():
        for source in spec.downloads:
            assert source.repo_id in out and ", ".join(source.patterns) in out
    assert "revision v1.0.0" in out and str(hub.hf_cache_dir()) in out and "dry run: nothing was downloaded" in out
    # one SD1.5 base for all the methods that use the whole of it
    assert out.count("[*.json, *.txt, unet/*, text_encoder/*, vae/*]") == 1
    # with --out, each method gets its own model folder
    assert main(["download", "--method", "all", "--out", "models", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not fake_hub.calls and str(hub.hf_cache_dir()) not in out
    for name in METHODS:
        assert f"-> {Path('models', name).absolute()}" in out
    assert f"-> {Path('models', 'adaface', 'models', 'stable-diffusion-v1-5').absolute()}" in out


@pytest.mark.parametrize("how", ["env", "constant"])
def test_offline_refuses_up_front(how, fake_hub, fake_modelscope, capsys, monkeypatch):
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["download", "--method", "arc2face"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and not fake_hub.calls and not fake_modelscope.calls
    assert captured.err == f"idfusion download: error: {OFFLINE}\n"
    assert "HF_HUB_OFFLINE" in OFFLINE and "\n" not in OFFLINE


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (lambda: _hub_error(errors.RepositoryNotFoundError, "404 Client Error.\n\nRepository Not Found"), "not found"),
        (lambda: _hub_error(errors.GatedRepoError, "401 Client Error.\n\nCannot access gated repo"), "gated"),
        (lambda: _hub_error(errors.RevisionNotFoundError, "404 Client Error.\n\nRevision Not Found"), "revision"),
        (lambda: errors.LocalEntryNotFoundError("An error happened ...\nconnection"), "could not be reached"),
        (lambda: ConnectionError("[Errno 111] Connection refused"), "could not be reached"),
        (lambda: _hub_error(errors.HfHubHTTPError, "500 Server Error\n\nbody"), "try again later"),
        (lambda: OSError(28, "No space left on device", "/disk/blob"), "cannot write /disk/blob"),
    ],
)  # fmt: skip
def test_hub_failures_are_one_line(error, says, monkeypatch, capsys):
    def failing(repo_id, **kwargs):
        raise error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    assert main(["download", "--method", "flashface"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("idfusion download: error: could not download FlashFace from shilongz/FlashFace-SD1.5")
    assert says in err and err.count("\n") == 1 and "Traceback" not in err


def test_modelscope_client_missing_is_said_before_anything_is_fetched(fake_hub, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # not importable
    assert main(["download", "--method", "fact"]) == 1
    err = capsys.readouterr().err
    assert not fake_hub.calls and err.count("\n") == 1
    assert "pip install modelscope" in err and "https://modelscope.cn/models/yucheng1996/FaceChain-FACT" in err


def test_a_repo_without_the_required_files_is_an_error(monkeypatch, capsys):
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setitem(HF_REPOS, "shilongz/FlashFace-SD1.5", ["flashface.ckpt", "README.md"])
    assert main(["download", "--method", "flashface"]) == 1
    err = capsys.readouterr().err
    assert "lacks openai-clip-vit-large-14.pth" in err and err.count("\n") == 1


def test_not_found_messages_name_the_download_command(monkeypatch):
    from idfusion.methods import arc2face

    _go_offline(monkeypatch)
    with pytest.raises(ModelFilesError) as raised:
        hub.resolve_model_folder("FoivosPar/Arc2Face", required=arc2face.REQUIRED_FILES, what="Arc2Face")
    assert "`idfusion download --method arc2face` once online" in str(raised.value)
    with pytest.raises(ModelFilesError) as raised:
        hub.resolve_model_folder(SD15, required=["model_index.json", "unet/config.json"], what="SD1.5")
    assert "`idfusion download --method adaface` (or fact, feedface-sd15)" in str(raised.value)
    fact = registry.get_method("fact").downloads[0]
    with pytest.raises(ModelFilesError) as raised:
        hub.resolve_model_folder(fact.repo_id, required=fact.required[:1], what="FACT", source=fact.published)
    assert "`idfusion download --method fact`" in str(raised.value)
    assert "huggingface" not in str(raised.value).lower()
    with pytest.raises(ModelFilesError) as raised:  # no method fetches it: no command named
        hub.resolve_model_folder("owner/other", required=["a.bin"], what="X")
    assert "`idfusion download" not in str(raised.value)


def test_is_present_checks_every_required_alternative(tmp_path):
    from idfusion.hub import DownloadSource, PlannedDownload, is_present

    source = DownloadSource("owner/name", "part", required=("a.safetensors|a.bin", "sub/b.json"), default="folder")
    planned = PlannedDownload(source, tmp_path / "m", cached=False)
    assert not is_present(planned)  # no folder
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "a.bin").write_bytes(b"x")
    assert not is_present(planned)  # sub/b.json missing
    (tmp_path / "m" / "sub" / "b.json").write_text("{}")
    assert is_present(planned)  # a.bin stands for a.safetensors|a.bin
    patterns_only = DownloadSource("owner/name", "part", allow_patterns=("*.json",), default="folder")
    assert not is_present(PlannedDownload(patterns_only, tmp_path / "m", cached=False))  # nothing to check against
