"""Tiny random-initialised checkpoints in standard Hugging Face format, for tests and the demo.

The checkpoints are written exactly as a real one is (``config.json``, ``model.safetensors``,
``generation_config.json``, tokenizer and processor files), so the code under test loads them with
the same ``AutoProcessor.from_pretrained`` / ``AutoModelForImageTextToText.from_pretrained`` calls it
uses for Llama-3.2-11B-Vision-Instruct or a LLaVA model.

The tokenizer is a small byte-level BPE trained on an in-code corpus, laid out on Llama 3's id
space: bytes at 0..255 in GPT-2 order, a few pinned ids that recipes hard-code (``"\\n\\n"``=271,
``user``=882, ``system``=9125, ``assistant``=78191), the other learned tokens from 256 upward,
unreachable placeholders up to 127999, Llama 3's special tokens at 128000..128255 and ``<|image|>``
at 128256.

Example:
    >>> from cotune.demo.tiny import build_tiny_mllama
    >>> path = build_tiny_mllama("/tmp/tiny-mllama", seed=0)
"""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaProcessor,
    MllamaTextConfig,
    MllamaVisionConfig,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

from cotune.demo.real_layout import write_real_layout
from cotune.demo.synthetic import sample_texts

BOS_ID, PAD_ID, IMAGE_ID = 128000, 128004, 128256
EOS_IDS = [128001, 128008, 128009]
NUM_BASE_TOKENS = 128000  # Llama 3's BPE vocabulary size; special tokens follow it
LLAVA_IMAGE_TOKEN = "<image>"

# Llama 3's pre-tokenizer split pattern (tiktoken cl100k style).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Ordinary tokens whose Llama 3 ids recipes hard-code (byte-level spelling -> id).
PINNED_TOKENS = {"ĊĊ": 271, "user": 882, "system": 9125, "assistant": 78191}

# Llama 3.1+ named special tokens; the other ids in 128000..128255 are <|reserved_special_token_N|>.
_NAMED_SPECIALS = {
    128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
    128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>",
    128009: "<|eot_id|>", 128010: "<|python_tag|>",
}  # fmt: skip

# Llama 3 turns: string content verbatim; list content as image placeholders and text items, in order.
_TURNS_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- 'IMAGE_TOKEN' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# Renders as Llama-3.2-11B-Vision-Instruct's template does for string or [{"type": "image"|"text"}]
# content (tools aside): the system preamble appears only in conversations without images.
MLLAMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if date_string is not defined -%}"
    "{%- if strftime_now is defined -%}{%- set date_string = strftime_now('%d %b %Y') -%}"
    "{%- else -%}{%- set date_string = '26 Jul 2024' -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- set system_message = '' -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system_message = messages[0]['content'] | trim -%}"
    "{%- else -%}{%- set system_message = messages[0]['content'][0]['text'] | trim -%}{%- endif -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- set ns = namespace(has_images=false) -%}"
    "{%- for message in messages -%}{%- if message['content'] is not string -%}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{%- set ns.has_images = true -%}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
    "{%- if ns.has_images and system_message != '' -%}"
    "{{- raise_exception('Prompting with images is incompatible with system messages.') -}}"
    "{%- endif -%}"
    "{%- if not ns.has_images -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n' -}}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' + system_message + '<|eot_id|>' -}}"
    "{%- endif -%}" + _TURNS_TEMPLATE.replace("IMAGE_TOKEN", "<|image|>")
)

# The same turn format for LLaVA, without the system preamble; image items become <image>.
LLAVA_CHAT_TEMPLATE = "{{- bos_token -}}" + _TURNS_TEMPLATE.replace("IMAGE_TOKEN", LLAVA_IMAGE_TOKEN)

_WORDS = """
the be to of and a in that have I it for not on with he as you do at this but his by from they we say her she or
an will my one all would there their what so up out if about who get which go me when make can like time no just
him know take people into year your good some could them see other than then now look only come its over think
also back after use two how our work first well way even new want because any these give day most us is was were
been has had did does said made went done am being very much more many such here where why yes image picture photo
colour color shape count number how many what which answer question left right top bottom center centre middle
corner above below next between near far small large big tiny huge red green blue yellow purple orange black white
grey gray pink brown circle square triangle star rectangle zero one two three four five six seven eight nine ten
eleven twelve twenty hundred thousand none each every both total together only single pair group row column side
edge background foreground object let step first second third finally therefore thus since given need carefully
description caption summary reasoning conclusion final correct wrong true false user assistant system model text
write read say tell ask help please thank thanks sorry hello world today date knowledge cutting december july
january june monday friday morning evening night water food house city country school family friend child man woman
life hand part place case week point government company problem fact group area money story month lot right study
book eye job word business issue kind head service room mother father team minute idea body information nothing
ago power line end member law car name president war history party result change reason research girl guy moment
air teacher force education foot boy age policy everything process music market sense nation plan college interest
death experience effect class control care field development role effort rate heart drug show leader light voice
police mind price report decision son view relationship town road arm difference value building action model season
society tax director position player record paper space ground form event official matter center couple site
project activity table machine computer data file code list example test train training loss learning network
"""
_VERBS = """count show look describe contain answer ask think need place move turn draw paint fill mark find point
start finish help work play call try keep hold bring happen provide sit stand lose pay meet include continue learn
lead understand watch follow stop create speak allow add spend grow open walk win offer remember love consider appear
buy wait serve die send expect build stay fall cut reach kill remain suggest raise pass sell require decide return
explain hope develop carry break receive agree support hit produce eat cover catch identify notice compare"""
_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
_SHAPES = ["circle", "square", "triangle", "star", "rectangle"]
_POSITIONS = ["left", "right", "top", "bottom", "center", "top left", "bottom right"]


def _byte_alphabet() -> list[str]:
    """Returns the 256 byte-level characters in GPT-2 / Llama 3 id order (printable bytes first)."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    others = [b for b in range(256) if b not in printable]  # mapped to U+0100 onwards, in byte order
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _training_corpus() -> list[str]:
    """Returns a deterministic English corpus covering the synthetic shapes dataset's vocabulary."""
    verbs = _VERBS.split()
    inflected = [v + e for v in verbs for e in ("s", "ed", "ing", "er")]
    nouns = _WORDS.split()[150:] + _SHAPES + ["shape", "colour", "color", "image", "answer"]
    plurals = [w + "s" for w in nouns]
    words = _WORDS.split() + verbs + inflected + plurals
    rng = random.Random(0)
    numbers = " ".join(str(n) for n in range(1000))
    lines = [numbers, numbers, " ".join(words), " ".join(map(str.capitalize, words)), " ".join(words).upper()]
    ends = [".", "?", "!", ",", ":", ";", "...", "\n"]
    for _ in range(1500):
        sentence = " ".join(rng.sample(words, 10))
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice(ends))
    for colour, shape, n in itertools.product(_COLOURS, _SHAPES, range(11)):
        where = _POSITIONS[n % len(_POSITIONS)]
        lines += [
            f"The image shows {n} {colour} {shape}{'s' * (n != 1)} at the {where}.",
            f"How many {colour} {shape}s are there? There are {n} ({n * 3 % 7}).",
            f"<SUMMARY>I will count the {colour} {shape}s.</SUMMARY>\n\n<CAPTION>A {colour} {shape} "
            f"is on the {where}.</CAPTION>\n<REASONING>Which colour is it? It's {colour}; {n} + 1 = {n + 1}."
            f"</REASONING>\n<CONCLUSION>{n}</CONCLUSION>",
            f'Question: What colour is the {shape} on the {where}? Answer: "{colour}". (#{n * 7}) [ok] {{x}}',
        ]
    return lines + sample_texts()


def _train_bpe(num_merges: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Trains byte-level BPE on the corpus; returns learned tokens (in merge order) and merges."""
    alphabet = _byte_alphabet()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + num_merges, min_frequency=2, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # The trainer's ids follow merge order (and are reproducible run to run).
    learned = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if t not in set(alphabet)]
    return learned, merges


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )


def _layout_vocab(learned: list[str]) -> dict[str, int]:
    """Places bytes, pinned and learned tokens on Llama 3's ids; fills the rest with placeholders."""
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    vocab.update(PINNED_TOKENS)
    free = (i for i in itertools.count(256) if i not in PINNED_TOKENS.values())
    for token in learned:
        if token not in vocab:
            vocab[token] = next(free)
    used = set(vocab.values())
    # Placeholders keep the id space dense (tokenizers assigns added-token ids after len(vocab)); no
    # merge produces them and the pre-tokenizer never yields them whole, so they are unreachable.
    vocab.update({f"<|tiny_unused_{i}|>": i for i in range(NUM_BASE_TOKENS) if i not in used})
    return vocab


def _special_tokens() -> list[str]:
    """Returns Llama 3's 256 special tokens, in id order from 128000."""
    reserved = (f"<|reserved_special_token_{i}|>" for i in itertools.count())
    return [_NAMED_SPECIALS.get(i) or next(reserved) for i in range(NUM_BASE_TOKENS, NUM_BASE_TOKENS + 256)]


def build_tiny_tokenizer(num_merges: int = 4000) -> PreTrainedTokenizerFast:
    """Builds a byte-level BPE fast tokenizer on Llama 3's id layout with ``<|image|>`` at 128256.

    Like Llama 3's, it prepends one ``<|begin_of_text|>`` when ``add_special_tokens=True`` and
    nothing otherwise; it round-trips any text and supports offset mappings.

    Args:
        num_merges: Upper bound on learned merges (the corpus may support fewer).

    Returns:
        The tokenizer, with bos ``<|begin_of_text|>``, eos ``<|eot_id|>``, pad
        ``<|finetune_right_pad_id|>`` and the Llama-3.2-Vision chat template.
    """
    learned, merges = _train_bpe(num_merges)
    model = models.BPE(vocab=_layout_vocab(learned), merges=merges, ignore_merges=True, fuse_unk=False)
    tok = Tokenizer(model)
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    bos = _NAMED_SPECIALS[BOS_ID]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, BOS_ID)]
            ),
        ]
    )
    specials = [*_special_tokens(), "<|image|>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if tok.token_to_id("<|image|>") != IMAGE_ID:  # added tokens take ids after the base vocab
        raise RuntimeError(f"<|image|> got id {tok.token_to_id('<|image|>')}, expected {IMAGE_ID}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=_NAMED_SPECIALS[128009],
        pad_token=_NAMED_SPECIALS[PAD_ID],
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        chat_template=MLLAMA_CHAT_TEMPLATE,
    )


# Bumped whenever a change to the builders changes what they write (weights, tokenizer, processor).
BUILDER_VERSION = 5
BUILD_MARKER = "cotune_tiny.json"


def _save(model: torch.nn.Module, processor: ProcessorMixin, out_dir: Path) -> Path:
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_IDS, pad_token_id=PAD_ID)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / BUILD_MARKER).write_text(json.dumps({"builder_version": BUILDER_VERSION}) + "\n")
    return out_dir


def is_current_build(model_dir: str | Path) -> bool:
    """True when ``model_dir`` holds a tiny checkpoint written by this version of the builders."""
    try:
        marker = json.loads((Path(model_dir) / BUILD_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("builder_version") == BUILDER_VERSION


OUTPUT_HEAD_STD = 0.5
# tanh(1.0) = 0.76: the gates let most of what they guard through, as in trained checkpoints
OPEN_GATE = 1.0
# The gates of Mllama that a freshly initialised model has at (or near) zero and a trained one open:
# the cross-attention gates (at 0 no image reaches the text), the vision tower's tile-position and
# positional-embedding gates (at 0 tiles carry no position) and the global encoder layers' gates.
MLLAMA_GATES = re.compile(
    r".*(cross_attn_attn_gate|cross_attn_mlp_gate|positional_embedding\.gate|global_transformer\..*gate_(attn|ffn))"
)


def _unreachable_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids no text produces: the id-space fillers and Llama 3's reserved special tokens."""
    prefixes = ("<|tiny_unused_", "<|reserved_special_token_")
    return sorted(i for t, i in tokenizer.get_vocab().items() if t.startswith(prefixes))


def _init_seeded(
    model_cls: type,
    config: PreTrainedConfig,
    seed: int,
    dtype: torch.dtype,
    unreachable: list[int],
    open_gates: re.Pattern = re.compile("(?!)"),
) -> torch.nn.Module:
    # A forked RNG keeps the caller's global torch RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        # Output rows shape what an adapter can learn. With 64 dimensions and the usual 0.02-std
        # rows, no hidden state can lift a token's logit more than ~1.3 above the rest, so even a
        # perfect adapter could not bring the loss below ~10 nats; trained checkpoints have large
        # rows for real tokens and near-zero rows for ids that never occur in text. The tiny model
        # gets the same shape: wide random rows for reachable tokens, zero rows for the rest.
        head = model.get_output_embeddings().weight
        torch.nn.init.normal_(head, std=OUTPUT_HEAD_STD)
        with torch.no_grad():
            head[torch.tensor(unreachable, dtype=torch.long)] = 0.0
            # Gates a trained checkpoint has open; a random model built by transformers has them shut.
            for name, param in model.named_parameters():
                if open_gates.fullmatch(name):
                    param.fill_(OPEN_GATE)
        return model.to(dtype)


def _mllama_config(
    hidden_size: int,
    num_layers: int,
    cross_attention_layers: tuple[int, ...],
    vocab_size: int,
    image_size: int,
    vision_width: int,
    intermediate_size: int | None,
) -> MllamaConfig:
    """The tiny Mllama's config (see ``build_tiny_mllama`` for the shapes)."""
    intermediate_layers = [0, 1]
    vision = MllamaVisionConfig(
        hidden_size=vision_width,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=4,
        intermediate_size=2 * vision_width,
        image_size=image_size,
        patch_size=8,
        max_num_tiles=4,
        intermediate_layers_indices=intermediate_layers,
        vision_output_dim=vision_width * (len(intermediate_layers) + 1),  # final + intermediate features
    )
    text = MllamaTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=intermediate_size or 2 * hidden_size,
        cross_attention_layers=list(cross_attention_layers),
        bos_token_id=BOS_ID,
        eos_token_id=EOS_IDS,
        pad_token_id=PAD_ID,
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID)


def build_tiny_mllama(
    out_dir: str | Path,
    seed: int = 0,
    *,
    hidden_size: int = 64,
    num_layers: int = 4,
    cross_attention_layers: tuple[int, ...] = (2,),
    vocab_size: int = 128256,
    image_size: int = 32,
    vision_width: int = 64,
    dtype: torch.dtype = torch.float32,
    intermediate_size: int | None = None,
    real_layout: bool = False,
) -> Path:
    """Writes a tiny random Llama-3.2-Vision (Mllama) checkpoint and its processor to ``out_dir``.

    Text: ``num_layers`` decoder layers (cross-attention ones included), 4 heads, 2 kv heads, MLP
    ``2 * hidden_size`` unless ``intermediate_size`` is given. Vision: width ``vision_width``, 2 local + 1 global layers, patch 8, tiles of
    ``image_size`` pixels, up to 4 tiles. The image processor is the PIL one (no torchvision needed).

    Built like a trained checkpoint where tests rely on it: the gates that a fresh model has at 0
    (cross-attention, tile and patch position, global encoder layers) are open (``OPEN_GATE``), so
    images reach the logits. The defaults are the shape that learned the demo's colour questions
    from the pixels fastest on CPU (see BENCHMARKS.md): with the cross-attention layer first after
    one text layer (index 1 of 4) the same 400 steps reached 60% instead of 88%, and a 64-wide
    vision tower beat a 32-wide one.

    Args:
        out_dir: Directory to write; created if missing.
        seed: Seed for the weights; the same seed gives bitwise identical safetensors.
        hidden_size: Text hidden size.
        num_layers: Text decoder layers, cross-attention layers included.
        cross_attention_layers: Indices of the cross-attention layers.
        vocab_size: Output vocabulary (the input embedding has 8 more rows, as in Mllama).
        image_size: Tile side in pixels.
        dtype: Dtype the weights are stored in.
        intermediate_size: Text MLP width (default ``2 * hidden_size``).
        real_layout: tokenizer, generation and template files as Llama-3.2-11B-Vision-Instruct's
            (``cotune.demo.real_layout``).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    config = _mllama_config(
        hidden_size, num_layers, cross_attention_layers, vocab_size, image_size, vision_width, intermediate_size
    )  # fmt: skip
    tokenizer = build_tiny_tokenizer()
    model = _init_seeded(
        MllamaForConditionalGeneration, config, seed, dtype, _unreachable_ids(tokenizer), MLLAMA_GATES
    )
    image_processor = MllamaImageProcessorPil(
        size={"height": image_size, "width": image_size}, max_image_tiles=4
    )
    processor = MllamaProcessor(image_processor, tokenizer, chat_template=MLLAMA_CHAT_TEMPLATE)
    path = _save(model, processor, Path(out_dir))
    return write_real_layout(path) if real_layout else path


def _llava_config(
    vocab_size: int, image_token_id: int, hidden_size: int, num_layers: int, image_size: int
) -> LlavaConfig:
    """The tiny LLaVA's config (see ``build_tiny_llava`` for the shapes)."""
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden_size,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_IDS,
        pad_token_id=PAD_ID,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=8, projection_dim=32,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=(image_size // 8) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def build_tiny_llava(
    out_dir: str | Path,
    seed: int = 0,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = 32,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Writes a tiny random LLaVA checkpoint (Llama backbone, CLIP vision tower) and its processor.

    The tokenizer is :func:`build_tiny_tokenizer` plus an ``<image>`` special token at 128257
    (``config.image_token_index``); the processor expands each ``<image>`` into
    ``(image_size // 8) ** 2`` copies, one per CLIP patch (the CLS feature is dropped).

    Args:
        out_dir: Directory to write; created if missing.
        seed: Seed for the weights; the same seed gives bitwise identical safetensors.
        hidden_size: Text hidden size (4 heads, 2 kv heads, MLP ``2 * hidden_size``).
        num_layers: Text decoder layers.
        image_size: Image side in pixels (CLIP: width 32, 2 layers, patch 8).
        dtype: Dtype the weights are stored in.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [LLAVA_IMAGE_TOKEN]})
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    config = _llava_config(
        len(tokenizer),
        tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
        hidden_size,
        num_layers,
        image_size,
    )
    model = _init_seeded(LlavaForConditionalGeneration, config, seed, dtype, _unreachable_ids(tokenizer))
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=LLAVA_IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" strategy
    )
    return _save(model, processor, Path(out_dir))
