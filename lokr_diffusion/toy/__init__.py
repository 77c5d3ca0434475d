"""A toy text-to-image world in which fine-tuning can be *seen* and *measured* offline.

* `generator`: coloured circles, squares and triangles on coloured backgrounds, captioned with
  colour, shape and position; plus the concept the base model never sees (a cross, "sks").
* `model`, `pretrain`: an SD 1.x-architecture model small enough to pretrain on a CPU in
  minutes; the trained one ships in `assets/toy/model/`.
* `scorer`: reads shape, colours and position back from a 64 px image (pixel statistics).
* `evaluate`: samples before/after an adapter and turns the readings into the concept and
  preservation scores, with thresholds.
* `compare`: LoRA vs LoHa vs LoKr on this toy, trained with the real trainer, plus the matrix
  approximation experiment; writes `docs/comparison.md`.

Command line: `lokr-diffusion toy pretrain|concept|score|validate-scorer|compare`.
"""
from ..resources import toy_assets

ASSETS = toy_assets()  # the repository's assets/toy in a clone, the wheel's bundled copy once installed
MODEL_DIR = ASSETS / "model"
CONCEPT_DIR = ASSETS / "concept"
PRIOR_DIR = ASSETS / "prior"

__all__ = ["ASSETS", "CONCEPT_DIR", "MODEL_DIR", "PRIOR_DIR"]
