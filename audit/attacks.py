"""The curious server's attacks, cheapest first. Each returns predicted token ids (N, T).

    dictionary     every vocabulary token's cut-layer vector (one batched head forward), then the
                   nearest row to each received h_K row (L2 or cosine). Training-free.
    inverter       a linear (ridge) map, fitted on the server's own public text pushed through the
                   same head and the same defense, from the window h_t, h_t+1, h_t+2 (later positions
                   attend to token t, so they carry it too) to token t's dictionary vector; then the
                   nearest dictionary row. Closed form: seconds, no training loop.
    exact          uses the known weights position by position: token t's h_t depends only on tokens
                   <= t, so with the prefix already recovered, run the head on the prefix + each of the
                   dictionary's top-k candidates and keep the one whose h_t is nearest the received row
                   (the practical side of "hidden states are injective").
    labels         U-shape: tail_grad_t = s * J_t^T W^T (softmax_t - onehot(y_t)), with J_t the final
                   norm's Jacobian at h_N (the server computed h_N), W the LM head and s = 1/#labels.
                   The server knows everything but y_t and s: score every candidate label by the cosine
                   between tail_grad_t and u_t - J_t^T w_y (u_t = J_t^T W^T softmax_t) and take the best.
                   `norm_jacobian_terms` gives J_t^T for RMSNorm and LayerNorm in closed form, so the
                   cosine of all V candidates costs three (positions x H) @ (H x V) products.

The attacker knows the defense's settings (Kerckhoffs): the dictionary and the inverter's
training features are clipped (and, for the inverter, noised) the same way as the device's rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from splitlm.edge_client.privacy import Noise, clip_rows, privatize
from splitlm.edge_client.runtime import HeadRuntime

CHUNK = 2048  # rows of the (rows x V) score matrices at a time: 2048 x 49152 float32 = 400 MB


# --- dictionary --------------------------------------------------------------------------------

def token_table(runtime: HeadRuntime, lora: dict[str, np.ndarray], *, prefix: tuple[int, ...] = (),
                batch: int = 512, progress=None) -> np.ndarray:
    """(V, H): the head's h at the position of each vocabulary token v, read from prefix + [v] (padded to
    the head's minimum length with v; causal, so what follows does not change it)."""
    m = runtime.manifest
    V, pos = m.model.vocab_size, len(prefix)
    T = max(pos + 1, 3)
    out = np.empty((V, m.model.hidden_size), np.float32)
    for start in range(0, V, batch):
        ids = np.arange(start, min(start + batch, V), dtype=np.int64)
        seqs = np.empty((len(ids), T), np.int64)
        seqs[:, :pos] = prefix
        seqs[:, pos:] = ids[:, None]
        out[start:start + len(ids)] = runtime.forward(seqs, np.ones_like(seqs), lora)[:, pos]
        if progress is not None:
            progress(len(ids))
    return out


def nearest(rows: np.ndarray, table: np.ndarray, *, metric: str = "l2", k: int = 1) -> np.ndarray:
    """Indices (n, k) of the k nearest table rows to each row, best first."""
    t = torch.from_numpy(np.ascontiguousarray(table, np.float32))
    if metric == "cosine":
        t = torch.nn.functional.normalize(t, dim=1)
    half_sq = 0.5 * (t * t).sum(1)  # (V,)
    out = []
    for start in range(0, len(rows), CHUNK):
        r = torch.from_numpy(np.ascontiguousarray(rows[start:start + CHUNK], np.float32))
        score = r @ t.T if metric == "cosine" else r @ t.T - half_sq  # argmax == nearest
        out.append(score.topk(k, dim=1).indices.numpy())
    return np.concatenate(out)


@dataclass(frozen=True)
class Tables:
    """The dictionary: (V, H) rows for position 0 (context-free: h_0 depends on x_0 alone, so this row
    is exact) and for later positions (each token after a short fixed prefix)."""

    first: np.ndarray
    rest: np.ndarray

    def clipped(self, noise: Noise) -> "Tables":
        if not noise.active:
            return self
        return Tables(clip_rows(self.first, noise.clip), clip_rows(self.rest, noise.clip))

    def lookup(self, hidden: np.ndarray, *, metric: str = "l2", k: int = 1) -> np.ndarray:
        """(N, T, k): the k nearest rows, position 0 against `first`, the rest against `rest`."""
        N, T, H = hidden.shape
        first = nearest(hidden[:, 0], self.first, metric=metric, k=k)[:, None]
        rest = nearest(hidden[:, 1:].reshape(-1, H), self.rest, metric=metric, k=k).reshape(N, T - 1, k)
        return np.concatenate([first, rest], axis=1)


def dictionary_tables(runtime: HeadRuntime, lora: dict[str, np.ndarray], *, prefix: tuple[int, ...],
                      progress=None) -> Tables:
    """Position 0 and after `prefix`. Measured once on SmolLM2 K=2 (2,016 GFDL tokens past position 0,
    cosine, a torch head): a table read at position 0 recovered 14% of them, after eos 91%, after
    eos + " the" 93%: position 0 is SmolLM2's attention sink (its h_K norm is ~200 against ~65)."""
    return Tables(token_table(runtime, lora, progress=progress), token_table(runtime, lora, prefix=prefix,
                                                                             progress=progress))


def dictionary_attack(hidden: np.ndarray, tables: Tables, *, noise: Noise, metric: str = "l2") -> np.ndarray:
    """(N, T) token ids: the nearest dictionary row (clipped as the device clips) to each received row."""
    return tables.clipped(noise).lookup(hidden, metric=metric)[..., 0]


# --- learned inverter --------------------------------------------------------------------------

WINDOW = 3  # h_t, h_t+1, h_t+2


def window_features(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N*T, WINDOW*H): each position's row with the next WINDOW-1 rows (zeros past the sequence)."""
    N, T, H = hidden.shape
    h = hidden * mask[..., None]
    padded = np.concatenate([h, np.zeros((N, WINDOW - 1, H), h.dtype)], axis=1)
    return np.concatenate([padded[:, i:i + T] for i in range(WINDOW)], axis=2).reshape(N * T, WINDOW * H)


@dataclass(frozen=True)
class Inverter:
    """Ridge regression from window features to the target token's (clipped) dictionary row."""

    weights: np.ndarray  # (WINDOW*H + 1, H)

    @staticmethod
    def fit(hidden: np.ndarray, mask: np.ndarray, ids: np.ndarray, table: np.ndarray, *,
            ridge: float = 1e-3) -> "Inverter":
        keep = mask.reshape(-1).astype(bool)
        x = _with_bias(window_features(hidden, mask)[keep]).astype(np.float64)
        y = table[ids.reshape(-1)[keep]].astype(np.float64)
        gram = x.T @ x
        gram[np.diag_indices_from(gram)] += ridge * np.trace(gram) / len(gram)
        return Inverter(np.linalg.solve(gram, x.T @ y).astype(np.float32))

    def predict(self, hidden: np.ndarray, mask: np.ndarray, table: np.ndarray) -> np.ndarray:
        N, T, _ = hidden.shape
        estimate = _with_bias(window_features(hidden, mask)) @ self.weights
        return nearest(estimate, table)[:, 0].reshape(N, T)


def _with_bias(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1)


def inverter_attack(hidden: np.ndarray, mask: np.ndarray, tables: Tables, *, public, noise: Noise,
                    seed: int = 1) -> np.ndarray:
    """Fit on `public` (a Frames of the server's own text, undefended), defended here as the device would."""
    table = tables.clipped(noise).rest
    public_hidden = privatize(public.hidden, noise, np.random.default_rng(seed))
    inverter = Inverter.fit(public_hidden, public.attention_mask, public.input_ids, table)
    return inverter.predict(hidden, mask, table)


# --- exact search with the known weights -------------------------------------------------------

def exact_attack(hidden: np.ndarray, mask: np.ndarray, tables: Tables, runtime: HeadRuntime,
                 lora: dict[str, np.ndarray], *, noise: Noise, k: int = 16, progress=None) -> np.ndarray:
    """(N, T): greedy left to right; at each position the candidate among the dictionary's top k whose
    true h_t (given the recovered prefix) is nearest the received row."""
    N, T, H = hidden.shape
    # Candidates by cosine without noise (the stronger lookup there), by L2 with it (the maximum-
    # likelihood ranking under Gaussian noise on clipped rows).
    metric = "l2" if noise.sigma > 0 else "cosine"
    candidates = tables.clipped(noise).lookup(hidden, metric=metric, k=k)      # (N, T, k)
    lengths = mask.sum(1).astype(int)
    out = np.zeros((N, T), np.int64)
    for t in range(T):
        live = np.nonzero(lengths > t)[0]
        if len(live) == 0:
            break
        L = max(t + 1, 3)
        seqs = np.repeat(out[live, None, :L], k, axis=1)               # (n, k, L)
        seqs[:, :, t] = candidates[live, t]
        if L > t + 1:
            seqs[:, :, t + 1:] = candidates[live, t][..., None]
        h = runtime.forward(seqs.reshape(-1, L), np.ones((len(live) * k, L), np.int64), lora)[:, t]
        h = clip_rows(h, noise.clip) if noise.active else h
        dist = ((h.reshape(len(live), k, H) - hidden[live, t][:, None]) ** 2).sum(-1)  # (n, k)
        out[live, t] = candidates[live, t, dist.argmin(1)]
        if progress is not None:
            progress(1)
    return out


# --- U-shape: labels from tail_grad ------------------------------------------------------------

def norm_jacobian_terms(norm: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                        list[tuple[torch.Tensor, float]]]:
    """J^T v = scale * (gamma * v projected): returns (scale (n,), gamma (H,), [(b_k (n, H), alpha_k)])
    with J^T v = scale * (I - sum_k alpha_k b_k b_k^T) (gamma * v), for RMSNorm and LayerNorm."""
    H = x.shape[-1]
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    gamma = norm.weight.detach()
    if isinstance(norm, torch.nn.LayerNorm):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        sigma = torch.sqrt(var + eps)
        xhat = (x - mu) / sigma
        return 1 / sigma[:, 0], gamma, [(torch.ones_like(x), 1 / H), (xhat, 1 / H)]
    r = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)                      # RMSNorm
    return 1 / r[:, 0], gamma, [(x / (r * H ** 0.5), 1.0)]


def label_attack(tail_grad: np.ndarray, hidden_n: np.ndarray, mask: np.ndarray, *, norm: torch.nn.Module,
                 lm_head: torch.nn.Module, progress=None) -> np.ndarray:
    """(N, T) predicted labels y_t+1 at each position t (the label that position's gradient came from)."""
    N, T, H = hidden_n.shape
    W = lm_head.weight.detach()                                                  # (V, H)
    x_all = torch.from_numpy(hidden_n.reshape(-1, H).astype(np.float32))
    g_all = torch.from_numpy(tail_grad.reshape(-1, H).astype(np.float32))
    out = np.zeros(N * T, np.int64)
    for start in range(0, N * T, CHUNK // 4):
        x, g = x_all[start:start + CHUNK // 4], g_all[start:start + CHUNK // 4]
        out[start:start + len(x)] = _best_labels(x, g, norm, lm_head, W)
        if progress is not None:
            progress(len(x))
    return out.reshape(N, T)


def _best_labels(x: torch.Tensor, g: torch.Tensor, norm, lm_head, W: torch.Tensor) -> np.ndarray:
    """argmax_y cos(g, u - c_y), c_y = J^T w_y, over every y at once."""
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        logits = lm_head(norm(x))
        p = torch.softmax(logits, -1).detach()
        u, = torch.autograd.grad((logits * p).sum(), x)                         # (n, H) J^T W^T p
    x = x.detach()
    scale, gamma, terms = norm_jacobian_terms(norm, x)
    G = W * gamma                                                                # (V, H)

    def project(q):  # (I - sum alpha b b^T) q, rows
        return q - sum(a * (b * q).sum(-1, keepdim=True) * b for b, a in terms)

    g_c = scale[:, None] * (project(g) @ G.T)                                    # <g, c_y>   (n, V)
    u_c = scale[:, None] * (project(u) @ G.T)                                    # <u, c_y>
    z = [b @ G.T for b, _ in terms]                                              # <b_k, gamma w_y>
    c_sq = (G * G).sum(1)[None, :] - 2 * sum(a * zk ** 2 for (b, a), zk in zip(terms, z))
    for (bk, ak), zk in zip(terms, z):
        for (bl, al), zl in zip(terms, z):
            c_sq = c_sq + ak * al * zk * zl * (bk * bl).sum(-1, keepdim=True)
    c_sq = scale[:, None] ** 2 * c_sq                                            # ||c_y||^2
    num = (g * u).sum(-1, keepdim=True) - g_c
    den = ((u * u).sum(-1, keepdim=True) - 2 * u_c + c_sq).clamp_min(1e-30).sqrt()
    return (num / den).argmax(1).numpy()
