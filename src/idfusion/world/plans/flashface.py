"""FlashFace's world training plan (see :mod:`idfusion.world.plans`)."""

from __future__ import annotations

from . import MethodPlan

_FLASHFACE_OPTIONS = {
    # a world face is ~28 px wide in a 64 px image: a 32 px reference crop keeps the official ratio of reference
    # tokens to the face's tokens in the image (224 px references beside 768 px images)
    "reference_size": 32,
    # the release's copy of attn1 would start every reference block at x + 2 attn1(y); halving both outputs starts
    # exactly at the base model with the references already read (pilots: no measurable identity after 100-150
    # steps with a zero-initialised output)
    "reference_attention_init": "split",
    # pilots on 500 identities: with the plain loss the references barely changed it (identity is a small part of
    # the image); face cells weighted 5x and a 4x faster reference pathway made them matter within 100 steps
    "face_loss_weight": 4.0,
    "reference_lr_scale": 4.0,
    "sampling": {"num_inference_steps": 20, "guidance_scale": 4.0},  # the world base's sampling defaults
    "validation_inference_steps": 20,
}

PLANS: dict[str, MethodPlan] = {
    # ~35 min on one (shared) core: 550 steps x 32 samples at ~10-20 samples/s, data ~2 min, measuring ~5 min
    "full": MethodPlan(
        recipe="flashface",
        identities=1500,
        images_per_identity=6,
        steps=550,
        batch=32,
        learning_rate=1e-4,
        warmup=30,
        # the base model's weights are an EMA; fine-tuning raw weights at this rate raised the held-back loss in
        # a pilot, an EMA over the last ~200 steps keeps the denoiser smooth
        ema_decay=0.995,
        recipe_options=_FLASHFACE_OPTIONS,
        checkpoint_every=100,
    ),
    "smoke": MethodPlan(
        recipe="flashface",
        identities=4,
        images_per_identity=3,
        steps=2,
        batch=2,
        learning_rate=1e-4,
        warmup=0,
        ema_decay=None,
        recipe_options={**_FLASHFACE_OPTIONS, "validation_inference_steps": 2},
        checkpoint_every=1,
        validate=False,
    ),
}
