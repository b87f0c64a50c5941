"""Tiny AdaFace checkpoints in the official pickled format (see :mod:`idfusion.methods.adaface`).

The official ``.pt`` files are ``torch.save`` dicts of whole ``nn.Module`` objects pickled under the authors' class
paths (``adaface.subj_basis_generator.SubjBasisGenerator``, ``adaface.arc2face_models.CLIPTextModelWrapper``,
``adaface.arc2face_models.CLIPAttentionMKV``; v1 under ``ldm.modules.*``) around transformers 4's CLIP modules
(``transformers.models.clip.modeling_clip.CLIPTextTransformer``, ``CLIPEncoderLayer``, ``CLIPAttention``, ...).
Those modules are not importable here (transformers 5 has no ``CLIPTextTransformer``), so the writer builds
throwaway ``nn.Module`` subclasses that only *name* those paths, and pickles them with a pickler whose
``save_global`` writes the recorded path for them; no module is registered in ``sys.modules`` and nothing global
changes. The tensors are real and seeded; everything pickled is data (no hooks, no functions).

Sizes: width 512 (the Arc2Face encoder that feeds AdaFace zero-pads the 512-d ArcFace vector into its width, so the
whole tiny AdaFace kit is 512 wide), CLIP's real 49,408-token vocabulary (the real tokenizer is used), 77 positions,
3 layers of 4 heads, MLP width 64. Layers 1 and 2 have widened keys/values (multipliers ``[1, 2, 4]``), which
exercises the multi-KV attention. The v2 checkpoint's two projectors share their (frozen, CLIP-initialised) token and
position tables in one storage, which keeps the file at about 100 MB.
"""

from __future__ import annotations

import pickle
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "TINY_ADAFACE_CONFIG",
    "TINY_ARC2FACE_MULTIPLIERS",
    "TINY_CONSISTENTID_MULTIPLIERS",
    "TINY_OBJ_PROJ_IN_DIM",
    "V1_RELATIVE_PATH",
    "V2_RELATIVE_PATH",
    "write_tiny_adaface_checkpoint",
    "write_tiny_adaface_v1",
]

TINY_ADAFACE_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 64,
    "num_layers": 3,
    "num_heads": 4,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
}
TINY_ARC2FACE_MULTIPLIERS = [1, 2, 4]
TINY_CONSISTENTID_MULTIPLIERS = [1, 1, 2]
TINY_V1_MULTIPLIER = 2  # v1 records one multiplier for layers [begin, end)
TINY_V1_MULTIPLIER_LAYERS = (1, 3)
TINY_OBJ_PROJ_IN_DIM = 4  # 384 (DINO ViT-S) in the release; the key layout is what matters here
TINY_NUM_SUFFIX_EMBS = 4

V2_RELATIVE_PATH = Path("models/adaface/VGGface2_HQ_masks2024-10-14T16-09-24_zero3-ada-3500.pt")
V1_RELATIVE_PATH = Path("models/adaface/subjects-celebrity2024-05-16T17-22-46_zero3-ada-30000.pt")

_PATH_ATTR = "_idfusion_pickle_path"
_CLIP = "transformers.models.clip.modeling_clip"


# ----------------------------------------------------------------------------------------------------------------------
# Pickling classes under recorded module paths
# ----------------------------------------------------------------------------------------------------------------------


class _RecordedPathPickler(pickle._Pickler):
    """A pure-Python pickler that writes a class's recorded ``(module, qualname)`` instead of looking it up."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        path = obj.__dict__.get(_PATH_ATTR) if isinstance(obj, type) else None
        if path is None:
            super().save_global(obj, name)
            return
        module, qualname = path
        if self.proto >= 4:
            self.save(module)
            self.save(qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
        self.memoize(obj)


# What torch.save(pickle_module=...) uses: ``Pickler`` (subclassed for storages) and ``__name__`` (checked for dill).
_PICKLE_MODULE = types.SimpleNamespace(__name__="idfusion.testing.tiny_adaface", Pickler=_RecordedPathPickler)


class _Classes:
    """One throwaway class per recorded path, so every instance of a path pickles as the same global."""

    def __init__(self) -> None:
        self._classes: dict[str, type] = {}

    def new(self, path: str, *, module: bool = True, **attrs: Any) -> Any:
        """An instance of the class recorded as ``path`` (an ``nn.Module`` unless ``module`` is false)."""
        if path not in self._classes:
            module_name, _, qualname = path.rpartition(".")
            base = nn.Module if module else object
            cls = type(qualname, (base,), {"__module__": module_name, "__qualname__": qualname})
            setattr(cls, _PATH_ATTR, (module_name, qualname))
            self._classes[path] = cls
        obj = self._classes[path]()
        for key, value in attrs.items():
            setattr(obj, key, value)  # nn.Module.__setattr__ registers modules and parameters
        return obj


# ----------------------------------------------------------------------------------------------------------------------
# Random weights
# ----------------------------------------------------------------------------------------------------------------------


def _randn(gen: torch.Generator, *shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std + mean


def _linear(gen: torch.Generator, d_in: int, d_out: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias, device="meta")
    layer.weight = nn.Parameter(_randn(gen, d_out, d_in, std=d_in**-0.5))
    if bias:
        layer.bias = nn.Parameter(_randn(gen, d_out, std=0.02))
    return layer


def _layer_norm(gen: torch.Generator, dim: int, eps: float = 1e-5) -> nn.LayerNorm:
    norm = nn.LayerNorm(dim, eps=eps, device="meta")
    norm.weight = nn.Parameter(_randn(gen, dim, std=0.1, mean=1.0))
    norm.bias = nn.Parameter(_randn(gen, dim, std=0.02))
    return norm


def _embedding(weight: torch.Tensor) -> nn.Embedding:
    # _weight skips the random initialisation (slow for 49,408 rows even on the meta device).
    return nn.Embedding(weight.shape[0], weight.shape[1], _weight=weight)


def _clip_text_config(classes: _Classes) -> Any:
    cfg = TINY_ADAFACE_CONFIG
    # A transformers 4 CLIPTextConfig as pickled inside the model (plain attributes; SD1.5's old special-token ids).
    return classes.new(
        "transformers.models.clip.configuration_clip.CLIPTextConfig",
        module=False,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        projection_dim=cfg["hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=cfg["num_heads"],
        max_position_embeddings=cfg["max_position_embeddings"],
        hidden_act="quick_gelu",
        layer_norm_eps=cfg["layer_norm_eps"],
        attention_dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        torch_dtype=torch.float32,
        _name_or_path="openai/clip-vit-large-patch14",
        _attn_implementation_internal="eager",
        transformers_version="4.44.2",
        model_type="clip_text_model",
    )


def _prompt2token_proj(
    classes: _Classes,
    gen: torch.Generator,
    family: str,
    multipliers: Sequence[int],
    tables: tuple[torch.Tensor, torch.Tensor],
) -> nn.Module:
    """``CLIPTextModelWrapper`` with MKV layers, as the authors' code builds and pickles it."""
    cfg = TINY_ADAFACE_CONFIG
    d, heads, eps = cfg["hidden_size"], cfg["num_heads"], cfg["layer_norm_eps"]
    config = _clip_text_config(classes)
    layers = nn.ModuleList()
    for multiplier in multipliers:
        projections = {
            "k_proj": _linear(gen, d, d * multiplier),
            "v_proj": _linear(gen, d, d * multiplier),
            "q_proj": _linear(gen, d, d),
            "out_proj": _linear(gen, d, d),
        }
        common = {"config": config, "embed_dim": d, "num_heads": heads, "head_dim": d // heads}
        common |= {"scale": (d // heads) ** -0.5, "dropout": 0.0, "is_causal": True}
        if multiplier > 1:
            attention = classes.new(f"{family}.arc2face_models.CLIPAttentionMKV", multiplier=multiplier, **common)
        else:
            attention = classes.new(f"{_CLIP}.CLIPAttention", **common)
        for name, projection in projections.items():
            setattr(attention, name, projection)
        mlp = classes.new(
            f"{_CLIP}.CLIPMLP",
            config=config,
            activation_fn=classes.new("transformers.activations.QuickGELUActivation"),
            fc1=_linear(gen, d, cfg["intermediate_size"]),
            fc2=_linear(gen, cfg["intermediate_size"], d),
        )
        layers.append(
            classes.new(
                f"{_CLIP}.CLIPEncoderLayer",
                embed_dim=d,
                self_attn=attention,
                layer_norm1=_layer_norm(gen, d, eps),
                mlp=mlp,
                layer_norm2=_layer_norm(gen, d, eps),
            )
        )
    embeddings = classes.new(
        f"{_CLIP}.CLIPTextEmbeddings", token_embedding=_embedding(tables[0]), position_embedding=_embedding(tables[1])
    )
    positions = torch.arange(cfg["max_position_embeddings"]).unsqueeze(0)  # (1, 77), saved by transformers 4.3x
    embeddings.register_buffer("position_ids", positions)
    encoder = classes.new(f"{_CLIP}.CLIPEncoder", config=config, layers=layers, gradient_checkpointing=False)
    text_model = classes.new(
        f"{_CLIP}.CLIPTextTransformer",
        config=config,
        embeddings=embeddings,
        encoder=encoder,
        final_layer_norm=_layer_norm(gen, d, eps),
        eos_token_id=2,
    )
    return classes.new(
        f"{family}.arc2face_models.CLIPTextModelWrapper",
        config=config,
        text_model=text_model,
        name_or_path="openai/clip-vit-large-patch14",
        warnings_issued={},
    )


def _clip_tables(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = TINY_ADAFACE_CONFIG
    tokens = _randn(gen, cfg["vocab_size"], cfg["hidden_size"], std=0.02)
    positions = _randn(gen, cfg["max_position_embeddings"], cfg["hidden_size"], std=0.01)
    return tokens, positions


def _obj_proj_in(classes: _Classes, gen: torch.Generator) -> nn.Sequential:
    # DINO features -> 77 x D prompt, for non-face objects; unused for faces (obj_proj_in.0.weight, .2.{weight,bias}).
    d, length = TINY_ADAFACE_CONFIG["hidden_size"], TINY_ADAFACE_CONFIG["max_position_embeddings"]
    rearrange = classes.new("einops.layers.torch.Rearrange", pattern="b (l d) -> b l d", axes_lengths={"l": length})
    return nn.Sequential(_linear(gen, TINY_OBJ_PROJ_IN_DIM, length * d, bias=False), rearrange, _layer_norm(gen, d))


def _layer_weights(gen: torch.Generator) -> nn.Parameter:
    # Trained values are around [[0.92], [0.95], [2.08]] (a code comment in the release); positive, not [1, 2, 4].
    return nn.Parameter(torch.tensor([[0.9163], [0.9483], [2.0762]]) + _randn(gen, 3, 1, std=0.05))


def _v2_generator(
    classes: _Classes,
    gen: torch.Generator,
    num_id_tokens: int,
    multipliers: Sequence[int],
    tables: tuple[torch.Tensor, torch.Tensor],
    *,
    suffix_embs: bool,
) -> nn.Module:
    d = TINY_ADAFACE_CONFIG["hidden_size"]
    generator = classes.new(
        "adaface.subj_basis_generator.SubjBasisGenerator",
        N_ID=num_id_tokens,
        placeholder_is_bg=False,
        num_out_embs=num_id_tokens,
        prompt2token_proj_attention_multipliers=list(multipliers),
        output_scale=d**-0.5,
        dtype=torch.float32,
        pad_embeddings=_randn(gen, 77, d, std=0.02),  # a plain tensor attribute, not a parameter
    )
    generator.prompt2token_proj = _prompt2token_proj(classes, gen, "adaface", multipliers, tables)
    generator.prompt2token_proj_grad_scaler = classes.new("adaface.util.GradientScaler", scale=1.0)
    generator.obj_proj_in = _obj_proj_in(classes, gen)
    generator.layerwise_proj = nn.Identity()
    generator.hidden_state_layer_weights = _layer_weights(gen)
    if suffix_embs:
        generator.static_img_suffix_embs = nn.Parameter(_randn(gen, 1, TINY_NUM_SUFFIX_EMBS, d, std=0.02))
    return generator


def _save(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, pickle_module=_PICKLE_MODULE)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------------------


def write_tiny_adaface_checkpoint(out_dir: Path, seed: int) -> list[Path]:
    """Write a tiny v2 joint checkpoint at ``out_dir/models/adaface/VGGface2_HQ_masks2024-10-14T16-09-24_zero3-ada-3500.pt``.

    Top-level keys ``string_to_subj_basis_generator_dict`` (a ``ModuleDict`` ``{'z': ModuleList([ConsistentID,
    Arc2Face])}``), ``placeholder_strings`` and ``subject_strings``. The Arc2Face generator has multipliers
    ``[1, 2, 4]``, 16 ID tokens and ``static_img_suffix_embs``; the ConsistentID one ``[1, 1, 2]`` and 4 ID tokens.
    Both have the unused ``obj_proj_in`` and a ``position_ids`` buffer.

    Args:
        out_dir (`Path`): an existing folder.
        seed (`int`): the same seed writes the same weights.

    Returns:
        `list[Path]`: the file written.
    """
    gen = torch.Generator().manual_seed(seed)
    classes = _Classes()
    tables = _clip_tables(gen)  # the frozen openai CLIP-L tables, the same in both projectors
    consistentid = _v2_generator(classes, gen, 4, TINY_CONSISTENTID_MULTIPLIERS, tables, suffix_embs=False)
    arc2face = _v2_generator(classes, gen, 16, TINY_ARC2FACE_MULTIPLIERS, tables, suffix_embs=True)
    checkpoint = {
        "string_to_subj_basis_generator_dict": nn.ModuleDict({"z": nn.ModuleList([consistentid, arc2face])}),
        "placeholder_strings": ["z"],
        "subject_strings": ["z"],
    }
    return [_save(checkpoint, Path(out_dir) / V2_RELATIVE_PATH)]


def write_tiny_adaface_v1(out_dir: Path, seed: int) -> list[Path]:
    """Write a tiny v1 (paper-era) checkpoint at ``out_dir/models/adaface/subjects-celebrity2024-05-16T17-22-46_zero3-ada-30000.pt``.

    Classes are pickled under ``ldm.modules.*``. Top-level keys as the 2024 ``EmbeddingManager.save``:
    ``string_to_token``, ``string_to_static_embedder``, ``string_to_subj_basis_generator_dict`` (``{'z': subject,
    'y': background}``), ``token2num_vectors``, ``emb_global_scale_scores``, ``use_conv_attn_kernel_size``,
    ``placeholder_strings``, ``subject_strings``, ``background_strings``, ``ca_q_bns``, ``ca_outfeat_lns``,
    ``do_zero_shot``. The subject generator has 16 ID tokens, multiplier 2 on layers [1, 3), ``pos_embs`` and
    ``obj_proj_in``.
    """
    gen = torch.Generator().manual_seed(seed)
    classes = _Classes()
    d = TINY_ADAFACE_CONFIG["hidden_size"]
    begin, end = TINY_V1_MULTIPLIER_LAYERS
    multipliers = [TINY_V1_MULTIPLIER if begin <= i < end else 1 for i in range(TINY_ADAFACE_CONFIG["num_layers"])]
    family = "ldm.modules"
    sbg = f"{family}.subj_basis_generator.SubjBasisGenerator"
    subject = classes.new(
        sbg,
        placeholder_is_bg=False,
        num_out_embs_per_layer=16,
        num_out_layers=16,
        prompt2token_proj_attention_multiplier=TINY_V1_MULTIPLIER,
        prompt2token_proj_attention_multiplier_begin=begin,
        prompt2token_proj_attention_multiplier_end=end,
        output_scale=d**-0.5,
    )
    subject.prompt2token_proj = _prompt2token_proj(classes, gen, family, multipliers, _clip_tables(gen))
    subject.obj_proj_in = _obj_proj_in(classes, gen)
    subject.pos_embs = nn.Parameter(_randn(gen, 1, 77, d, std=0.02))
    subject.pos_embs_ln = _layer_norm(gen, d)
    subject.hidden_state_layer_weights = _layer_weights(gen)

    background = classes.new(sbg, placeholder_is_bg=True, num_out_embs_per_layer=4, num_out_layers=16)
    background.bg_proj_in = nn.Sequential(_linear(gen, 1024, d, bias=False), _layer_norm(gen, d))
    background.pos_embs = nn.Parameter(_randn(gen, 1, 257, d, std=0.02))
    background.pos_embs_ln = _layer_norm(gen, d)
    background.latent_queries = nn.Parameter(_randn(gen, 1, 64, d, std=0.02))
    background.latent_queries_ln = _layer_norm(gen, d)
    translator = classes.new(f"{family}.subj_basis_generator.CrossAttention", heads=4, dim_head=d // 4)
    for name in ("to_q", "to_k", "to_v"):
        setattr(translator, name, nn.Sequential(_linear(gen, d, d, bias=False), _layer_norm(gen, d)))
    translator.to_out = nn.Identity()
    background.prompt_translator = translator

    static = f"{family}.embedding_manager.StaticLayerwiseEmbedding"
    checkpoint = {
        "string_to_token": {"z": torch.tensor(49408), "y": torch.tensor(49409)},
        "string_to_static_embedder": nn.ModuleDict(
            {
                "z": classes.new(static, num_layers=16, num_vectors_per_token=16),
                "y": classes.new(static, num_layers=16, num_vectors_per_token=4),
            }
        ),
        "string_to_subj_basis_generator_dict": nn.ModuleDict({"z": subject, "y": background}),
        "token2num_vectors": {"z": 16, "y": 4},
        "emb_global_scale_scores": nn.Parameter(torch.zeros(2)),
        "use_conv_attn_kernel_size": -1,
        "placeholder_strings": ["z", "y"],
        "subject_strings": ["z"],
        "background_strings": ["y"],
        "ca_q_bns": nn.ModuleDict({"0": nn.BatchNorm1d(8, affine=False, track_running_stats=False)}),
        "ca_outfeat_lns": nn.ModuleDict({"0": nn.LayerNorm(8, elementwise_affine=False)}),
        "do_zero_shot": True,
    }
    return [_save(checkpoint, Path(out_dir) / V1_RELATIVE_PATH)]
