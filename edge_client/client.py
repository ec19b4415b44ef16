"""`splitlm edge`: train this device's part of the model against a splitlm server.

One step, labels at the server (one round trip):
    head.onnx -> forward{h_K, mask, labels} -> ... backward{dL/dh_K, loss} -> head_grad.onnx -> AdamW
One step, labels on the device (U-shape: no token id or label leaves the device):
    head.onnx -> forward{h_K, mask} -> hidden{h_N} -> tail.onnx -> tail_grad{dL/dh_N, loss}
              -> backward{dL/dh_K} -> head_grad.onnx -> AdamW
Every R steps: adapter{round, lora, n_samples} -> adapter_global{round, averaged lora}.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from splitlm.errors import SplitLMError
from splitlm.manifest import Bundle
from splitlm.protocol import (FLOAT_CODECS, Adapter, AdapterGlobal, Backward, Bye, Error, Forward, Hello,
                              Hidden, Limits, TailGrad, Welcome, decode, encode)

from .data import Dataset
from .meter import Meter
from .optim import AdamW
from .runtime import HeadRuntime


@dataclass(frozen=True)
class EdgeConfig:
    url: str
    bundle: Path
    data: Path
    steps: int | None = None        # total steps; None: `epochs` passes over the data
    epochs: int = 1
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 1e-3                # AdamW, as the server's: betas (0.9, 0.999), eps 1e-8, no weight decay
    seed: int = 0                   # data order
    client_id: str = "edge"
    metrics_out: Path | None = None
    threads: int = 0                # onnxruntime intra-op threads; 0 = its default
    progress: bool | None = None    # None: a bar when stderr is a terminal


class ServerError(SplitLMError):
    """The server answered with an `error` message."""


class EdgeClient:
    """One device's training loop over one websocket connection."""

    def __init__(self, cfg: EdgeConfig):
        self.cfg = cfg
        self.bundle = Bundle.open(cfg.bundle)
        m = self.bundle.manifest
        self.data = Dataset.from_file(cfg.data, self.bundle, seq_len=min(cfg.seq_len, m.max_length),
                                      batch_size=cfg.batch_size, seed=cfg.seed)
        self.runtime = HeadRuntime(self.bundle, threads=cfg.threads)
        self.lora = self.bundle.lora_init()
        self.optim = AdamW(lr=cfg.lr)
        self.meter = Meter(metrics_out=cfg.metrics_out)
        self.limits = Limits(hidden_size=m.model.hidden_size)
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * self.data.steps_per_epoch
        self._seq = itertools.count()
        self.codec = "f32"
        self.round = 0

    # ------------------------------------------------------------------ wire

    async def _send(self, ws: ClientConnection, msg) -> None:
        frame = encode(msg, seq=next(self._seq), codec=self.codec)
        self.meter.count_up(len(frame))
        await ws.send(frame)

    async def _recv(self, ws: ClientConnection, *expected: type):
        with self.meter.wait():
            frame = await ws.recv()
        self.meter.count_down(len(frame))
        _, msg = decode(frame, limits=self.limits)
        if isinstance(msg, Error):
            raise ServerError(f"server error ({msg.code}): {msg.message}")
        if not isinstance(msg, expected):
            raise ServerError(f"expected {' or '.join(t.kind for t in expected)} from the server, got {msg.kind!r}")
        return msg

    async def _hello(self, ws: ClientConnection) -> Welcome:
        m = self.bundle.manifest
        await self._send(ws, Hello(client_id=self.cfg.client_id, model_hash=m.model.hash, cut=m.cut,
                                   labels=m.labels, lora_rank=m.lora.rank, lora_alpha=m.lora.alpha,
                                   lora_targets=m.lora.targets, codecs=FLOAT_CODECS,
                                   n_samples=self.data.n_samples, resume_step=None))
        welcome = await self._recv(ws, Welcome)
        self.codec, self.round = welcome.codec, welcome.round
        self.limits = Limits(max_frame_bytes=welcome.max_frame_bytes, hidden_size=m.model.hidden_size)
        if welcome.head_adapter:
            self._adopt(welcome.head_adapter)
        return welcome

    def _adopt(self, tensors: dict[str, np.ndarray]) -> None:
        self.lora = {name: np.array(tensors[name], np.float32) for name in self.lora}

    # ------------------------------------------------------------------ training

    async def train_step(self, ws: ClientConnection, step: int) -> float:
        batch = self.data.batch(step)  # input_ids, attention_mask, labels: (B, T)
        on_device = self.bundle.manifest.labels == "device"
        with self.meter.compute():
            h_k = self.runtime.forward(batch.input_ids, batch.attention_mask, self.lora)  # (B, T, H)
        # 5 bytes a token beside the activations: the mask as uint8, labels as int32.
        await self._send(ws, Forward(step=step, hidden=h_k, attention_mask=batch.attention_mask.astype(np.uint8),
                                     labels=None if on_device else batch.labels.astype(np.int32)))
        if on_device:
            hidden = await self._recv(ws, Hidden)
            with self.meter.compute():
                loss, grad_n = self.runtime.tail(hidden.hidden, batch.labels, batch.attention_mask)
            await self._send(ws, TailGrad(step=step, grad=grad_n, loss=float(loss)))
        backward = await self._recv(ws, Backward)
        with self.meter.compute():
            grads = self.runtime.lora_grads(batch.input_ids, batch.attention_mask, backward.grad, self.lora)
            self.optim.step(self.lora, grads)
        return float(backward.loss)

    async def end_round(self, ws: ClientConnection) -> None:
        await self._send(ws, Adapter(round=self.round, tensors=self.lora, n_samples=self.data.n_samples))
        reply = await self._recv(ws, AdapterGlobal)
        self._adopt(reply.tensors)
        self.round = reply.round

    async def run(self) -> dict:
        async with connect(self.cfg.url, max_size=None, compression=None, ping_interval=20,
                           ping_timeout=120) as ws:
            welcome = await self._hello(ws)
            steps = range(welcome.step, self.total_steps)
            for step in self._progress(steps):
                loss = await self.train_step(ws, step)
                if (step + 1) % welcome.steps_per_round == 0:
                    await self.end_round(ws)  # its bytes count in the step that closes the round
                self.meter.end_step(step=step, loss=loss)
            await self._send(ws, Bye(reason="done"))
        return self.meter.summary()

    def _progress(self, steps):
        show = self.cfg.progress if self.cfg.progress is not None else sys.stderr.isatty()
        if not show:
            return steps
        from tqdm import tqdm

        return tqdm(steps, desc=f"{self.cfg.client_id}", unit="step")
