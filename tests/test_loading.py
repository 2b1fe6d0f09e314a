"""helpers.loading: the in-memory reference is the model transformers itself loads, tied embeddings included."""

import torch
from transformers import AutoModelForCausalLM

from helpers import checkpoints, loading
from helpers.models import load_config


def tiny_config(**overrides):
    values = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=500)
    values.update(overrides)
    return load_config("llama-2-70b", **values)


def transformers_logits(folder, prompt_tokens=16):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    input_ids = torch.arange(prompt_tokens)[None] % model.config.vocab_size
    with torch.no_grad():
        return model(input_ids).logits[0, -1, :8].float().tolist()


def test_reference_logits_of_a_tied_checkpoint_are_the_ones_from_pretrained_gives(isolated_cache):
    # A tied checkpoint stores the embedding once (no lm_head.weight): without model.tie_weights() after the
    # assign=True loads, lm_head would keep its meta tensor and the forward pass would fail.
    config = tiny_config(tie_word_embeddings=True)
    ck = checkpoints.make_checkpoint(config)
    assert "lm_head.weight" not in checkpoints.read_index(ck.folder)["weight_map"]
    assert loading.reference_logits(config, ck.folder) == transformers_logits(ck.folder)


def test_reference_logits_of_an_untied_checkpoint_are_the_ones_from_pretrained_gives(isolated_cache):
    config = tiny_config()
    ck = checkpoints.make_checkpoint(config)
    assert loading.reference_logits(config, ck.folder) == transformers_logits(ck.folder)


def test_loading_bars_are_switched_off_only_where_asked(monkeypatch):
    import accelerate.utils.modeling as accelerate_modeling
    from transformers.utils import logging as hf_logging

    from helpers.loading import hide_loading_bars, no_accelerate_bars

    original = accelerate_modeling.is_tqdm_available
    with no_accelerate_bars():
        assert accelerate_modeling.is_tqdm_available() is False
    assert accelerate_modeling.is_tqdm_available is original  # the block undid it

    monkeypatch.setattr(accelerate_modeling, "is_tqdm_available", original)  # restored after this test
    enabled = hf_logging.is_progress_bar_enabled()
    try:
        hide_loading_bars()
        hide_loading_bars()  # again: the same state
        assert accelerate_modeling.is_tqdm_available() is False and not hf_logging.is_progress_bar_enabled()
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
