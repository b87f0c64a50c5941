"""Tiny AdaFace checkpoints in the official pickled format (see :mod:`idfusion.methods.adaface`).

The official ``.pt`` files are ``torch.save`` dicts of whole ``nn.Module`` objects pickled under the authors' class
paths (``adaface.subj_basis_generator.SubjBasisGenerator``, ``adaface.arc2face_models.CLIPTextModelWrapper``,
``adaface.arc2face_models.CLIPAttentionMKV``; v1 under ``ldm.modules.*``) around transformers 4's CLIP modules
(``transformers.models.clip.modeling_clip.CLIPTextTransformer``, ``CLIPEncoderLayer``, ``CLIPAttention``, ...).
Those modules are not importable here (transformers 5 has no ``CLIPTextTransformer``), so the writer builds
throwaway ``nn.Module`` subclasses that only *name* those paths, and pickles them with a pickler whose
``save_global`` writes the recorded path for them; no module is registered in ``sys.modules`` and nothing global
changes. The tensors are real and seeded; everything pickled is data (no hooks, no functions).

Each v2 generator also holds, as the official ``SubjBasisGenerator`` does (``self.tokenizer =
CLIPTokenizer.from_pretrained(...)``), a transformers 4 *slow* CLIP tokenizer with its real pickled contents: a
compiled ``regex`` pattern (pickled as ``regex._regex.compile``), ``tokenizers.AddedToken`` s, a
``transformers.tokenization_utils.Trie``, the BPE tables and a reference to ``ftfy.fix_text``. transformers 5 has
no slow CLIP tokenizer, so the object is built from those real parts under the recorded class path.

Sizes: width 512 (the Arc2Face encoder that feeds AdaFace zero-pads the 512-d ArcFace vector into its width, so the
whole tiny AdaFace kit is 512 wide), 77 positions, 3 layers of 4 heads, MLP width 64. Layers 1 and 2 have widened
keys/values (multipliers ``[1, 2, 4]``), which exercises the multi-KV attention. The v2 checkpoint's two projectors
share their (frozen, CLIP-initialised) token and position tables in one storage, as the release's do.

At width 512 the two projectors' layers alone would be 34 MB, so every large weight is a view of a few shared
random pools, one per scale (:mod:`idfusion.testing.shared_storage`, with rows :data:`ROW_STRIDE` values apart):
the ``.pt`` is about 0.6 MB. Readers only compute with these tensors or copy them (the loader's
``load_state_dict(assign=True)`` keeps the views; ``torch.save`` keeps the sharing, ``convert_adaface_checkpoint``
copies each tensor out, and the AdaFace recipe trains a fresh copy).

The token table keeps CLIP's 49,408 rows: the loader reads the EOS row 49,407 for ID-CFG's padding embedding
(``idfusion.methods.adaface.EOS_TOKEN_ID``), whatever the table's size. The kit's tokenizer has the reduced
vocabulary (:mod:`idfusion.testing.tiny_clip_tokenizer`, ids below 1,000), and so does the pickled tokenizer. So
that 49,408 x 512 floats (101 MB) need not be stored, row ``i`` of the table is ``values[i : i + 512]`` of one
random vector (an overlapping ``as_strided`` view, which ``torch.save`` stores as its 50,000-value storage): every
row differs, and the loaded table has the official shape.

Three save formats of the eras the loader must tell apart (:func:`idfusion.methods.adaface._detect_version`):
the release's v2 (:func:`write_tiny_adaface_checkpoint`), the dev repo's v2 save of the release's training date,
which also wrote ``token2num_vectors`` (``save_format="dev"``), and v1 (:func:`write_tiny_adaface_v1`), whose
classes lived in ``ldm.modules`` until 2024-06-07 and in ``adaface`` after (``family``).

The ConsistentID branch's own models (``ConsistentID-v1.bin``, BiSeNet, CLIP-ViT-H-14 at toy width, buffalo_l) are
written by :func:`write_tiny_consistentid`.
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
    "BISENET_WEIGHTS_PATH",
    "BUFFALO_L_PATH",
    "CLIP_VIT_H_PATH",
    "CONSISTENTID_WEIGHTS_PATH",
    "TINY_ADAFACE_CONFIG",
    "TINY_BISENET_BASE_WIDTH",
    "TINY_CLIP_VISION",
    "TINY_PROJPLUS",
    "TINY_ARC2FACE_MULTIPLIERS",
    "TINY_CONSISTENTID_MULTIPLIERS",
    "SAVE_FORMATS",
    "TINY_OBJ_PROJ_IN_DIM",
    "V1_RELATIVE_PATH",
    "V2_RELATIVE_PATH",
    "bisenet_state_shapes",
    "export_unbatched_scrfd",
    "tiny_bisenet_state_dict",
    "tiny_projplus_state_dict",
    "write_tiny_adaface_checkpoint",
    "write_tiny_adaface_v1",
    "write_tiny_consistentid",
]

TINY_ADAFACE_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,  # token-table rows: CLIP's (see the module docstring)
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
TINY_OBJ_PROJ_IN_DIM = 1  # 384 (DINO ViT-S) in the release; the key layout is what matters (77 x 512 outputs)
TINY_NUM_SUFFIX_EMBS = 4

V2_RELATIVE_PATH = Path("models/adaface/VGGface2_HQ_masks2024-10-14T16-09-24_zero3-ada-3500.pt")
V1_RELATIVE_PATH = Path("models/adaface/subjects-celebrity2024-05-16T17-22-46_zero3-ada-30000.pt")

_PATH_ATTR = "_idfusion_pickle_path"
# Rows of the kit's 512-wide weights start this many values apart in their pool (testing.shared_storage): every
# reader of these files computes with the weights or copies them, never writes into them.
ROW_STRIDE = 7
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

    def reference(self, path: str, *, module: bool = True) -> type:
        """The class recorded as ``path``; pickled by itself it is a plain global (a function reference too)."""
        if path not in self._classes:
            module_name, _, qualname = path.rpartition(".")
            base = nn.Module if module else object
            cls = type(qualname, (base,), {"__module__": module_name, "__qualname__": qualname})
            setattr(cls, _PATH_ATTR, (module_name, qualname))
            self._classes[path] = cls
        return self._classes[path]

    def new(self, path: str, *, module: bool = True, **attrs: Any) -> Any:
        """An instance of the class recorded as ``path`` (an ``nn.Module`` unless ``module`` is false)."""
        obj = self.reference(path, module=module)()
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
    # _weight skips the random initialisation (slow for 49,408 rows even on the meta device) and keeps the view.
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


# The pattern and flags of transformers 4's slow CLIPTokenizer (regex.IGNORECASE | regex.V0 = 8226 after compiling).
_CLIP_TOKEN_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


class _TokenizerParts:
    """The big tables of a CLIP tokenizer, built once and shared by every pickled tokenizer of one file."""

    def __init__(self) -> None:
        from ..clip_tokenizer import BOS_TOKEN, EOS_TOKEN, bytes_to_unicode
        from .tiny_clip_tokenizer import tiny_clip_vocab

        self.encoder, merges = tiny_clip_vocab()  # the kit's vocabulary, as the kit's tokenizer/ folder
        self.bos_id, self.eos_id = self.encoder[BOS_TOKEN], self.encoder[EOS_TOKEN]
        self.decoder = {index: token for token, index in self.encoder.items()}
        self.bpe_ranks = {tuple(line.split()): rank for rank, line in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}


def _slow_clip_tokenizer(classes: _Classes, parts: _TokenizerParts) -> Any:
    """A transformers 4 ``CLIPTokenizer`` (slow) as the official generators pickle it: its ``__dict__`` with the
    real compiled pattern, real ``AddedToken`` s and a ``Trie``; ``fix_text`` refers to ``ftfy.fix_text``."""
    import regex
    from tokenizers import AddedToken

    def special(content: str) -> AddedToken:
        return AddedToken(content, rstrip=False, lstrip=False, single_word=False, normalized=True, special=True)

    bos, eos = special("<|startoftext|>"), special("<|endoftext|>")
    trie = classes.new("transformers.tokenization_utils.Trie", module=False)
    trie.data = {}  # one nested dict per character, "" marking a token's end (Trie.add)
    for token in ("<|startoftext|>", "<|endoftext|>"):
        node = trie.data
        for char in token:
            node = node.setdefault(char, {})
        node[""] = 1
    trie._tokens = {"<|startoftext|>", "<|endoftext|>"}
    trie._termination_char = ""
    name = "openai/clip-vit-large-patch14"
    return classes.new(
        "transformers.models.clip.tokenization_clip.CLIPTokenizer",
        module=False,
        _added_tokens_decoder={parts.bos_id: bos, parts.eos_id: eos},
        _added_tokens_encoder={"<|startoftext|>": parts.bos_id, "<|endoftext|>": parts.eos_id},
        _additional_special_tokens=[],
        _bos_token=bos,
        _eos_token=eos,
        _unk_token=eos,
        _pad_token="<|endoftext|>",
        _pad_token_type_id=0,
        _cls_token=None,
        _sep_token=None,
        _mask_token=None,
        _decode_use_source_tokenizer=False,
        _in_target_context_manager=False,
        _processor_class=None,
        encoder=parts.encoder,
        decoder=parts.decoder,
        bpe_ranks=parts.bpe_ranks,
        byte_encoder=parts.byte_encoder,
        byte_decoder=parts.byte_decoder,
        cache={"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"},
        pat=regex.compile(_CLIP_TOKEN_PATTERN, regex.IGNORECASE),
        fix_text=classes.reference("ftfy.fix_text", module=False),
        errors="replace",
        tokens_trie=trie,
        init_inputs=(),
        init_kwargs={"errors": "replace", "unk_token": eos, "bos_token": bos, "eos_token": eos, "pad_token": eos},
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=77,
        name_or_path=name,
        padding_side="right",
        truncation_side="right",
        clean_up_tokenization_spaces=True,
        split_special_tokens=False,
        chat_template=None,
        deprecation_warnings={},
        total_vocab_size=len(parts.encoder),
        verbose=False,
    )


def _prompt2token_proj(
    classes: _Classes,
    gen: torch.Generator,
    family: str,
    multipliers: Sequence[int],
    tables: tuple[torch.Tensor, torch.Tensor],
    *,
    persistent_position_ids: bool,
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
    # (1, 77): transformers < 4.31 saved it; later versions keep it out of state dicts (the release's strict
    # load_state_dict of its v2 generators requires that)
    positions = torch.arange(cfg["max_position_embeddings"]).unsqueeze(0)
    embeddings.register_buffer("position_ids", positions, persistent=persistent_position_ids)
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
    rows, width = cfg["vocab_size"], cfg["hidden_size"]
    # Row i = values[i : i + width] (see the module docstring): 200 KB stored instead of 101 MB.
    tokens = _randn(gen, rows + width - 1, std=0.02).as_strided((rows, width), (1, 1))
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
    parts: _TokenizerParts,
    *,
    suffix_embs: bool,
) -> nn.Module:
    d = TINY_ADAFACE_CONFIG["hidden_size"]
    generator = classes.new(
        "adaface.subj_basis_generator.SubjBasisGenerator",
        N_ID=num_id_tokens,
        N_SFX=TINY_NUM_SUFFIX_EMBS if suffix_embs else 0,
        placeholder_is_bg=False,
        num_out_embs=num_id_tokens,
        num_nonface_in_id_vecs=77,
        num_ca_layers=16,
        bg_prompt_translator_has_to_out_proj=False,
        prompt2token_proj_attention_multipliers=list(multipliers),
        output_scale=d**-0.5,
        output_dim=d,
        dtype=torch.float32,
        max_prompt_length=77,
        tokenizer=_slow_clip_tokenizer(classes, parts),
        pad_embeddings=_randn(gen, 77, d, std=0.02),  # a plain tensor attribute, not a parameter
        pos_embs=None,  # a subject generator's pos_embs is None from 2024-07-19 on
        pos_embs_ln=None,
        bg_proj_in=None,
    )
    generator.prompt2token_proj = _prompt2token_proj(
        classes, gen, "adaface", multipliers, tables, persistent_position_ids=False
    )
    generator.prompt2token_proj_grad_scaler = classes.new("adaface.util.GradientScaler", scale=1.0)
    generator.obj_proj_in = _obj_proj_in(classes, gen)
    generator.layerwise_proj = nn.Identity()
    generator.hidden_state_layer_weights = _layer_weights(gen)
    if suffix_embs:
        generator.static_img_suffix_embs = nn.Parameter(_randn(gen, 1, TINY_NUM_SUFFIX_EMBS, d, std=0.02))
    return generator


def _pool_weights(checkpoint: dict[str, Any], seed: int) -> None:
    """Make the large weights of every module in ``checkpoint`` slices of shared random pools
    (:mod:`idfusion.testing.shared_storage`), in place: the two projectors' 512-wide layers would otherwise take
    34 MB. Tensors that share memory (the projectors' common tables) stay shared."""
    from .shared_storage import pooled_tensors

    modules: list[nn.Module] = []
    for value in checkpoint.values():
        if isinstance(value, nn.Module):
            modules += [m for m in value.modules() if all(m is not seen for seen in modules)]
    tensors: dict[str, torch.Tensor] = {}
    places: dict[str, list[tuple[nn.Module, str, bool]]] = {}  # key -> (module, attribute, is_parameter)
    for module in modules:
        entries = [(name, p, True) for name, p in module._parameters.items() if p is not None]
        entries += [(name, v, False) for name, v in vars(module).items() if type(v) is torch.Tensor]  # pad_embeddings
        for name, value, is_parameter in entries:
            key = f"{value.data_ptr()}:{tuple(value.shape)}:{tuple(value.stride())}"
            tensors.setdefault(key, value.detach())
            places.setdefault(key, []).append((module, name, is_parameter))
    pooled = pooled_tensors(tensors, seed, row_stride=ROW_STRIDE)
    for key, targets in places.items():
        if pooled[key] is tensors[key]:
            continue
        for module, name, is_parameter in targets:
            if is_parameter:
                module._parameters[name] = nn.Parameter(
                    pooled[key], requires_grad=module._parameters[name].requires_grad
                )
            else:
                setattr(module, name, pooled[key])


def _save(obj: Any, path: Path, seed: int) -> Path:
    _pool_weights(obj, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, pickle_module=_PICKLE_MODULE)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------------------


def _v2_background_generator(classes: _Classes, gen: torch.Generator) -> nn.Module:
    """The dev repo's v2 background generator ``'y'`` (4 tokens from joint CLIP features); unused by inference."""
    d = TINY_ADAFACE_CONFIG["hidden_size"]
    background = classes.new(
        "adaface.subj_basis_generator.SubjBasisGenerator",
        N_ID=4,
        N_SFX=0,
        placeholder_is_bg=True,
        num_out_embs=4,
        num_nonface_in_id_vecs=257,
        output_scale=d**-0.5,
        dtype=torch.float32,
    )
    background.bg_proj_in = nn.Sequential(_linear(gen, 8, d, bias=False), _layer_norm(gen, d))
    background.pos_embs = nn.Parameter(torch.zeros(1, 257, d))
    background.pos_embs_ln = _layer_norm(gen, d)
    background.latent_queries = nn.Parameter(_randn(gen, 1, 4, d, std=0.02))
    background.latent_queries_ln = _layer_norm(gen, d)
    translator = classes.new("adaface.subj_basis_generator.CrossAttention", num_heads=4)
    for name in ("to_q", "to_k", "to_v"):
        setattr(translator, name, nn.Sequential(_linear(gen, d, d, bias=False), _layer_norm(gen, d)))
    translator.to_out = nn.Identity()
    background.prompt_translator = translator
    return background


SAVE_FORMATS = ("release", "dev", "dev-arc2face")


def write_tiny_adaface_checkpoint(
    out_dir: Path, seed: int, *, save_format: str = "release", consistentid: bool = True
) -> list[Path]:
    """Write a tiny v2 checkpoint at ``out_dir/models/adaface/VGGface2_HQ_masks2024-10-14T16-09-24_zero3-ada-3500.pt``.

    ``save_format``:

    - ``"release"`` (adaface-neurips HEAD's ``EmbeddingManager.save``): top-level keys
      ``string_to_subj_basis_generator_dict`` (a ``ModuleDict`` ``{'z': ModuleList([ConsistentID, Arc2Face])}``),
      ``placeholder_strings`` and ``subject_strings``;
    - ``"dev"`` (the dev repo's save at the release's training date, commit eb1cf8e6 of 2024-10-14): also
      ``token2num_vectors`` ``{'z': 20, 'y': 4}``, ``background_strings`` ``['y']``, ``ca_q_bns``,
      ``ca_outfeat_lns``, and a background generator ``'y'``;
    - ``"dev-arc2face"``: the dev save of an Arc2Face-only v2 encoder, ``{'z': generator, 'y': background}``.

    The Arc2Face generator has multipliers ``[1, 2, 4]``, 16 ID tokens and ``static_img_suffix_embs``; the
    ConsistentID one ``[1, 1, 2]`` and 4 ID tokens. Both have the unused ``obj_proj_in``, a non-persistent
    ``position_ids`` buffer (transformers >= 4.31) and a pickled slow CLIP tokenizer.

    Args:
        out_dir (`Path`): an existing folder.
        seed (`int`): the same seed writes the same weights.
        save_format (`str`, *optional*, defaults to ``"release"``): one of :data:`SAVE_FORMATS`.
        consistentid (`bool`, *optional*, defaults to `True`): also write the ConsistentID branch's models
            (:func:`write_tiny_consistentid`) when the checkpoint has that branch, so ``make-tiny --method adaface``
            writes the whole v2 kit.

    Returns:
        `list[Path]`: the files written.
    """
    if save_format not in SAVE_FORMATS:
        raise ValueError(f"save_format must be one of {SAVE_FORMATS}, got {save_format!r}")
    gen = torch.Generator().manual_seed(seed)
    classes = _Classes()
    parts = _TokenizerParts()
    tables = _clip_tables(gen)  # the frozen openai CLIP-L tables, the same in both projectors
    consistentid = _v2_generator(classes, gen, 4, TINY_CONSISTENTID_MULTIPLIERS, tables, parts, suffix_embs=False)
    arc2face = _v2_generator(classes, gen, 16, TINY_ARC2FACE_MULTIPLIERS, tables, parts, suffix_embs=True)
    subject = arc2face if save_format == "dev-arc2face" else nn.ModuleList([consistentid, arc2face])
    generators = {"z": subject}
    checkpoint: dict[str, Any] = {"placeholder_strings": ["z"], "subject_strings": ["z"]}
    if save_format != "release":
        generators["y"] = _v2_background_generator(classes, gen)
        checkpoint |= {
            "token2num_vectors": {"z": 16 if save_format == "dev-arc2face" else 20, "y": 4},
            "placeholder_strings": ["z", "y"],
            "background_strings": ["y"],
            "ca_q_bns": nn.ModuleDict({"0": nn.BatchNorm1d(8, affine=False, track_running_stats=False)}),
            "ca_outfeat_lns": nn.ModuleDict({"0": nn.LayerNorm(8, elementwise_affine=False)}),
        }
    checkpoint["string_to_subj_basis_generator_dict"] = nn.ModuleDict(generators)
    written = [_save(checkpoint, Path(out_dir) / V2_RELATIVE_PATH, seed)]
    if consistentid and save_format != "dev-arc2face":
        written += write_tiny_consistentid(Path(out_dir), seed)
    return written


def write_tiny_adaface_v1(
    out_dir: Path, seed: int, *, family: str = "ldm.modules", stripped: bool = False
) -> list[Path]:
    """Write a tiny v1 (paper-era) checkpoint at ``out_dir/models/adaface/subjects-celebrity2024-05-16T17-22-46_zero3-ada-30000.pt``.

    Classes are pickled under ``family`` (``ldm.modules`` as in May 2024; ``adaface`` for files trained between the
    move of 2024-06-07 and the v2 template of 2024-08-30). ``stripped`` keeps only
    ``string_to_subj_basis_generator_dict`` (``{'z': subject}``), as the dev repo's
    ``extract_subj_basis_generator.py`` does. Otherwise top-level keys as the 2024 ``EmbeddingManager.save``:
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
    subject.prompt2token_proj = _prompt2token_proj(
        classes, gen, family, multipliers, _clip_tables(gen), persistent_position_ids=True
    )
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

    static = "ldm.modules.embedding_manager.StaticLayerwiseEmbedding"  # the embedding manager never left ldm
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
    if stripped:
        checkpoint = {"string_to_subj_basis_generator_dict": nn.ModuleDict({"z": subject})}
    return [_save(checkpoint, Path(out_dir) / V1_RELATIVE_PATH, seed)]


# ----------------------------------------------------------------------------------------------------------------------
# The ConsistentID branch's models (see idfusion.methods.adaface_consistentid)
# ----------------------------------------------------------------------------------------------------------------------

CONSISTENTID_WEIGHTS_PATH = Path("ConsistentID/models/ConsistentID-v1.bin")
BISENET_WEIGHTS_PATH = Path("ConsistentID/models/BiSeNet_pretrained_for_ConsistentID.pth")
BUFFALO_L_PATH = Path("models/insightface/models/buffalo_l")
CLIP_VIT_H_PATH = Path("models/laion/CLIP-ViT-H-14-laion2B-s32B-b79K")  # a local stand-in for the Hub repo
# ProjPlusModel at toy size: the token width and the ArcFace width are the kit's (512); the MLP's hidden width
# (1024 in the release), the perceiver's depth (4), attention width (768 = 12 heads of 64) and feed-forward width
# (3072) are shrunk. Heads stay 64 wide, as the loader assumes.
TINY_PROJPLUS: dict[str, int] = {
    "cross_attention_dim": 512,
    "id_embeddings_dim": 512,
    "id_hidden_dim": 32,
    "clip_embeddings_dim": 32,
    "num_tokens": 4,
    "depth": 1,
    "head_dim": 64,
    "num_heads": 1,
    "ff_inner_dim": 64,
}
TINY_BISENET_BASE_WIDTH = 4  # the release's 64; every BiSeNet width scales with it
# CLIP-ViT-H-14 at toy width: 224 pixels in 14x14 patches (257 tokens) as the real one, GELU, 2 layers.
TINY_CLIP_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 16,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}


def tiny_projplus_state_dict(gen: torch.Generator, config: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Random ``ConsistentID-v1.bin["image_proj"]`` tensors, named and shaped as the original ``ProjPlusModel``'s."""
    c = dict(TINY_PROJPLUS if config is None else config)
    d, inner = c["cross_attention_dim"], c["head_dim"] * c["num_heads"]
    out: dict[str, torch.Tensor] = {}

    def linear(name: str, d_in: int, d_out: int, bias: bool = True) -> None:
        out[f"{name}.weight"] = _randn(gen, d_out, d_in, std=d_in**-0.5)
        if bias:
            out[f"{name}.bias"] = _randn(gen, d_out, std=0.02)

    def norm(name: str, dim: int) -> None:
        out[f"{name}.weight"] = _randn(gen, dim, std=0.1, mean=1.0)
        out[f"{name}.bias"] = _randn(gen, dim, std=0.02)

    linear("proj.0", c["id_embeddings_dim"], c["id_hidden_dim"])
    linear("proj.2", c["id_hidden_dim"], d * c["num_tokens"])
    norm("norm", d)
    linear("perceiver_resampler.proj_in", c["clip_embeddings_dim"], d)
    linear("perceiver_resampler.proj_out", d, d)
    norm("perceiver_resampler.norm_out", d)
    for i in range(c["depth"]):
        p = f"perceiver_resampler.layers.{i}"
        norm(f"{p}.0.norm1", d)
        norm(f"{p}.0.norm2", d)
        linear(f"{p}.0.to_q", d, inner, bias=False)
        linear(f"{p}.0.to_kv", d, 2 * inner, bias=False)
        linear(f"{p}.0.to_out", inner, d, bias=False)
        norm(f"{p}.1.0", d)
        linear(f"{p}.1.1", d, c["ff_inner_dim"], bias=False)
        linear(f"{p}.1.3", c["ff_inner_dim"], d, bias=False)
    return out


def bisenet_state_shapes(base_width: int = 64, num_classes: int = 19) -> dict[str, tuple[int, ...]]:
    """The face-parsing BiSeNet's state-dict keys and shapes, in the original's order (``base_width`` 64 is the
    release's ``BiSeNet(n_classes=19)``)."""
    b = base_width
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, c_out: int, c_in: int, k: int) -> None:
        shapes[f"{name}.weight"] = (c_out, c_in, k, k)

    def bn(name: str, c: int) -> None:
        for part in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{part}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    def conv_bn(name: str, c_out: int, c_in: int, k: int) -> None:
        conv(f"{name}.conv", c_out, c_in, k)
        bn(f"{name}.bn", c_out)

    conv("cp.resnet.conv1", b, 3, 7)
    bn("cp.resnet.bn1", b)
    previous = b
    for index, (width, stride) in enumerate(zip((b, 2 * b, 4 * b, 8 * b), (1, 2, 2, 2), strict=True), start=1):
        for block in (0, 1):
            p = f"cp.resnet.layer{index}.{block}"
            c_in = previous if block == 0 else width
            conv(f"{p}.conv1", width, c_in, 3)
            bn(f"{p}.bn1", width)
            conv(f"{p}.conv2", width, width, 3)
            bn(f"{p}.bn2", width)
            if block == 0 and (c_in != width or stride != 1):
                conv(f"{p}.downsample.0", width, c_in, 1)
                bn(f"{p}.downsample.1", width)
        previous = width
    for name, c_in in (("cp.arm16", 4 * b), ("cp.arm32", 8 * b)):
        conv_bn(f"{name}.conv", 2 * b, c_in, 3)
        conv(f"{name}.conv_atten", 2 * b, 2 * b, 1)
        bn(f"{name}.bn_atten", 2 * b)
    conv_bn("cp.conv_head32", 2 * b, 2 * b, 3)
    conv_bn("cp.conv_head16", 2 * b, 2 * b, 3)
    conv_bn("cp.conv_avg", 2 * b, 8 * b, 1)
    conv_bn("ffm.convblk", 4 * b, 4 * b, 1)
    conv("ffm.conv1", b, 4 * b, 1)
    conv("ffm.conv2", 4 * b, b, 1)
    conv_bn("conv_out.conv", 4 * b, 4 * b, 3)
    conv("conv_out.conv_out", num_classes, 4 * b, 1)
    for name in ("conv_out16", "conv_out32"):
        conv_bn(f"{name}.conv", b, 2 * b, 3)
        conv(f"{name}.conv_out", num_classes, b, 1)
    return shapes


def tiny_bisenet_state_dict(
    gen: torch.Generator, base_width: int = TINY_BISENET_BASE_WIDTH
) -> dict[str, torch.Tensor]:
    """Random BiSeNet weights with plausible BatchNorm statistics (positive variances)."""
    out: dict[str, torch.Tensor] = {}
    for key, shape in bisenet_state_shapes(base_width).items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith(("bn.weight", "bn1.weight", "bn2.weight", "bn_atten.weight", "downsample.1.weight")):
            out[key] = _randn(gen, *shape, std=0.1, mean=1.0)
        elif len(shape) == 4:
            out[key] = _randn(gen, *shape, std=(shape[1] * shape[2] * shape[3]) ** -0.5)
        else:
            out[key] = _randn(gen, *shape, std=0.05)
    return out


def _write_tiny_clip_vit_h(folder: Path, seed: int) -> list[Path]:
    """A whole ``CLIPModel`` snapshot (``config.json`` + ``model.safetensors``, transformers 4 key names) whose vision
    tower is :data:`TINY_CLIP_VISION`; the text tower is a stub (1 layer, 16 wide, 1,000 tokens)."""
    from transformers import CLIPConfig, CLIPModel

    from ..sd15 import official_state_dict

    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text |= {"vocab_size": 1000, "projection_dim": 16, "hidden_act": "gelu"}
    text |= {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    config = CLIPConfig(text_config=text, vision_config=TINY_CLIP_VISION, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
        with torch.no_grad():  # LayerNorms away from (1, 0), so the test sees them
            for name, param in model.named_parameters():
                if "layer_norm" in name or "layrnorm" in name:
                    param.add_(torch.randn_like(param) * 0.1)
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in official_state_dict(model).items() if not k.endswith("position_ids")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return [folder / "config.json", folder / "model.safetensors"]


# buffalo_l's det_10g.onnx has unbatched outputs (N, C) under these names (insightface 0.7's detector needs that).
BUFFALO_L_DETECTOR_OUTPUTS = ("448", "471", "494", "451", "474", "497", "454", "477", "500")


class _UnbatchedDetector(nn.Module):
    """A tiny SCRFD (:class:`idfusion.testing.onnx_faces.TinySCRFD`) with ``det_10g.onnx``'s ``(N, C)`` outputs."""

    def __init__(self, seed: int):
        super().__init__()
        from .onnx_faces import TinySCRFD

        self.scrfd = TinySCRFD(seed)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(out[0] for out in self.scrfd(x))  # (1, N, C) -> (N, C)


def export_unbatched_scrfd(path: Path, *, seed: int = 0) -> Path:
    """Export the tiny SCRFD with ``det_10g.onnx``'s signature: input ``input.1`` ``(1, 3, H, W)``, nine ``(N, C)``
    outputs (scores, boxes, keypoints per stride 8, 16, 32)."""
    from .onnx_export import export_onnx

    dim = torch.export.Dim.DYNAMIC
    outputs = list(BUFFALO_L_DETECTOR_OUTPUTS)
    return export_onnx(
        _UnbatchedDetector(seed), torch.zeros(1, 3, 128, 160), path, "input.1", outputs, {2: dim, 3: dim}
    )


def write_tiny_consistentid(out_dir: Path, seed: int) -> list[Path]:
    """Write the ConsistentID branch's models at toy size, in the release's layout under ``out_dir``:

    - ``ConsistentID/models/ConsistentID-v1.bin``: a ``torch.save`` dict ``{"image_proj": ..., "FacialEncoder":
      ..., "adapter_modules": ...}`` of state dicts (only ``image_proj`` is used by AdaFace; the others are stubs);
    - ``ConsistentID/models/BiSeNet_pretrained_for_ConsistentID.pth``: a BiSeNet state dict, widths / 16;
    - ``models/insightface/models/buffalo_l/{det_10g,w600k_r50}.onnx``: SCRFD (unbatched outputs, as
      ``det_10g.onnx``) and ArcFace signatures (:mod:`idfusion.testing.onnx_faces`);
    - ``models/laion/CLIP-ViT-H-14-laion2B-s32B-b79K/``: :data:`TINY_CLIP_VISION` in a ``CLIPModel`` snapshot.

    About 2.5 MB in all (the 512-wide ``image_proj`` most of it).
    """
    from .onnx_export import export_onnx
    from .onnx_faces import TinyArcFace

    out_dir = Path(out_dir)
    gen = torch.Generator().manual_seed(seed + 1000)
    consistentid = {
        "image_proj": tiny_projplus_state_dict(gen),
        "FacialEncoder": {"proj_in.weight": _randn(gen, 8, 8), "proj_out.weight": _randn(gen, 8, 8)},
        "adapter_modules": {"1.to_k_ip.weight": _randn(gen, 8, 8), "1.to_v_ip.weight": _randn(gen, 8, 8)},
    }
    written = [out_dir / CONSISTENTID_WEIGHTS_PATH, out_dir / BISENET_WEIGHTS_PATH]
    written[0].parent.mkdir(parents=True, exist_ok=True)
    # Not pooled (testing.shared_storage): these files' tensors are plain, so they convert to safetensors as they are.
    torch.save(consistentid, written[0])
    torch.save(tiny_bisenet_state_dict(gen), written[1])
    faces = out_dir / BUFFALO_L_PATH
    written.append(export_unbatched_scrfd(faces / "det_10g.onnx", seed=seed + 1))
    recognizer = TinyArcFace(seed + 2)  # w600k_r50 takes (x - 127.5) / 127.5 input: no normalisation in the graph
    dynamic = {0: torch.export.Dim.DYNAMIC}
    written.append(
        export_onnx(recognizer, torch.zeros(2, 3, 112, 112), faces / "w600k_r50.onnx", "input.1", ["683"], dynamic)
    )
    written += _write_tiny_clip_vit_h(out_dir / CLIP_VIT_H_PATH, seed + 3)
    return written
