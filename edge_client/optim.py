"""AdamW in numpy for the device's LoRA tensors, step for step the same as `torch.optim.AdamW`.

torch's single-tensor AdamW (amsgrad off), per parameter p with gradient g at step t:

    p   *= 1 - lr * weight_decay                      decoupled weight decay
    m   += (1 - beta1) * (g - m)                      first moment (torch: m.lerp_(g, 1 - beta1))
    v    = beta2 * v + (1 - beta2) * g * g            second moment
    p   -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

The same operations in the same order, in float32, so the two agree to rounding.
"""

from __future__ import annotations

import math

import numpy as np


class AdamW:
    """Updates a dict of float32 arrays in place. The state saves with `np.savez` (no pickle)."""

    def __init__(self, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        # weight_decay 0: what splitlm uses on both sides (torch's own default is 1e-2; pass it to match).
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.t = 0                           # steps taken
        self.exp_avg: dict[str, np.ndarray] = {}
        self.exp_avg_sq: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """One update of every array in `params`, in place, from the same-named `grads`."""
        missing = sorted(set(params) - set(grads))
        if missing:
            raise KeyError(f"AdamW.step: no gradient for {missing}")
        for name, p in params.items():  # check all before changing any
            if grads[name].shape != p.shape:
                raise ValueError(f"AdamW.step: gradient of {name} has shape {grads[name].shape}, "
                                 f"the parameter {p.shape}")
        self.t += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1 - beta1 ** self.t)
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** self.t)
        for name, p in params.items():
            g = np.asarray(grads[name], dtype=p.dtype)
            m = self.exp_avg.setdefault(name, np.zeros_like(p))
            v = self.exp_avg_sq.setdefault(name, np.zeros_like(p))
            p *= 1 - self.lr * self.weight_decay
            m += (1 - beta1) * (g - m)
            v *= beta2
            v += (1 - beta2) * g * g
            denom = np.sqrt(v) / bias_correction2_sqrt + self.eps
            p += -step_size * m / denom

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat name -> array: `step`, `exp_avg.<name>`, `exp_avg_sq.<name>`."""
        state = {"step": np.array(self.t, dtype=np.int64)}
        state |= {f"exp_avg.{n}": a.copy() for n, a in self.exp_avg.items()}
        state |= {f"exp_avg_sq.{n}": a.copy() for n, a in self.exp_avg_sq.items()}
        return state

    def load_state_dict(self, state) -> None:
        """Restore from `state_dict()` output or the `np.load` of its `np.savez` file."""
        self.t = int(state["step"])
        moments = {"exp_avg.": {}, "exp_avg_sq.": {}}
        for key in state:
            for prefix, into in moments.items():
                if key.startswith(prefix):
                    into[key[len(prefix):]] = np.array(state[key], dtype=np.float32)
        self.exp_avg, self.exp_avg_sq = moments["exp_avg."], moments["exp_avg_sq."]
