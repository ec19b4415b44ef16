"""The device's training state on disk (`splitlm edge --state FILE`), and the client half of the
resume rule.

FILE is one `np.savez` archive (no pickle: numbers, float arrays and one JSON string), replaced
whole after every step and every round exchange (temp file beside it, fsync, os.replace):

    meta                     JSON: version and the run it belongs to (client_id, bundle, data, batch)
    now.{step,round,exchange_due,loss}   where training is: the next step, the round, whether the
                                         round exchange after the last step is still to do, its loss
    now.lora.<name>          the head's LoRA tensors
    now.optim.<key>          AdamW.state_dict(): step, exp_avg.<name>, exp_avg_sq.<name>
    snap.*                   the same at the last round end (or the start): where a server restarted
                             from its round-end state asks the client to go back to

`client_resume` pairs with `cloud_server.state.server_resume`: after a reconnect the server says
(welcome.step) which step it expects next, and the client goes on, applies the backward the
server re-sends, or rewinds to its snapshot.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitlm.atomic import write_atomic
from splitlm.errors import StateError

VERSION = 1


# ---------------------------------------------------------------- the resume rule

class Resume(enum.Enum):
    GO_ON = "go_on"                # both at the same step
    APPLY_RESENT = "apply_resent"  # the server applied our step, its backward was lost: it re-sends it
    REWIND = "rewind"              # the server went back to a round end: restore the snapshot there


def client_resume(*, client_next: int, server_next: int, snapshot_step: int | None) -> Resume:
    """What to do when this client would run `client_next` and the server expects `server_next`."""
    if server_next == client_next:
        return Resume.GO_ON
    if server_next == client_next + 1:
        return Resume.APPLY_RESENT
    if server_next < client_next and snapshot_step == server_next:
        return Resume.REWIND
    have = "no snapshot" if snapshot_step is None else f"a snapshot at step {snapshot_step}"
    raise StateError(f"cannot resume: the server expects step {server_next}, this client is at step "
                     f"{client_next} with {have} (expected the server at {client_next} or "
                     f"{client_next + 1}, or at the step of the snapshot)")


# ---------------------------------------------------------------- what is saved

@dataclass
class Position:
    """Everything training changes on the device, at one point in time."""
    step: int                        # the next step to run
    round: int
    exchange_due: bool               # the last step closed a round whose adapter exchange is not done
    loss: float                      # the last step's loss (its metrics record waits for the exchange)
    lora: dict[str, np.ndarray]
    optim: dict[str, np.ndarray]     # AdamW.state_dict()

    def copy(self) -> "Position":
        return Position(self.step, self.round, self.exchange_due, self.loss,
                        {n: np.array(a, copy=True) for n, a in self.lora.items()},
                        {n: np.array(a, copy=True) for n, a in self.optim.items()})


@dataclass
class EdgeState:
    meta: dict          # the run it belongs to; must match on --resume
    now: Position
    snapshot: Position  # the last round end


def save_state(path: Path, state: EdgeState) -> None:
    arrays = {"meta": np.array(json.dumps({"version": VERSION, **state.meta}))}
    for prefix, pos in (("now", state.now), ("snap", state.snapshot)):
        arrays |= {f"{prefix}.step": np.int64(pos.step), f"{prefix}.round": np.int64(pos.round),
                   f"{prefix}.exchange_due": np.bool_(pos.exchange_due), f"{prefix}.loss": np.float64(pos.loss)}
        arrays |= {f"{prefix}.lora.{n}": a for n, a in pos.lora.items()}
        arrays |= {f"{prefix}.optim.{n}": a for n, a in pos.optim.items()}
    write_atomic(path, lambda f: np.savez(f, **arrays))


def load_state(path: Path, *, meta: dict) -> EdgeState:
    """The state in `path`; StateError if it is missing, unreadable or from a run unlike `meta`."""
    if not path.is_file():
        raise StateError(f"--resume: no state file at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        saved = json.loads(str(arrays.pop("meta")))
    except Exception as e:  # noqa: BLE001 - a torn or foreign file fails in zipfile, numpy or json
        raise StateError(f"{path}: not a readable edge state ({type(e).__name__}: {e})") from e
    if saved.pop("version", None) != VERSION:
        raise StateError(f"{path}: expected state version {VERSION}")
    wrong = [f"{k}: state has {saved.get(k)!r}, this run {v!r}" for k, v in meta.items() if saved.get(k) != v]
    if wrong:
        raise StateError(f"{path}: written by another run: " + "; ".join(wrong))
    return EdgeState(meta=saved, now=_position(arrays, "now"), snapshot=_position(arrays, "snap"))


def _position(arrays: dict[str, np.ndarray], prefix: str) -> Position:
    def under(sub: str) -> dict[str, np.ndarray]:
        start = f"{prefix}.{sub}."
        return {k[len(start):]: a for k, a in arrays.items() if k.startswith(start)}

    return Position(step=int(arrays[f"{prefix}.step"]), round=int(arrays[f"{prefix}.round"]),
                    exchange_due=bool(arrays[f"{prefix}.exchange_due"]), loss=float(arrays[f"{prefix}.loss"]),
                    lora=under("lora"), optim=under("optim"))
