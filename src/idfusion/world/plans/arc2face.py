"""Arc2Face's world training plan (see :mod:`idfusion.world.plans`).

The world base's text encoder is 32 wide, but Arc2Face zero-pads the 512-d identity embedding (the world
recognizer's, as the release's is ArcFace's) into the ID encoder's token width. So the world Arc2Face keeps the
method's structure (identity at the ``id`` token of ``"photo of a id person"``, a CLIP text transformer as the ID
encoder, its output as the UNet's cross-attention context, empty-prompt dropout) with a new, 512-wide, one-layer ID
encoder on the template's ~530-token vocabulary, and the world UNet's cross-attention key/value projections rebuilt
for 512 inputs; every other UNet weight starts from the world base. Like the release, it ignores captions.
"""

from __future__ import annotations

from . import MethodPlan

_RECIPE = "arc2face"

_ARC2FACE_OPTIONS = {
    "recognizer": "world",  # what the world pipelines condition on (never the judge)
    # CLIP-L's encoder is 12 layers of 768; one 512-wide layer keeps the shipped encoder ~10 MB, and its causal
    # attention already carries the id token to every later position
    "id_encoder": {
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_hidden_layers": 1,
        "num_attention_heads": 8,
        "projection_dim": 512,
    },
    "template_vocabulary": True,
    # the new encoder and projections start random beside a pretrained denoiser (FlashFace's plan: its new
    # reference pathway needed a faster rate to matter within 100 steps)
    "encoder_lr_scale": 4.0,
    # identity is a small part of a 64 px world image (FlashFace's plan weights the face 5x for the same reason)
    "face_loss_weight": 4.0,
    "id_dropout": 0.1,
    "validation_inference_steps": 20,
}

PLANS: dict[str, MethodPlan] = {
    # measured on one core shared with ~6 other jobs: data 3 min, training 24 min, measuring 4.5 min. A first run
    # at 450 steps and 1e-4 fell short (SimTarget 0.079 vs 0.043 for a different identity); 560 steps at 2e-4 passed
    "full": MethodPlan(
        recipe=_RECIPE,
        identities=1000,
        images_per_identity=5,
        steps=560,
        batch=32,
        learning_rate=2e-4,
        warmup=30,
        ema_decay=0.995,  # as FlashFace's plan: the base's weights are an EMA
        recipe_options=_ARC2FACE_OPTIONS,
        checkpoint_every=50,
    ),
    "smoke": MethodPlan(
        recipe=_RECIPE,
        identities=4,
        images_per_identity=3,
        steps=2,
        batch=2,
        learning_rate=1e-4,
        warmup=0,
        ema_decay=None,
        recipe_options={**_ARC2FACE_OPTIONS, "validation_inference_steps": 2},
        checkpoint_every=1,
        validate=False,
    ),
}
