"""`python -m distcluster.evaluate --model URI --data SPEC [--gallery FILE.png]`.

Prints one JSON object: `acc`, `nmi`, `ari`, `num_samples`, `clusters`. The
data must have labels (class folders, CIFAR, an .npz with `y`, digits);
they are used here only. `--gallery` draws each cluster's most confident
images; without labels it is the only output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from distcluster.commands.cli import PREPARE_HINT, model_arguments, run_command
from distcluster.common.errors import UserError
from distcluster.common.files import check_writable_target
from distcluster.inference.batch import assign_all, open_inputs

PROG = "distcluster.evaluate"


def evaluate(argv: list[str] | None = None) -> dict:
    parser = model_arguments(PROG, __doc__)
    parser.add_argument("--gallery", help="also draw the cluster gallery to FILE.png")
    args = parser.parse_args(argv)
    gallery = Path(args.gallery) if args.gallery else None
    if gallery is not None:
        if gallery.suffix != ".png":
            raise UserError(f"--gallery must name a .png file (got {gallery})")
        check_writable_target(gallery, "--gallery")
    inputs = open_inputs(args)
    loaded, source = inputs.model, inputs.source
    if source.labels is None and gallery is None:  # refused before any image is assigned
        raise UserError(f"'{args.data}' has no labels to evaluate against (use predict, or --gallery)")
    rows = list(assign_all(inputs, args))
    clusters, confidence = (np.concatenate([r[key] for r in rows]) for key in ("cluster", "confidence"))
    if gallery is not None:
        from distcluster.tracking.plots import source_gallery

        source_gallery(source, clusters, confidence, loaded.clusters, gallery)
    if source.labels is None:  # the gallery is all there is to give
        return {}
    from distcluster.core.metrics import cluster_scores

    result = {**cluster_scores(source.labels.numpy(), clusters), "num_samples": len(source),
              "clusters": loaded.clusters}
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, lambda: evaluate(argv), corrupt_hint=PREPARE_HINT)


if __name__ == "__main__":
    raise SystemExit(main())
