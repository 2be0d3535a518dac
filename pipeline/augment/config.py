"""The `augment` config section: which differentiable augmentation D's inputs go through, and how ADA moves p.

`kind`:
- `none`: D sees images as they are.
- `ada`: the StyleGAN2-ADA pipeline (Karras et al. 2020, "Training Generative Adversarial Networks with Limited
  Data") with the operations of `pipe` (default `bgc`). With `target` set, p starts at `p` and is adapted every
  `ada_interval` steps from E[sign(D(real))]; with `target: null`, p stays fixed at `p`.
- `diffaugment`: DiffAugment (Zhao et al. 2020) with the operations listed in `policy`, applied to every image.

Lives beside the code that reads it (like `pipeline.metrics.config`); `pipeline.config` puts it in the schema.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.augment.ada import ADA_PIPES
from pipeline.augment.diffaugment import DIFFAUGMENT_OPS
from pipeline.errors import require

AUGMENT_KINDS = ("none", "ada", "diffaugment")


@dataclass
class AugmentConfig:
    kind: str = "none"  # none | ada | diffaugment
    p: float = 0.0  # ada: initial augmentation probability (the fixed p when target is null)
    target: float | None = 0.6  # ada: target of E[sign(D(real))]; null = fixed p
    ada_interval: int = 4  # ada: adjust p every this many steps
    ada_kimg: float = 500  # ada: p can move by 1 over this many kimg
    pipe: str = "bgc"  # ada: operation set (blit, geom, color, bg, bgc)
    policy: str = "color,translation,cutout"  # diffaugment: comma-separated subset of color, translation, cutout

    def policy_ops(self) -> list[str]:
        return [op.strip() for op in self.policy.split(",") if op.strip()]

    def validate(self, prefix: str) -> None:
        require(
            self.kind in AUGMENT_KINDS,
            f"{prefix}.kind",
            self.kind,
            f"choose one of {', '.join(AUGMENT_KINDS)}",
        )
        require(0 <= self.p <= 1, f"{prefix}.p", self.p, "must be in [0, 1]")
        require(
            self.target is None or 0 < self.target < 1,
            f"{prefix}.target",
            self.target,
            "must be in (0, 1), or null for a fixed p",
        )
        require(self.ada_interval >= 1, f"{prefix}.ada_interval", self.ada_interval, "must be an integer >= 1")
        require(self.ada_kimg > 0, f"{prefix}.ada_kimg", self.ada_kimg, "must be > 0")
        require(self.pipe in ADA_PIPES, f"{prefix}.pipe", self.pipe, f"choose one of {', '.join(ADA_PIPES)}")
        ops = self.policy_ops()
        unknown = [op for op in ops if op not in DIFFAUGMENT_OPS]
        require(
            not unknown,
            f"{prefix}.policy",
            self.policy,
            f"unknown operation {', '.join(unknown)}; use a comma-separated subset of {', '.join(DIFFAUGMENT_OPS)}",
        )
        if self.kind == "diffaugment":
            require(bool(ops), f"{prefix}.policy", self.policy, f"name at least one of {', '.join(DIFFAUGMENT_OPS)}")
        if self.kind == "none":
            # A p with augmentation off is almost certainly a forgotten `kind`; say so instead of ignoring it.
            require(
                self.p == 0,
                f"{prefix}.p",
                self.p,
                f"{prefix}.kind is 'none'; set {prefix}.kind=ada (with {prefix}.target=null for a fixed p)",
            )
