"""Record a release's own outputs on the tiny random weights, for the tests that hold the reference loops to it.

Usage:
    python benchmarks/record_release_outputs.py --method flashface --official-code DIR

Writes ``tests/data/official/<method>.npz``: the final latents of the release's code (``idfusion.official.<method>
.release_runner``) on ``write_release_weights(tiny=True, seed=0)``, 4 steps, seed 0, at each size, float32 on CPU,
with the release commit and the library versions. Run it from a checkout of the release at the commit the module
names; the release's code stays in that checkout.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

SIZES = {"flashface": (64, 128), "arc2face": (64, 128)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, choices=sorted(SIZES))
    parser.add_argument("--official-code", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "tests" / "data" / "official")
    args = parser.parse_args()

    import diffusers
    import torch
    import transformers

    from idfusion.official import locate_release, release_commit
    from idfusion.official.harness import release_module

    module = release_module(args.method)
    root = locate_release(module.RELEASE, args.official_code)
    with tempfile.TemporaryDirectory() as tmp:
        weights = module.write_release_weights(Path(tmp) / "weights", tiny=True, seed=0)
        run = module.release_runner(root, weights)
        arrays = {f"latents_{size}": run(4, 0, size) for size in SIZES[args.method]}
    meta = {"method": args.method, "repo": module.RELEASE.repo, "commit": release_commit(root), "steps": 4, "seed": 0,
            "weights": "write_release_weights(tiny=True, seed=0)", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / f"{args.method}.npz", meta=json.dumps(meta), **arrays)
    print(json.dumps(meta), {k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
    main()
