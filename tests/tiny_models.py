"""Tiny random HF configs of every supported family, saved locally with `save_pretrained`.

Each entry builds a transformers model whose weights are random but fixed by a seed; tests load the saved
directory with `bild_jax.load_model` and compare against the PyTorch reference.
"""

from __future__ import annotations

import transformers

# name -> (transformers config class name, model class name, config kwargs)
TINY_CONFIGS: dict[str, tuple[str, str, dict]] = {
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)),
    "llama-mha-tied-llama3rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=True, max_position_embeddings=128,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        vocab_size=89, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=4, max_position_embeddings=128)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=103, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_parameters=dict(rope_theta=1000.0),
        use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    # The decoder-only variants: sliding windows of 3-5 tokens (the parity tests run 9-21 token contexts),
    # MQA / GQA / MHA, tied and untied heads, soft-capping that bites (random weights larger than HF's
    # default init, so that scores and logits reach the caps).
    "gemma-mqa": ("GemmaConfig", "GemmaForCausalLM", dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128, hidden_act="gelu",
        initializer_range=0.1)),
    "gemma2-softcap": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=4,
        query_pre_attn_scalar=12, attn_logit_softcapping=1.0, final_logit_softcapping=2.0,
        initializer_range=0.2)),
    "gemma3-untied": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=89, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], query_pre_attn_scalar=12,
        tie_word_embeddings=False, initializer_range=0.1,
        rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=100.0)})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        vocab_size=103, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
        use_sliding_window=True, sliding_window=5, max_window_layers=1, initializer_range=0.1)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, original_max_position_embeddings=128,
        sliding_window=5, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)),
    # GPT2Config defaults bos/eos to 50256, which lies outside a tiny vocabulary.
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)),
    "gpt2-odd": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=131, n_embd=32, n_inner=48, n_layer=3, n_head=2, n_positions=96, activation_function="gelu",
        scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True, bos_token_id=1, eos_token_id=2)),
    "t5-v1.0": ("T5Config", "T5ForConditionalGeneration", dict(
        vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="relu",
        tie_word_embeddings=True, decoder_start_token_id=0, eos_token_id=1)),
    # transformers 5.x ties the lm head of a fresh T5/mT5 whatever `tie_word_embeddings` says; False here only
    # selects v1.1's unscaled decoder output (T5) and mirrors the hub's mT5 configs.
    "t5-v1.1": ("T5Config", "T5ForConditionalGeneration", dict(
        vocab_size=101, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, decoder_start_token_id=0, eos_token_id=1)),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", dict(
        vocab_size=113, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=16, relative_attention_max_distance=32, tie_word_embeddings=False,
        decoder_start_token_id=0, eos_token_id=1)),
    # BART and Marian: encoder and decoder differ in depth, heads and MLP width, so that a mix-up shows. BART's
    # head is tied, Marian's not (transformers 5 then gives the encoder, the decoder and the head a table each).
    # Marian's pad token is its last id and starts the decoder, as in the opus-mt checkpoints.
    "bart": ("BartConfig", "BartForConditionalGeneration", dict(
        vocab_size=97, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=48, max_position_embeddings=64)),
    "marian-untied": ("MarianConfig", "MarianMTModel", dict(
        vocab_size=101, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=64, max_position_embeddings=64,
        scale_embedding=True, tie_word_embeddings=False, activation_function="swish", pad_token_id=100,
        decoder_start_token_id=100, eos_token_id=0)),
}


def build_hf_model(name: str, seed: int = 0):
    """The transformers model of a tiny config, with seeded random weights, in eval mode."""
    import torch

    config_cls, model_cls, kwargs = {**TINY_CONFIGS, **PAIR_CONFIGS}[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config)
    _randomize_norms(model, seed)
    return model.eval()


def _randomize_norms(model, seed: int) -> None:
    """Norm weights start at one and biases (BART's `final_logits_bias` buffer included) at zero in HF; perturb
    them so a wrong norm or bias mapping cannot go unnoticed."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    tensors = [p for p in model.parameters() if p.ndim == 1]
    tensors += [b for name, b in model.named_buffers() if name == "final_logits_bias"]
    with torch.no_grad():
        for tensor in tensors:
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))


# Models used only as BiLD pairs (no parity runs of their own): a GPT-2 small model sharing the
# vocabulary of "llama-gqa", for mixed-family pairs.
PAIR_CONFIGS: dict[str, tuple[str, str, dict]] = {
    "gpt2-v97": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)),
}
