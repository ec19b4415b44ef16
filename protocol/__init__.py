"""The splitlm wire: message dataclasses, tensor codecs, validation. Sans-I/O: bytes in,
typed messages out and back; numpy + msgpack only, no sockets, no event loop.

    frame = encode(Forward(step=0, hidden=h, attention_mask=m, labels=y), seq=7, codec="f16")
    seq, msg = decode(frame, limits=Limits(hidden_size=576, max_batch=8, max_seq_len=2048))

Kinds (class): direction, fields
    hello (Hello)                  c->s  client_id, model_hash, cut, labels, lora_rank,
                                         lora_alpha, lora_targets, codecs, n_samples, resume_step,
                                         mode, train, public_hash
    welcome (Welcome)              s->c  session_id, codec, steps_per_round, round, step,
                                         max_frame_bytes, head_adapter, mode, update_codec,
                                         rounds, topk, global_chunks
    forward (Forward)              c->s  step, hidden (B,T,H), attention_mask (B,T), labels (B,T)|None
    hidden (Hidden)                s->c  step, hidden (B,T,H)              U-shape mode
    tail_grad (TailGrad)           c->s  step, grad (B,T,H), loss          U-shape mode
    backward (Backward)            s->c  step, grad (B,T,H), loss
    adapter (Adapter)              c->s  round, tensors, n_samples         SplitFed round end
    adapter_global (AdapterGlobal) s->c  round, tensors
    update (Update)                c->s  round, chunk, chunks, tensors (deltas), n_samples  fedavg
    global (Global)                s->c  round, chunk, chunks, tensors, delta             fedavg, distill
    logits (Logits)                c<->s round, chunk, chunks, start, indices (N,k), values (N,k),
                                         n_samples                                      distill
    metrics (Metrics)              both  step, values
    error (Error)                  both  code (one of ERROR_CODES), message
    bye (Bye)                      both  reason

Float tensors travel with the session's codecs: activations and their gradients with
welcome.codec, parameters (`Message.parameters`: adapter, adapter_global, update, global) with
welcome.update_codec; `codec_for(msg, ...)` picks. `decode` raises FrameTooLarge or BadMessage (splitlm.errors); each carries `.code`, the
`error` code to answer with ("too_large", "version", "bad_message"); `error_code(exc)` maps
any exception. Decoded f32 / raw arrays are read-only views of the frame.
"""

from .codes import ERROR_CODES, error_code
from .messages import (
    KINDS, Adapter, AdapterGlobal, Backward, Bye, Error, Forward, Global, Hello, Hidden, Logits,
    MODES, TRAIN, Message, Metrics, TailGrad, Update, Welcome, codec_for, decode, encode,
)
from .tensors import CODECS, FLOAT_CODECS, RAW_DTYPES, decode_tensor, encode_tensor
from .validate import PROTOCOL_VERSION, Limits

__all__ = [
    "PROTOCOL_VERSION", "Limits", "encode", "decode", "codec_for", "Message", "KINDS", "MODES", "TRAIN",
    "Hello", "Welcome", "Forward", "Hidden", "TailGrad", "Backward", "Adapter", "AdapterGlobal",
    "Update", "Global", "Logits", "Metrics", "Error", "Bye",
    "CODECS", "FLOAT_CODECS", "RAW_DTYPES", "encode_tensor", "decode_tensor",
    "ERROR_CODES", "error_code",
]
