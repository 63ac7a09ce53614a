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
from dataclasses import replace
from pathlib import Path

import pytest

from inference.card import DEFAULT_CARD, ModelCard

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


def build_tokenizer(vocab_size: int = 400, *, newline_tokens: bool = False) -> object:
    """A fast BPE tokenizer with Gemma 3's special tokens; digits are single tokens.

    ``newline_tokens`` adds ``\n`` … ``\n\n\n\n`` as tokens, as Gemma's vocabulary has
    them: vLLM's Gemma 3 prompt update looks them up (it merges ``\n`` + ``\n\n`` into
    ``\n\n\n`` by id). Off by default: as added tokens they split the text, and the
    Metaspace decoder then writes ``\n Reasoning`` for ``\nReasoning``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
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
    if newline_tokens:
        tok.add_tokens([AddedToken("\n" * n, normalized=False) for n in (4, 3, 2, 1)])
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


def build_tiny_gemma(
    out: Path, *, seed: int = 0, text_layers: int = 1, hidden: int = 64,
    for_vllm: bool = False,
) -> Path:
    """Write a tiny random Gemma 3 model, tokenizer and processor into ``out``.

    Returns ``out``, a directory ``from_pretrained`` loads like MedGemma's snapshot;
    ``for_vllm`` gives the tokenizer Gemma's newline tokens, which vLLM needs;
    ``hidden`` (the language model's width, its MLP 2×) and ``text_layers`` make a
    step cost what a test needs it to.
    """
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(newline_tokens=for_vllm)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}  # type: ignore[attr-defined]
    vocab = len(tokenizer)  # type: ignore[arg-type]
    config = Gemma3Config(
        text_config={
            "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
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
    to_hub_layout(out)
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


def to_hub_layout(model_dir: Path) -> None:
    """Rename the saved weights to the published MedGemma checkpoint's names.

    transformers 5 saves the SigLIP tower as ``vision_tower.encoder…``; the published
    snapshot (and vLLM's loader) name it ``vision_tower.vision_model.encoder…``, which
    transformers also loads (it strips the ``vision_model`` prefix).
    """
    from safetensors.torch import load_file, save_file

    for path in model_dir.glob("*.safetensors"):
        tensors = load_file(path)
        renamed = {_hub_name(k): v for k, v in tensors.items()}
        if renamed.keys() != tensors.keys():
            save_file(renamed, path, metadata={"format": "pt"})


def _hub_name(key: str) -> str:
    head = "vision_tower."
    if key.startswith(head) and not key.startswith(head + "vision_model."):
        return head + "vision_model." + key[len(head):]
    return key


def tiny_card() -> ModelCard:
    """The default (published) card, with the tiny model's image size and short answers."""
    return replace(DEFAULT_CARD, image_size=TINY_IMAGE_SIZE, max_new_tokens=12)


def build_random_adapter(base: Path, out: Path, *, seed: int = 1, rank: int = 4) -> Path:
    """A random (non-zero) LoRA adapter on the language model's projections, with a card."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base, local_files_only=True)
    config = LoraConfig(
        r=rank, lora_alpha=8 * rank, lora_dropout=0.0, init_lora_weights=False,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|up_proj|down_proj)",
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out))
    tiny_card().save(out)
    return out


def build_merged(base: Path, adapter: Path, out: Path) -> Path:
    """Merge ``adapter`` into the full-precision ``base`` and save a merged model directory."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(base, local_files_only=True)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    to_hub_layout(out)
    AutoProcessor.from_pretrained(base, local_files_only=True).save_pretrained(out)
    replace(tiny_card(), adapter_revision="tiny-adapter-merged").save(out)
    return out


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Gemma 3 model directory with a model card (built once per session)."""
    out = build_tiny_gemma(tmp_path_factory.mktemp("tiny_gemma") / "model")
    tiny_card().save(out)
    return out


@pytest.fixture(scope="session")
def tiny_gemma_vllm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`tiny_gemma_dir` with Gemma's newline tokens, which vLLM needs."""
    out = build_tiny_gemma(tmp_path_factory.mktemp("tiny_gemma_vllm") / "model", for_vllm=True)
    tiny_card().save(out)
    return out


@pytest.fixture(scope="session")
def tiny_vllm_adapter_dir(
    tiny_gemma_vllm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A random LoRA adapter for :func:`tiny_gemma_vllm_dir`, with its card."""
    return build_random_adapter(tiny_gemma_vllm_dir, tmp_path_factory.mktemp("tiny_adapter_v"))


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LoRA adapter for :func:`tiny_gemma_dir`, with its card."""
    return build_random_adapter(tiny_gemma_dir, tmp_path_factory.mktemp("tiny_adapter"))
