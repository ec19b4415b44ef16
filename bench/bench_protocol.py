"""Decode cost of a 2.4 MB f32 activation frame: splitlm.protocol vs msgpack.unpackb.

    python bench/bench_protocol.py

`parse only` is the zero-copy walk plus np.frombuffer; `decode` adds every check (header,
shapes, the finite-values scan of 590k floats). `unpackb` copies the payload and checks nothing.
"""

from __future__ import annotations

import timeit

import msgpack
import numpy as np

from splitlm import protocol as p
from splitlm.protocol.reader import read_frame

B, T, H = 4, 256, 576  # 589,824 floats = 2.36 MB


def best_ms(fn, *, number: int = 200, repeat: int = 7) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e3


def main() -> None:
    rng = np.random.default_rng(0)
    msg = p.Forward(step=1, hidden=rng.standard_normal((B, T, H), dtype=np.float32),
                    attention_mask=np.ones((B, T), np.int64), labels=None)
    frame = p.encode(msg, seq=0, codec="f32")
    limits = p.Limits(hidden_size=H)

    def parse_only():
        raw = read_frame(memoryview(frame))
        return p.decode_tensor(raw["hidden"], where="hidden")

    times = {
        "msgpack.unpackb": best_ms(lambda: msgpack.unpackb(frame)),
        "parse only (zero-copy)": best_ms(parse_only),
        "decode (all checks)": best_ms(lambda: p.decode(frame, limits=limits)),
        "encode f32": best_ms(lambda: p.encode(msg, seq=0, codec="f32"), number=50),
        "encode f16": best_ms(lambda: p.encode(msg, seq=0, codec="f16"), number=20),
        "encode q8": best_ms(lambda: p.encode(msg, seq=0, codec="q8"), number=10),
    }
    print(f"frame: {len(frame) / 1e6:.2f} MB, hidden {B}x{T}x{H} f32")
    for name, ms in times.items():
        print(f"  {name:24s} {ms:8.4f} ms")
    base = times["msgpack.unpackb"]
    print(f"unpackb / parse only: {base / times['parse only (zero-copy)']:.1f}x")
    print(f"unpackb / decode:     {base / times['decode (all checks)']:.2f}x")


if __name__ == "__main__":
    main()
