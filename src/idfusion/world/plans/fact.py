"""FaceChain-FACT's world training plan (see :mod:`idfusion.world.plans`).

In the world, TransFace's role (the frozen face expert whose dense tokens the resampler reads) is played by the
world's conditioning recognizer (``face_encoder: world``: its last 4x4x128 feature map as 16 tokens); the judge, which
scores, is never used. The world base (SD1.5's architecture at toy width: 32-wide context, 10 cross-attention
sites) hosts the adapter unchanged: 16 face tokens of width 32 follow the 77 text tokens, and every ``attn2`` site
gets its gated self-attention adapter.
"""

from __future__ import annotations

from . import MethodPlan

_RECIPE = "fact"
# the UNet stays frozen (only the adapter and resampler train): shipped as a reference to the base
_SHARED = ("vae", "text_encoder", "tokenizer", "unet")

_FACT_OPTIONS = {
    "face_encoder": "world",
    # the release's resampler is 1024 wide for a 768-wide context; at the world's 32-wide context a 64-wide one
    # keeps the same ratio of resampler to UNet width
    "resampler": {"dim": 64, "depth": 2, "dim_head": 16, "heads": 4},
    # trained at the pipeline's default scale (0.5, the release's), so the folder samples as it trained
    "adapter_scale": 0.5,
    # pilot (20 steps at up to 6e-4): the release's zero tanh gates moved by ~1e-3 and nothing else learns until
    # they open; open gates with zero output projections start at the base model too and learn at once
    "adapter_init": "zero-output",
    "fair_weight": 0.01,  # the release's lambda ("reg001")
    "face_drop": 0.1,  # the release's face_prob
    # the evaluator gives one render and scores against others: mostly another image of the identity
    "face_shuffle": 0.75,
    # identity is a small part of a world image (a ~28 px face in 64 px); as for FlashFace, face cells weighted 5x
    "face_loss_weight": 4.0,
    # the world base's sampling defaults; its text encoder never saw the release's negative prompt or style LoRA
    "sampling": {"num_inference_steps": 20, "guidance_scale": 4.0, "negative_prompt": "", "default_lora": "off"},
    "validation_inference_steps": 20,
}

PLANS: dict[str, MethodPlan] = {
    # ~55 min on one shared core (~7 samples/s), data ~4 min (or reused), measuring ~8 min
    "full": MethodPlan(
        recipe=_RECIPE,
        shared_components=_SHARED,
        identities=1500,
        images_per_identity=6,
        # an adapter-only run is bound by samples per second: smaller batches give more updates for the same time
        steps=1300,
        batch=16,
        # the release's 5e-5 over ~300k steps; here a few thousand (pilot: 120 steps x 32 at up to 1e-3 gave a
        # faint identity signal on validation identities, +0.04 over the different identity)
        learning_rate=1e-3,
        warmup=40,
        ema_decay=None,
        recipe_options=_FACT_OPTIONS,
        checkpoint_every=100,
    ),
    "smoke": MethodPlan(
        recipe=_RECIPE,
        shared_components=_SHARED,
        identities=4,
        images_per_identity=3,
        steps=2,
        batch=2,
        learning_rate=1e-3,
        warmup=0,
        ema_decay=None,
        recipe_options={**_FACT_OPTIONS, "validation_inference_steps": 2},
        checkpoint_every=1,
        validate=False,
    ),
}
