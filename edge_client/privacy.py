"""What the device does to its activations (and, in U-shape, its tail gradients) before they leave.

    h_K (B, T, H) --clip each token's vector to L2 norm <= C--> --+ N(0, (sigma * C / sqrt(H))^2) per coordinate-->
    the bytes of `forward`

`sigma` is a noise-to-clip ratio: the expected L2 norm of a token's noise vector is sigma * C, so
sigma = 1 buries a clipped token under noise as large as itself, whatever the hidden size. Noise
needs a clip (noise calibrated to nothing bounds nothing); a clip alone is allowed (it costs
accuracy and hides only the norm). The same mechanism, with its own settings, applies to the
`tail_grad` a U-shape device sends (its rows are dL/dh_N, whose softmax - onehot leaks the labels).

Who decides: the device. Its floor is `splitlm edge --clip C --noise SIGMA [--grad-clip --grad-noise]`;
a bundle's manifest may carry a floor of its own (`"privacy": {...}`); the device applies the
STRONGEST of the two (smaller clip, larger absolute noise), so a manifest can raise the protection
but never lower it, and nothing the server sends at run time (welcome, adapters) touches it.

Noise comes from the operating system's entropy (`np.random.default_rng()` with no seed): a server
that knew the seed could subtract the noise. Tests pass a seeded generator.

As differential privacy: one token's clipped vector has L2 sensitivity 2C (replace it by any
other), so the Gaussian mechanism gives (epsilon, delta) per token and per send with
epsilon = 2C * sqrt(2 ln(1.25/delta)) / std = 2 sqrt(H) sqrt(2 ln(1.25/delta)) / sigma
(`gaussian_epsilon`; valid as stated for epsilon < 1). For SmolLM2 (H = 576) at sigma = 1 that is
epsilon ~ 230: no meaningful formal guarantee at any noise a model can train under. The
protection this module gives is the measured one (`splitlm audit`), not a DP certificate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from splitlm.errors import SplitLMError


class PrivacyError(SplitLMError):
    """Privacy settings that make no sense (negative noise, noise without a clip)."""


@dataclass(frozen=True)
class Noise:
    """Per-token L2 clip, then Gaussian noise of std `sigma * clip / sqrt(H)` per coordinate."""

    clip: float | None = None   # None: no clipping
    sigma: float = 0.0          # noise-to-clip ratio; 0: no noise

    def __post_init__(self):
        if self.clip is not None and not self.clip > 0:
            raise PrivacyError(f"clip must be > 0 (or none), got {self.clip}")
        if not self.sigma >= 0 or not math.isfinite(self.sigma):
            raise PrivacyError(f"noise sigma must be a finite number >= 0, got {self.sigma}")
        if self.sigma > 0 and self.clip is None:
            raise PrivacyError(f"noise sigma {self.sigma} needs a clip: the noise is calibrated to the clip norm")

    @property
    def active(self) -> bool:
        return self.clip is not None

    def std(self, hidden_size: int) -> float:
        """Per-coordinate noise standard deviation for vectors of `hidden_size`."""
        return 0.0 if self.clip is None else self.sigma * self.clip / math.sqrt(hidden_size)

    def as_dict(self) -> dict:
        return {"clip": self.clip, "sigma": self.sigma}


def strongest(a: Noise, b: Noise) -> Noise:
    """The setting at least as protective as both: the smaller clip and the larger absolute noise."""
    clips = [c for c in (a.clip, b.clip) if c is not None]
    if not clips:
        return Noise()
    clip = min(clips)
    abs_noise = max(n.sigma * n.clip for n in (a, b) if n.clip is not None)  # noise norm, in clip units * clip
    return Noise(clip=clip, sigma=abs_noise / clip)


def clip_rows(x: np.ndarray, clip: float) -> np.ndarray:
    """Scale each vector along the last axis down to L2 norm <= clip (shorter ones stay)."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x * np.minimum(np.float32(1), np.float32(clip) / np.maximum(norms, np.float32(1e-30)))


def privatize(x: np.ndarray, noise: Noise, rng: np.random.Generator) -> np.ndarray:
    """`x` (..., H) clipped per row and noised as `noise` says; `x` itself when inactive."""
    if not noise.active:
        return x
    out = clip_rows(x, noise.clip)
    if noise.sigma > 0:
        out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(noise.std(x.shape[-1]))
    return out


@dataclass(frozen=True)
class PrivacySettings:
    """The device's defenses: on h_K (every mode) and on tail_grad (U-shape)."""

    hidden: Noise = Noise()
    tail_grad: Noise = Noise()

    @staticmethod
    def from_dict(d: dict | None) -> "PrivacySettings":
        """From a manifest's `privacy` map: {"clip", "noise", "grad_clip", "grad_noise"} (all optional)."""
        d = d or {}
        unknown = sorted(set(d) - {"clip", "noise", "grad_clip", "grad_noise"})
        if unknown:
            raise PrivacyError(f"manifest privacy: expected keys clip, noise, grad_clip, grad_noise, got {unknown}")
        return PrivacySettings(Noise(d.get("clip"), float(d.get("noise") or 0.0)),
                               Noise(d.get("grad_clip"), float(d.get("grad_noise") or 0.0)))

    def as_dict(self) -> dict:
        return {"clip": self.hidden.clip, "noise": self.hidden.sigma,
                "grad_clip": self.tail_grad.clip, "grad_noise": self.tail_grad.sigma}


def effective(device: PrivacySettings, manifest: PrivacySettings) -> PrivacySettings:
    """What the device applies: for each tensor the stronger of its own floor and the manifest's."""
    return PrivacySettings(strongest(device.hidden, manifest.hidden), strongest(device.tail_grad, manifest.tail_grad))


@dataclass
class Privatizer:
    """Applies one device's settings; noise from OS entropy unless a generator is given."""

    settings: PrivacySettings
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    def hidden(self, h_k: np.ndarray) -> np.ndarray:
        return privatize(h_k, self.settings.hidden, self.rng)

    def tail_grad(self, grad_n: np.ndarray) -> np.ndarray:
        return privatize(grad_n, self.settings.tail_grad, self.rng)


def gaussian_epsilon(noise: Noise, hidden_size: int, delta: float = 1e-5) -> float:
    """Per-token epsilon of the classic Gaussian mechanism (sensitivity 2C); inf without noise."""
    if noise.sigma == 0:
        return math.inf
    return 2 * math.sqrt(hidden_size) * math.sqrt(2 * math.log(1.25 / delta)) / noise.sigma
