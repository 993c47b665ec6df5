"""The suite's backends inside Hugging Face transformers models (efficient/integrations/hf.py): on
a tiny random Llama (grouped-query) and Mistral (sliding window), every exact backend gives HF's
own logits, left or right padded, and greedy generation the same tokens; approximations give
their error; what a backend cannot honour is refused with the reason."""

from __future__ import annotations

import pytest
import torch
from conftest import skip_unless_available

transformers = pytest.importorskip(
    "transformers", minversion="5.25", reason="needs transformers: pip install -e '.[hf]'"
)

from efficient.attention import Setting, Unsupported  # noqa: E402
from efficient.integrations import hf  # noqa: E402

EXACT = ["full", "sdpa", "chunked", "flex"]
VOCAB, LENGTH = 96, 24


def llama(**kw):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def mistral(window: int):
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=window,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.MistralForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def batch(padding_side: str):
    """Two sequences of LENGTH tokens, the second with 7 pad tokens on ``padding_side``."""
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, LENGTH))
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, :7] = 0 if padding_side == "left" else 1
    mask[1, -7:] = 0 if padding_side == "right" else 1
    return ids, mask


def logits_with(model, implementation: str, ids, mask) -> torch.Tensor:
    model.set_attn_implementation(implementation)
    try:
        with torch.no_grad():
            return model(ids, attention_mask=mask).logits
    finally:
        model.set_attn_implementation("sdpa")


@pytest.fixture(scope="module", autouse=True)
def registered():
    hf.register()
    hf.register("sliding_window", "efficient_sliding_window_8", window=8, block=4)
    hf.register("flex", "efficient_flex_8", window=8)


def skip_unless_runs(name: str) -> None:
    skip_unless_available(name, Setting("cpu", "float32", causal=True, head_dim=32, key_padding_mask=True))


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("name", EXACT)
def test_exact_backends_give_hf_s_logits_on_a_grouped_query_llama(name, padding_side):
    skip_unless_runs(name)
    model, (ids, mask) = llama(), batch(padding_side)
    expected = logits_with(model, "sdpa", ids, mask)
    got = logits_with(model, f"efficient_{name}", ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)
    assert torch.isfinite(got).all()  # padded queries see no key: zeros, never NaN that spreads


@pytest.mark.parametrize("name", ["full", "chunked"])
def test_greedy_generation_gives_hf_s_tokens_through_the_kv_cache(name):
    """Left-padded prompts, then one token at a time against HF's cache (the keys already
    appended when the backend is called: bottom-right causal alignment)."""
    model, (ids, mask) = llama(), batch("left")
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, **settings)
        model.set_attn_implementation(f"efficient_{name}")
        got = model.generate(ids, **settings)
    assert torch.equal(got, expected)


def test_mistral_s_sliding_window_runs_through_a_backend_with_that_window():
    model, (ids, mask) = mistral(window=8), batch("right")
    expected = logits_with(model, "sdpa", ids, mask)
    real = mask.bool()
    got = logits_with(model, "efficient_sliding_window_8", ids, mask)
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)
    with pytest.raises(Unsupported, match="cannot apply this layer's sliding window of 8 keys"):
        logits_with(model, "efficient_full", ids, mask)  # never silently attends beyond the window


def test_flex_with_the_window_gives_mistral_s_logits():
    skip_unless_runs("flex")
    model, (ids, mask) = mistral(window=8), batch("right")
    expected = logits_with(model, "sdpa", ids, mask)
    got = logits_with(model, "efficient_flex_8", ids, mask)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["linear", "performer"])
def test_approximations_run_and_their_error_is_measured_not_hidden(name):
    model, (ids, mask) = llama(), batch("right")
    expected, got = (logits_with(model, impl, ids, mask) for impl in ("sdpa", f"efficient_{name}"))
    error = (got - expected)[mask.bool()].abs().max().item()
    assert torch.isfinite(got).all() and 0 < error < 10


def test_what_a_backend_cannot_honour_is_refused_with_the_reason():
    model, (ids, mask) = llama(), batch("right")
    with pytest.raises(Unsupported, match="linformer has one key/value head per query head"):
        logits_with(model, "efficient_linformer", ids, mask)
    with pytest.raises(Unsupported, match="xl is a whole layer"):
        hf.register("xl")
    with pytest.raises(KeyError, match="valid backends"):
        hf.register("flash")


def test_without_transformers_the_message_says_how_to_get_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[hf\]'"):
        hf.register()
