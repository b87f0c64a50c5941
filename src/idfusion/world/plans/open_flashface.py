"""Open FlashFace's world training plan (see :mod:`idfusion.world.plans`)."""

from __future__ import annotations

from . import MethodPlan

RECIPE = "open-flashface"

_OPEN_FLASHFACE_OPTIONS = {
    # a world face is ~28 px wide in a 64 px image: a 32 px aligned face crop, as the release's 256 px crops
    # beside 512 px images keep about the same ratio of reference tokens to the image's
    "reference_size": 32,
    # as the flashface world plan (its pilots): with the plain loss identity, a small part of the image, gets little
    # of the gradient; face cells weighted 5x and a 4x faster ReferenceNet make the references matter in a few
    # hundred steps
    "face_loss_weight": 4.0,
    "reference_lr_scale": 4.0,
    "sampling": {"num_inference_steps": 20, "guidance_scale": 4.0},  # the world base's sampling defaults
    "validation_inference_steps": 20,
}

PLANS: dict[str, MethodPlan] = {
    "full": MethodPlan(
        recipe=RECIPE,
        identities=1500,
        images_per_identity=6,
        steps=500,
        batch=32,
        learning_rate=1e-4,
        warmup=30,
        # the base model's weights are an EMA; as for flashface, an EMA over the last ~200 steps keeps the
        # fine-tuned denoiser smooth
        ema_decay=0.995,
        recipe_options=_OPEN_FLASHFACE_OPTIONS,
        checkpoint_every=100,
    ),
    "smoke": MethodPlan(
        recipe=RECIPE,
        identities=4,
        images_per_identity=3,
        steps=2,
        batch=2,
        learning_rate=1e-4,
        warmup=0,
        ema_decay=None,
        recipe_options={**_OPEN_FLASHFACE_OPTIONS, "validation_inference_steps": 2},
        checkpoint_every=1,
        validate=False,
    ),
}
