"""A tiny random Gemma 3 (decoder + SigLIP) with tokenizer and processor, built offline.

The VLM tests and the VLM overhead benchmark run the real engine code on this model: it
has the architecture of MedGemma-4B-IT (``Gemma3ForConditionalGeneration``), the Gemma 3
special tokens and chat template, and the same prompt layout (``<start_of_image>`` +
k² × ``<image_soft_token>`` + ``<end_of_image>``), only with ~100k random parameters.

Constraints (REFERENCES.md "A tiny Gemma 3 for tests"): ``mm_tokens_per_image`` is a
square k² with (image_size / patch_size) divisible by k, and the processor's
``image_seq_length`` equals it.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Side of the square image the tiny vision tower takes (pixels).
TINY_IMAGE_SIZE = 64
_PATCH = 16
_MM_TOKENS = 4  # 2×2 pooled patches of the 4×4 patch grid

SPECIAL_TOKENS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
)

#: Gemma 3's chat template (text and image items in a user turn; "assistant" → "model").
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

_CORPUS = (
    "Evaluate the technical and diagnostic quality of this CT image. Predict a score from 0 "
    "(very poor) to 4 (excellent), and explain your reasoning clearly. Provide both the "
    "numerical score and the explanation in your answer.",
    "Score: 0.0 1.2 2.4 3.6 4.8 5 6 7 8 9\nReasoning: 3/4",
    "Reasoning: the image shows noise, streak artifacts, motion, blur and low contrast. "
    "No beam hardening; the field of view is not truncated. Sharp edges, good detail.",
)


def build_tokenizer(vocab_size: int = 400) -> object:
    """A fast BPE tokenizer with Gemma 3's special tokens; digits are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
            "start_of_turn": "<start_of_turn>",
            "end_of_turn": "<end_of_turn>",
        },
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    return fast


def build_tiny_gemma(out: Path, *, seed: int = 0, text_layers: int = 1) -> Path:
    """Write a tiny random Gemma 3 model, tokenizer and processor into ``out``.

    Returns ``out``, a directory ``from_pretrained`` loads like MedGemma's snapshot.
    """
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}  # type: ignore[attr-defined]
    vocab = len(tokenizer)  # type: ignore[arg-type]
    config = Gemma3Config(
        text_config={
            "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": text_layers, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 1024,
            "sliding_window": 64, "pad_token_id": ids["<pad>"], "bos_token_id": ids["<bos>"],
            "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
        },
        vision_config={
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": TINY_IMAGE_SIZE, "patch_size": _PATCH,
            "model_type": "siglip_vision_model",
        },
        mm_tokens_per_image=_MM_TOKENS,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # initialised to zeros: images would not change the output
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.3)
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    model.save_pretrained(out)
    image_processor = Gemma3ImageProcessorPil(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE, image_seq_length=_MM_TOKENS,
    )
    processor.save_pretrained(out)
    (out / "tiny_gemma.json").write_text(json.dumps({"seed": seed, "vocab": vocab}))
    return out
