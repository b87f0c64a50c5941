"""FlashFace (official release): idfusion's pipeline against the official sampling control flow, same weights.

Usage:
    python benchmarks/bench_flashface_official.py [--tiny] [--steps N] [--device cpu|cuda] [--dtype float32|bfloat16]

Both sides use the same random full-size weights (or tiny ones with ``--tiny``), the release's own DDIM
(``FlashFaceDDIMScheduler``, trailing fractional times, ending at sigma 0), its VAE attention layout, the same four
reference latents, seed and the demo's defaults. The official side is ``idfusion.testing.reference_flashface``: every
step the ReferenceNet, then one main-UNet call over every guidance branch, with the reference update computed for
every term and sample, as the released code does. Printed: seconds per image of each, their ratio, and the largest
pixel difference of the final images (the fast paths change no result).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random weights (a smoke run in seconds)")
    parser.add_argument("--steps", type=int, default=35, help="sampling steps (the release's 35)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from idfusion.bench import flashface_full_size, full_size_components
    from idfusion.methods import flashface as ff
    from idfusion.testing.reference_flashface import flashface_official_loop, use_official_processors

    dtype = getattr(torch, args.dtype)
    pipe = flashface_full_size(full_size_components(dtype, args.device, tiny=args.tiny))
    side = 64 if args.tiny else pipe.native_size()
    latents = torch.randn(4, 4, 28, 28, generator=torch.Generator().manual_seed(0)).to(args.device, dtype)

    def ours():
        return np.stack(pipe(reference_latents=latents, prompt="a photo of a person", seed=0, height=side, width=side,
                             num_inference_steps=args.steps, output_type="np").images)  # fmt: skip

    def official():
        use_official_processors(pipe)
        try:
            return flashface_official_loop(pipe, latents, args.steps, 0, size=side)
        finally:
            ff.attach_reference_processors(pipe.unet, pipe.refnet, pipe.bank, pipe.reference_attention)

    def timed(run):
        run()  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            image = run()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.repeats, image

    official_s, official_image = timed(official)
    ours_s, ours_image = timed(ours)
    size = "tiny" if args.tiny else "full size"
    print(f"FlashFace official release, {size}, {side}x{side}, {args.steps} steps, {args.device} {args.dtype}")
    print(f"official control flow: {official_s:8.3f} s/image")
    print(f"idfusion pipeline:     {ours_s:8.3f} s/image")
    print(f"ratio (idfusion / official): {ours_s / official_s:.3f}")
    print(f"largest pixel difference: {np.abs(ours_image - official_image).max():.2e}")


if __name__ == "__main__":
    main()
