"""Offline stand-ins for the experiments: a BPE tokenizer trained on the task fixtures, and tiny random T5 and
Llama pairs (large, small, small-aligned) using it, saved in HF format with `save_pretrained`.

    python tests/experiment_fixtures.py OUT_DIR   # writes OUT_DIR/{t5,llama}/{large,small,small-aligned}

The small models are noisy copies of the large one, so that they agree on some tokens; final norms are scaled
up so that random models have confident steps as well as unsure ones (see conftest.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TASK_DATA = Path(__file__).parent / "fixtures" / "paper_tasks"
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2: T5's layout


def fixture_texts() -> list[str]:
    """Every text field of the task fixture files."""
    texts = []

    def collect(value):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)

    for file in sorted(TASK_DATA.glob("*.jsonl")):
        for line in file.read_text().splitlines():
            collect(json.loads(line))
    return texts


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE fast tokenizer that appends </s> like T5's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(fixture_texts(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def _noisy_copy(model, scale: float, seed: int):
    import copy

    import torch

    generator = torch.Generator().manual_seed(seed)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for param in noisy.parameters():
            param.add_(scale * param.std() * torch.randn(param.shape, generator=generator))
    return noisy


def build_pair(kind: str, vocab_size: int, seed: int = 0) -> dict:
    """{"large", "small", "small-aligned"} transformers models of a tiny T5 ("t5") or Llama ("llama")."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if kind == "t5":
        config = transformers.T5Config(
            vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="relu",
            tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        large = transformers.T5ForConditionalGeneration(config)
        with torch.no_grad():
            # Random std-1 tied embeddings make greedy T5 repeat one token; smaller ones give varied outputs.
            large.shared.weight.mul_(0.1)
            large.decoder.final_layer_norm.weight.mul_(50.0)
    elif kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=1, pad_token_id=0)
        large = transformers.LlamaForCausalLM(config)
        with torch.no_grad():
            large.model.norm.weight.mul_(50.0)
    else:
        raise ValueError(f"unknown pair kind {kind!r}")
    return {"large": large.eval(), "small": _noisy_copy(large, 0.3, seed + 1).eval(),
            "small-aligned": _noisy_copy(large, 0.1, seed + 2).eval()}


def save_pairs(out_dir: Path) -> dict[str, dict[str, Path]]:
    """Writes the tokenizer and both pairs under `out_dir`; returns {kind: {role: directory}}."""
    tokenizer = build_tokenizer()
    saved = {}
    for kind in ("t5", "llama"):
        saved[kind] = {}
        for role, model in build_pair(kind, len(tokenizer)).items():
            directory = Path(out_dir) / kind / role
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            saved[kind][role] = directory
    return saved


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} OUT_DIR")
    for kind, roles in save_pairs(Path(sys.argv[1])).items():
        print(kind, " ".join(f"{role}={path}" for role, path in roles.items()))
