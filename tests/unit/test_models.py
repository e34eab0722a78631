from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_model
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from ifsteer.chat import BASE_PROMPT_FORMAT
from ifsteer.errors import ModelNotFound, UnsupportedArchitecture
from ifsteer.generation import Sampling, generate
from ifsteer.models import (
    DEFAULT_MODEL,
    WEIGHTS,
    LoadedModel,
    cache_dir,
    checkpoint_tensors,
    find_decoder_layers,
    load_model,
    save_checkpoint,
)
from ifsteer.steering import Steering, steer
from tests.conftest import TINY_VOCAB, make_tiny, tiny_llama_config
from tests.unit.test_vectors import make_vector

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=TINY_VOCAB,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
)
CONFIGS = {
    "llama": lambda: tiny_llama_config(layers=3),
    "mistral": lambda: MistralConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=16),
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=16, sliding_window=8),
    "gemma3": lambda: Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8),
    "phi3": lambda: Phi3Config(**COMMON),
    "gpt2": lambda: GPT2Config(
        n_embd=64,
        n_layer=3,
        n_head=4,
        vocab_size=TINY_VOCAB,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=0,
    ),
}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_layers_found_and_steering_works(arch, tiny_tokenizer):
    lm = make_tiny(CONFIGS[arch](), tiny_tokenizer, model_id=arch)
    assert lm.n_layers == 3 and lm.hidden_size == 64
    v = make_vector(layer=1, model_id=arch, target=1.75)
    seen = {}
    with steer(lm, [Steering(v)]), torch.no_grad():
        # Registered after steer's own hook, so it sees the steered output.
        hook = lm.layers[1].register_forward_hook(
            lambda _m, _i, o: seen.update(h=(o[0] if isinstance(o, tuple) else o))
        )
        lm.model(**lm.encode(["Plan a picnic.", "Why is the sky blue today?"]))
        hook.remove()
    torch.testing.assert_close(
        seen["h"] @ v.direction, torch.full(seen["h"].shape[:2], 1.75), atol=1e-4, rtol=0
    )
    prompts = ["Plan a picnic.", "Why is the sky blue today, and what about sunsets?"]
    rows = [[Steering(v * 2)], []]
    batched = generate(lm, prompts, per_row=rows, sampling=Sampling(max_new_tokens=5))
    alone = [
        generate(lm, [p], steering=r, sampling=Sampling(max_new_tokens=5))[0]
        for p, r in zip(prompts, rows, strict=True)
    ]
    assert [c.text for c in batched] == [c.text for c in alone]


def test_unknown_architecture_is_one_line():
    with pytest.raises(UnsupportedArchitecture, match="cannot find the decoder layers of Linear"):
        find_decoder_layers(torch.nn.Linear(2, 2))


def test_base_model_prompt_format(tiny_lm):
    assert not tiny_lm.is_chat
    assert tiny_lm.format_prompt("Hi?") == BASE_PROMPT_FORMAT.format(prompt="Hi?") == "Q: Hi?\nA:"


def test_chat_template_is_used_when_present(tiny_tokenizer):
    tok = tiny_tokenizer.__class__(
        tokenizer_object=tiny_tokenizer.backend_tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
    )
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    )
    lm = LoadedModel(make_tiny(tiny_llama_config(), tiny_tokenizer).model, tok, "chat")
    assert lm.format_prompt("Hi") == "<user>Hi<assistant>"


def test_left_padding_puts_the_last_prompt_token_last(tiny_lm):
    batch = tiny_lm.encode(["Hi.", "A much longer prompt than the first one."])
    assert batch.attention_mask[0, -1] == 1 and batch.attention_mask[0, 0] == 0


def test_missing_model_is_one_line(tmp_path):
    with pytest.raises(ModelNotFound, match="no model at"):
        load_model(str(tmp_path / "nothing"))
    with pytest.raises(ModelNotFound, match="unknown dtype"):
        load_model("smollm2-135m-instruct", dtype="int3")


def test_local_directory_loads_offline(tmp_path, tiny_lm):
    tiny_lm.model.save_pretrained(tmp_path / "m")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"))
    assert lm.model_id == "m" and lm.n_layers == tiny_lm.n_layers
    batch = lm.encode(["Plan a picnic."])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(**batch).logits, tiny_lm.model(**batch).logits)


def test_bfloat16_load(tmp_path, tiny_lm):
    tiny_lm.model.save_pretrained(tmp_path / "m")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    v = make_vector(layer=1, model_id="m", target=0.5)
    out = generate(
        lm, ["Plan a picnic."], steering=[Steering(v)], sampling=Sampling(max_new_tokens=3)
    )
    assert out[0].completion_tokens <= 3


# --- the converted-model cache ------------------------------------------------------------


@pytest.fixture
def tied_lm(tiny_tokenizer) -> LoadedModel:
    """Like SmolLM2 and Gemma: the output head is the input embedding matrix."""
    config = tiny_llama_config()
    config.tie_word_embeddings = True
    lm = make_tiny(config, tiny_tokenizer, model_id=DEFAULT_MODEL)
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    return lm


def _tensor_names(directory) -> set[str]:
    with safe_open(str(directory / WEIGHTS), framework="pt") as f:
        return set(f.keys())


def _architectures(directory) -> list[str] | None:
    return json.loads((directory / "config.json").read_text()).get("architectures")


def _logits(lm: LoadedModel) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(**lm.encode(["Plan a picnic."])).logits.float()


def test_a_tied_head_is_saved_as_the_embeddings(tmp_path, tied_lm):
    save_checkpoint(tied_lm.model, tied_lm.tokenizer, tmp_path / "m")
    assert _architectures(tmp_path / "m") == ["LlamaForCausalLM"]
    names = _tensor_names(tmp_path / "m")
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    # Read by name, strictly, as vLLM reads a checkpoint: the only key left out is the tied head.
    fresh = AutoModelForCausalLM.from_config(tied_lm.model.config)
    with safe_open(str(tmp_path / "m" / WEIGHTS), framework="pt") as f:
        result = fresh.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    torch.testing.assert_close(fresh.model.embed_tokens.weight, tied_lm.model.lm_head.weight)


def test_an_untied_head_keeps_its_own_tensor(tiny_lm):
    names = set(checkpoint_tensors(tiny_lm.model))
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= names


def test_a_cache_in_the_old_layout_is_upgraded_on_load(tmp_path, monkeypatch, tied_lm):
    monkeypatch.setenv("IFSTEER_HOME", str(tmp_path))
    directory = cache_dir(DEFAULT_MODEL)
    directory.mkdir(parents=True)
    save_model(tied_lm.model, str(directory / WEIGHTS))  # how ifsteer wrote caches before
    tied_lm.model.config.architectures = None  # as a GGUF-loaded config has it
    tied_lm.model.config.save_pretrained(directory)
    tied_lm.tokenizer.save_pretrained(directory)
    assert "lm_head.weight" in _tensor_names(directory)  # the layout vLLM cannot read
    assert "model.embed_tokens.weight" not in _tensor_names(directory)
    assert not _architectures(directory)
    mode = (directory / WEIGHTS).stat().st_mode

    lm = load_model(DEFAULT_MODEL, dtype="bfloat16")
    names = _tensor_names(directory)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert _architectures(directory) == ["LlamaForCausalLM"]
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []
    with safe_open(str(directory / WEIGHTS), framework="pt") as f:  # full precision kept
        embeddings = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(embeddings, tied_lm.model.lm_head.weight.detach())
    torch.testing.assert_close(_logits(lm), _logits(tied_lm), atol=0.1, rtol=0.05)

    assert (directory / WEIGHTS).stat().st_mode == mode  # as readable as before
    stamps = [(directory / f).stat().st_mtime_ns for f in (WEIGHTS, "config.json")]
    again = load_model(DEFAULT_MODEL)
    # upgraded once, then left alone
    assert [(directory / f).stat().st_mtime_ns for f in (WEIGHTS, "config.json")] == stamps
    torch.testing.assert_close(_logits(again), _logits(tied_lm))


def test_a_gguf_conversion_prints_one_line_where_stderr_is_no_terminal(capsys):
    """Issue 17 §3: transformers' tqdm bar redrew into non-tty logs as ~15 lines."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from ifsteer.models import conversion_bars

    def convert() -> None:
        for _ in gguf_utils.tqdm(range(200), desc="Converting and de-quantizing", mininterval=0):
            pass

    convert()
    assert "Converting" in capsys.readouterr().err  # the premise: the bar draws into a log
    with conversion_bars("converting x.gguf (once)"):
        convert()
    err = capsys.readouterr().err
    assert err == "converting x.gguf (once)\n"
    assert gguf_utils.tqdm is not None and "functools" not in repr(gguf_utils.tqdm)
