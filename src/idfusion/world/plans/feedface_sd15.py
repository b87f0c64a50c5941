"""FeedFace-SD1.5's world training plan (see :mod:`idfusion.world.plans`).

The world has no CLIP, so the face encoder's tower (CLIP ViT-B/32's architecture at toy width, on the pipeline's
own 224 px face crops) is first fitted to the world *conditioning* recognizer (``world``; never the judge) on the
training faces, then frozen, as the release freezes CLIP: the adapter reads identity features the way the release
reads CLIP's. The rest is the release's recipe (masked face loss + preservation against the adapter-off model).
"""

from __future__ import annotations

from . import MethodPlan

# only the adapter trains: the UNet ships as a reference to the base, like the VAE and text encoder
_SHARED = ("vae", "text_encoder", "tokenizer", "unet")

_FEEDFACE_OPTIONS = {
    # CLIP ViT-B/32's layout (224 px, 32 px patches: 50 tokens) at width 128, 4 layers: 1.3 M weights. A pilot fit
    # to the world recognizer on 1,500 identities: after 200 steps, held-out identities' tokens score 0.71 cosine
    # between photos of one person and 0.04 between people
    "face_encoder_config": {
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
    },
    "face_encoder_teacher": "world",
    "teacher_steps": 200,
    "teacher_batch_size": 128,
    # other renders of the identity, not the target itself (the release's crop of the target teaches pasting its
    # pose and expression; the evaluator gives one ordinary photo and scores other photos of the person)
    "reference_source": "others",
    "validation_inference_steps": 20,
}

PLANS: dict[str, MethodPlan] = {
    "full": MethodPlan(
        recipe="feedface-sd15",
        shared_components=_SHARED,
        identities=1500,
        images_per_identity=6,
        steps=200,
        batch=32,
        learning_rate=1e-3,
        warmup=15,
        ema_decay=0.98,
        recipe_options=_FEEDFACE_OPTIONS,
        checkpoint_every=50,
    ),
    "smoke": MethodPlan(
        recipe="feedface-sd15",
        shared_components=_SHARED,
        identities=4,
        images_per_identity=3,
        steps=2,
        batch=2,
        learning_rate=1e-3,
        warmup=0,
        ema_decay=None,
        recipe_options={
            **_FEEDFACE_OPTIONS,
            "teacher_steps": 2,
            "teacher_batch_size": 4,
            "validation_inference_steps": 2,
        },
        checkpoint_every=1,
        validate=False,
    ),
}
