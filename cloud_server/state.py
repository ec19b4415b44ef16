"""The server's state on disk, what `splitlm serve --resume` continues from, and the resume rule.

One file, OUT/server-state.safetensors, replaced whole at every round end and on a clean
shutdown (temp file in the same folder, fsync, os.replace): a kill -9 leaves the old file or the
new one, never half of one. safetensors + one JSON string in its metadata; no pickle.

    tensors   body.<param>                       trainable body parameters (Body.training_state)
              adam.<param>.{step,exp_avg,exp_avg_sq}
              head.<name>                        the global head adapter (last round's average)
              report.<i>.<name>                  head LoRA that client i reported this round
              backward.<i>                       the last dL/dh_K sent to client i (re-sent if lost)
    metadata  "splitlm": {"version", "config", "round", "global_step", "awaited",
                          "clients": {client_id: {"key", "step", "losses", "backward"}},
                          "reports": {client_id: n_samples}}

`server_resume` decides, from the server's and the client's step counters, how a reconnecting
client goes on (see its docstring); `edge_client.state.client_resume` is its other half.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from splitlm.atomic import write_atomic
from splitlm.errors import StateError
from splitlm.protocol import Backward

STATE_FILE = "server-state.safetensors"
VERSION = 1


# ---------------------------------------------------------------- the resume rule

class Resume(enum.Enum):
    FRESH = "fresh"      # the client starts over at step 0 (hello.resume_step is None)
    GO_ON = "go_on"      # both at the same step
    RESEND = "resend"    # the server applied the client's step s, the backward was lost: send it again
    REWIND = "rewind"    # the server restarted from an older round end: the client restores its snapshot


def server_resume(*, server_next: int, client_next: int | None, cached_step: int | None) -> Resume:
    """How a client that says it runs step `client_next` next goes on with a server that expects
    `server_next` from it; `cached_step` is the step of the last backward the server sent it."""
    if client_next is None:
        return Resume.FRESH
    if client_next == server_next:
        return Resume.GO_ON
    if client_next == server_next - 1 and cached_step == client_next:
        return Resume.RESEND
    if client_next > server_next:
        return Resume.REWIND
    raise StateError(f"hello.resume_step: the server is at step {server_next} for this client, the client "
                     f"at {client_next}: its state is older than the server's (expected {server_next} or "
                     f"{server_next - 1} with a cached backward, or more)")


def describe_resume(plan: Resume, *, server_next: int, client_next: int | None) -> str:
    """The server log's words for `plan`, e.g. "new: starts at step 0"."""
    return {
        Resume.FRESH: f"new: starts at step {server_next}",
        Resume.GO_ON: f"back: goes on at step {server_next}",
        Resume.RESEND: f"back: step {client_next} was applied here but its answer was lost, sending it again",
        Resume.REWIND: f"back at step {client_next}, but this server restarted from step {server_next}: "
                       "the client goes back to its snapshot there",
    }[plan]


# ---------------------------------------------------------------- what is saved

@dataclass
class Progress:
    """One client's place in training, keyed by client_id: it outlives connections and restarts."""
    step: int = 0                          # the next step the client must send
    losses: list[float] = field(default_factory=list)  # since its last round report
    last_backward: Backward | None = None  # the last one sent, re-sent when it was lost


@dataclass
class ServerState:
    config: dict                           # what must match on --resume (model hash, cut, ...)
    round: int
    global_step: int
    global_head: dict[str, np.ndarray]
    progress: dict[str, Progress]
    reports: dict[str, tuple[dict[str, np.ndarray], int]]  # client_id -> (head LoRA, n_samples)
    awaited: set[str]                      # clients connected when saved: the open round waits for them
    body: dict[str, torch.Tensor] = field(default_factory=dict)  # Body.training_state(): body.*, adam.*


def save_state(path: Path, state: ServerState) -> None:
    from safetensors.torch import save

    tensors = {n: t.contiguous() for n, t in state.body.items()}  # "body.*" and "adam.*" names
    tensors |= {f"head.{n}": _t(a) for n, a in state.global_head.items()}
    clients, reports = {}, {}
    for i, (cid, p) in enumerate(sorted(state.progress.items())):
        b = p.last_backward
        clients[cid] = {"key": i, "step": p.step, "losses": p.losses,
                        "backward": None if b is None else {"step": b.step, "loss": b.loss}}
        if b is not None:
            tensors[f"backward.{i}"] = _t(b.grad)
    for i, (cid, (head, n)) in enumerate(sorted(state.reports.items())):
        reports[cid] = {"key": i, "n_samples": n}
        tensors |= {f"report.{i}.{name}": _t(a) for name, a in head.items()}
    meta = {"version": VERSION, "config": state.config, "round": state.round, "global_step": state.global_step,
            "awaited": sorted(state.awaited), "clients": clients, "reports": reports}
    blob = save(tensors, metadata={"splitlm": json.dumps(meta)})
    write_atomic(path, lambda f: f.write(blob))


def load_state(path: Path, *, config: dict) -> ServerState:
    """The state in `path`; StateError if it is missing, unreadable or saved for another `config`."""
    from safetensors import safe_open

    if not path.is_file():
        raise StateError(f"--resume: no server state at {path} (it is written under --out at each round end "
                         "and on a clean shutdown)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["splitlm"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds
        raise StateError(f"{path}: not a readable server state ({type(e).__name__}: {e})") from e
    if meta.get("version") != VERSION:
        raise StateError(f"{path}: state version {meta.get('version')!r}, this server reads {VERSION}")
    wrong = [f"{k}: state has {meta['config'].get(k)!r}, server runs {v!r}" for k, v in config.items()
             if meta["config"].get(k) != v]
    if wrong:
        raise StateError(f"{path}: saved for another setup: " + "; ".join(wrong))
    return _from_files(meta, tensors)


def _from_files(meta: dict, tensors: dict[str, torch.Tensor]) -> ServerState:
    def under(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: t.numpy() for k, t in tensors.items() if k.startswith(prefix)}

    progress = {}
    for cid, c in meta["clients"].items():
        b = c["backward"]
        last = None if b is None else Backward(step=b["step"], grad=tensors[f"backward.{c['key']}"].numpy(),
                                               loss=b["loss"])
        progress[cid] = Progress(step=c["step"], losses=list(c["losses"]), last_backward=last)
    reports = {cid: (under(f"report.{r['key']}."), r["n_samples"]) for cid, r in meta["reports"].items()}
    body = {k: t for k, t in tensors.items() if k.startswith(("body.", "adam."))}
    return ServerState(config=meta["config"], round=meta["round"], global_step=meta["global_step"],
                       global_head=under("head."), progress=progress, reports=reports,
                       awaited=set(meta["awaited"]), body=body)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).copy())
