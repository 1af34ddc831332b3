"""`GuidanceConfig`: which test-time steering method to run and its knobs (METHODS.md §5)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

METHODS = ("none", "qgf", "qgf_jacobian", "ood", "bptt", "gradstep", "best_of_n", "qgf_best_of_n")
# Methods that change the velocity with w * g at every step (w = 0 makes them the plain sampler).
VELOCITY_GUIDED = ("qgf", "qgf_jacobian", "ood", "bptt", "qgf_best_of_n")
BEST_OF_N = ("best_of_n", "qgf_best_of_n")

# The fields each method reads; a field a method ignores must keep its default (DESIGN.md: an ignored
# key is an error, so `guidance=best_of_n guidance.weight=0.5` is caught, not silently dropped).
_USES = {
    "none": (),
    "qgf": ("weight", "clip"),
    "qgf_jacobian": ("weight", "clip"),
    "ood": ("weight",),
    "bptt": ("weight",),
    "gradstep": ("gradstep_steps", "gradstep_size", "clip"),
    "best_of_n": ("n",),
    "qgf_best_of_n": ("weight", "clip", "n"),
}


def fields_used(method: str) -> tuple[str, ...]:
    """The GuidanceConfig fields `method` reads (the others must stay at their defaults)."""
    if method not in _USES:
        raise ValueError(f"GuidanceConfig: method must be one of {METHODS}, got {method!r}")
    return _USES[method]


@dataclass(frozen=True)
class GuidanceConfig:
    """Test-time guidance of the ODE sampler with a critic Q (METHODS.md §5).

    Fields:
        method: "none" (plain ODE), "qgf", "qgf_jacobian", "ood", "bptt", "gradstep", "best_of_n" or
            "qgf_best_of_n"; see docs/guidance.md.
        weight: w >= 0 in v' = v - w * g. Not scale-free: it multiplies raw grad Q, so choose it on
            validation seeds and read the logged ||w g|| / ||v||. w = 0 is the plain sampler exactly.
        n: candidates per observation for the best-of-N methods (argmax Q among them).
        gradstep_steps, gradstep_size: gradient-ascent steps a <- a + size * grad Q(a) on the final chunk.
        clip: (low, high) box of the normalised action space, used for the clean estimate a_hat (QGF,
            Jacobian) and to project GradStep; (-1, 1) is the reference's (quantile-normalised actions);
            None disables it (z-scored actions have no box).
    """

    method: str = "none"
    weight: float = 0.0
    n: int = 1
    gradstep_steps: int = 10
    gradstep_size: float = 0.0
    clip: tuple[float, float] | None = (-1.0, 1.0)

    def __post_init__(self) -> None:
        if self.clip is not None:
            object.__setattr__(self, "clip", tuple(float(c) for c in self.clip))
        problem = self._problem()
        if problem:
            raise ValueError(f"GuidanceConfig: {problem}")

    def _problem(self) -> str | None:
        if self.method not in METHODS:
            return f"method must be one of {METHODS}, got {self.method!r}"
        if not (math.isfinite(self.weight) and self.weight >= 0):
            return f"weight must be finite and >= 0 (v' = v - w g steers towards higher Q), got {self.weight}"
        if not (isinstance(self.n, int) and self.n >= 1):
            return f"n must be an integer >= 1, got {self.n!r}"
        if not (isinstance(self.gradstep_steps, int) and self.gradstep_steps >= 0):
            return f"gradstep_steps must be an integer >= 0, got {self.gradstep_steps!r}"
        if not (math.isfinite(self.gradstep_size) and self.gradstep_size >= 0):
            return f"gradstep_size must be finite and >= 0, got {self.gradstep_size}"
        if self.clip is not None and not (len(self.clip) == 2 and all(map(math.isfinite, self.clip))
                                          and self.clip[0] < self.clip[1]):
            return f"clip must be None or finite (low, high) with low < high, got {self.clip}"
        for f in fields(self):
            if f.name != "method" and f.name not in _USES[self.method] and getattr(self, f.name) != f.default:
                return f"method {self.method!r} does not use {f.name} (got {getattr(self, f.name)!r}); leave it at {f.default!r}"
        return None

    @property
    def num_candidates(self) -> int:
        """Chunks sampled per observation: n for the best-of-N methods, else 1."""
        return self.n if self.method in BEST_OF_N else 1

    @property
    def steers_velocity(self) -> bool:
        """True when the velocity is changed at each step (a velocity-guided method with w > 0)."""
        return self.method in VELOCITY_GUIDED and self.weight > 0

    @property
    def needs_critic(self) -> bool:
        """Whether a q_fn is required: anything but the plain sampler."""
        return self.method != "none"
