"""The recipe interface: what one training method supplies to the shared loop in :mod:`idfusion.training.core`.

A recipe says what to build, what one batch's loss is, what to show at validation and how to save the result; the
core owns everything else (accelerate, optimiser, schedule, accumulation, clipping, EMA, checkpoints, logs).

Recipes are addressed by name through :data:`RECIPES`, a plain dict of ``"name": "module:Class"`` strings imported
on first use, so the registry costs nothing at import and a method's ``MethodSpec`` can point at a recipe by name.
A ``"module:Class"`` string also works directly as a name, for recipes outside this package.

A new recipe, in ``idfusion/training/recipes/<method>.py`` plus one :data:`RECIPES` entry::

    @dataclass
    class MyMethodConfig(RecipeConfig):  # the YAML's `recipe:` section; every field has a default
        name: str = "my-method"
        pretrained: Path | None = setting(None, check=existing_folder)
        id_dropout: float = setting(0.1, check=between(0, 1))


    class MyMethodRecipe(Recipe):
        name = "my-method"
        config_class = MyMethodConfig

        def build(self):  # load/build everything; frozen models to self.accelerator.device
            self.adapter = ...
            return {"adapter": self.adapter}  # the trainable ones; the core prepares them

        def loss(self, batch):  # draw noise from the samples' seeds (batch["seeds"]), not the global RNG
            return F.mse_loss(self.models["adapter"](...), target)

        def save(self, output_dir):
            adapter = self.export("adapter")  # collective under FSDP/DeepSpeed
            if self.accelerator.is_main_process:
                adapter.save_pretrained(output_dir)

Override ``build_dataset`` (records with references, masks, ...), ``collator``, ``validate`` and ``default_config``
as needed. Randomness drawn from ``data.sample_seed(seed, stream)`` keeps resume exact and DDP equal to one process.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import IdfusionError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from PIL import Image

    from .config import RunConfig

__all__ = ["RECIPES", "Recipe", "RecipeConfig", "UnknownRecipeError", "load_recipe"]

# recipe name -> "module:Class"; imported lazily by load_recipe
RECIPES: dict[str, str] = {
    "text-to-image": "idfusion.training.recipes.text_to_image:TextToImageRecipe",
    "flashface": "idfusion.training.recipes.flashface:FlashFaceRecipe",
    "adaface": "idfusion.training.recipes.adaface:AdaFaceRecipe",
    "adaface-distill": "idfusion.training.recipes.adaface:AdaFaceDistillRecipe",
    "adaface-composition": "idfusion.training.recipes.adaface:AdaFaceCompositionRecipe",
    "style-lora": "idfusion.training.recipes.style_lora:StyleLoraRecipe",
    "arc2face": "idfusion.training.recipes.arc2face:Arc2FaceRecipe",
    "fact": "idfusion.training.recipes.fact:FactRecipe",
    "open-flashface": "idfusion.training.recipes.open_flashface:OpenFlashFaceRecipe",
    "feedface": "idfusion.training.recipes.feedface:FeedFaceRecipe",
    "feedface-sd15": "idfusion.training.recipes.feedface:FeedFaceSD15Recipe",
}


class UnknownRecipeError(IdfusionError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def load_recipe(name: str) -> type[Recipe]:
    """The recipe class registered as ``name``, or named by a ``"module:Class"`` string."""
    target = RECIPES.get(name, name if ":" in name else None)
    if target is None:
        raise UnknownRecipeError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise UnknownRecipeError(f"recipe {name!r}: cannot import {target} ({error})") from None
    if not (isinstance(cls, type) and issubclass(cls, Recipe)):
        raise UnknownRecipeError(f"recipe {name!r}: {target} is not a Recipe subclass")
    return cls


@dataclass
class RecipeConfig:
    """Base of a recipe's ``recipe:`` section; subclasses add their fields (all with defaults or required)."""

    name: str = ""


class Recipe:
    """One training method. Subclass it, set ``name`` and ``config_class``, implement ``build``, ``loss`` and ``save``.

    The core calls, in order: ``build_dataset()``, ``build()``, ``parameters()``, ``collator()``, then (after
    ``accelerator.prepare``) sets :attr:`models`; then ``loss`` per micro-batch, ``validate()`` every few steps and ``save()`` at the end.

    Attributes:
        config (`RunConfig`): the whole run config; ``config.recipe`` is this recipe's section (:attr:`options`).
        accelerator (`accelerate.Accelerator`): the run's accelerator (device, mixed precision, process index).
        models (`dict[str, torch.nn.Module]`): the trainable models returned by ``build()``, as prepared by
            accelerate (wrapped for DDP/FSDP); ``unwrap(name)`` gives the bare model.
        dataset: the dataset returned by ``build_dataset()``.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = RecipeConfig

    def __init__(self, config: RunConfig, accelerator: Accelerator):
        self.config = config
        self.options = config.recipe
        self.accelerator = accelerator
        self.models: dict[str, torch.nn.Module] = {}
        self.dataset: Any = None

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        """Defaults for the shared sections that suit this recipe (``{"train": {"learning_rate": ...}}``); the YAML
        file and ``--set`` override them."""
        return {}

    @classmethod
    def needs_data_train(cls, options: Any) -> bool:
        """Whether a run needs ``data.train`` records; a recipe whose section (``options``) names its own input, such
        as a folder of images, returns False when it does."""
        return True

    # -- what the core calls -------------------------------------------------------------------------------------

    def build_dataset(self) -> Any:
        """A map-style dataset indexed by ``(index, seed)``; default: images and captions from ``config.data``."""
        from .data import ImageCaptionDataset, read_records

        data = self.config.data
        records = read_records(data.train, check_files=data.check_files)
        return ImageCaptionDataset(
            records, data.resolution, center_crop=data.center_crop, random_flip=data.random_flip
        )

    def build(self) -> dict[str, torch.nn.Module]:
        """Build or load every model; return the trainable ones (frozen ones stay attributes, moved to the device)."""
        raise NotImplementedError(f"{type(self).__name__}.build: return the trainable models by name")

    def parameters(self, models: dict[str, torch.nn.Module]) -> list[torch.nn.Parameter] | list[dict[str, Any]]:
        """What the optimiser updates: default every parameter that requires grad; return param groups to vary lr."""
        return [p for model in models.values() for p in model.parameters() if p.requires_grad]

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """The function that turns a list of dataset items into one batch; default torch's ``default_collate``.

        It runs in DataLoader worker processes, so return something small that pickles (a module-level function or a
        ``functools.partial`` of one), never a bound method of the recipe (that would pickle its models).
        """
        from torch.utils.data import default_collate

        return default_collate

    def loss(self, batch: dict[str, Any]) -> torch.Tensor | dict[str, torch.Tensor]:
        """The loss of one micro-batch (a scalar), or a dict with ``"loss"`` plus other scalars to log."""
        raise NotImplementedError(f"{type(self).__name__}.loss: return the batch's scalar loss")

    def validate(self) -> list[Image.Image]:
        """Images that show progress; called on the main process only, under ``torch.no_grad()``, in eval mode,
        with the EMA weights when EMA is on. Default: none."""
        return []

    def save(self, output_dir: Path) -> None:
        """Write the trained model in its inference format into ``output_dir`` (an empty folder).

        Called on every process (gathering sharded weights is collective; see :meth:`export`); write files only where
        ``self.accelerator.is_main_process``. With EMA on, the EMA weights are in place.
        """
        raise NotImplementedError(f"{type(self).__name__}.save: write the inference-format model")

    # -- helpers ---------------------------------------------------------------------------------------------------

    def unwrap(self, name: str) -> torch.nn.Module:
        """The bare model behind ``models[name]`` (without DDP/compile wrappers)."""
        return self.accelerator.unwrap_model(self.models[name])

    def export(self, name: str) -> torch.nn.Module | None:
        """``models[name]`` with its full weights, for saving; None on processes other than the main one.

        Under FSDP or DeepSpeed the weights are sharded: they are gathered with ``accelerator.get_state_dict`` (a
        collective, so every process must call this) into a fresh copy built from the model's config.
        """
        from accelerate.utils import DistributedType

        model = self.models[name]
        if self.accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return self.unwrap(name) if self.accelerator.is_main_process else None
        state = self.accelerator.get_state_dict(model)
        if not self.accelerator.is_main_process:
            return None
        fresh = self.fresh_model(name)
        fresh.load_state_dict(state)
        return fresh

    def fresh_model(self, name: str) -> torch.nn.Module:
        """A new, unsharded model with the architecture of ``models[name]`` (for :meth:`export` under FSDP/DeepSpeed);
        default: built from its ``config`` (diffusers and transformers models). Override it for other modules."""
        bare = self.unwrap(name)
        build = getattr(type(bare), "from_config", None)  # diffusers; transformers models take the config
        return build(bare.config) if build is not None else type(bare)(bare.config)
