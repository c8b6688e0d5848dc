"""The bundled synthetic LLaVA-CoT dataset: coloured shapes with four-stage answers.

Each sample is a small PIL-drawn picture of 1-4 shapes (all different) in distinct colours at
distinct positions, a templated question about it, and an answer in LLaVA-CoT's
``<SUMMARY> ... <CAPTION> ... <REASONING> ... <CONCLUSION>`` format whose content follows from
the drawn scene. Records use the LLaVA-CoT-100k JSONL layout plus three extra fields: ``answer``
(the gold short answer of the first turn) and ``task`` (what it asks about), for evaluation, and
``meta`` (the scene and task, for tests and debugging). Everything is deterministic given the seed, down to the PNG bytes.

Example:
    >>> paths = write_synthetic_dataset("demo_out/data", n_train=400, n_test=40)
    >>> sorted(paths)
    ['images', 'test', 'train']
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {
    "white": (255, 255, 255),
    "light grey": (235, 235, 235),
    "cream": (250, 245, 225),
    "pale blue": (230, 240, 250),
}
# Centres as fractions of the image size. Neighbours are 0.3 apart; radius 0.12 and jitter 0.02 keep a gap.
POSITIONS = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
TASKS = ("count", "colour", "shape", "position", "exists")
FOLLOW_UP_RATE = 0.1
MULTIPLE_CHOICE_RATE = 0.3

_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_WHERE["center"] = "in the center"
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
_OUTLINE = {
    "circle": "a smooth round edge",
    "square": "four equal sides and four right angles",
    "triangle": "three straight sides and three corners",
    "star": "five pointed tips",
}
_QUESTIONS = {
    "count": ("How many shapes are in the image?", "How many shapes can you see in this picture?"),
    "colour": ("What colour is the {shape}?", "Which colour does the {shape} have?"),
    "shape": ("Which shape is {colour}?", "What is the shape of the {colour} object?"),
    "position": ("Where is the {colour} {shape}?", "In which part of the image is the {colour} {shape}?"),
    "exists": ("Is there a {shape} in the image?", "Does the image contain a {shape}?"),
}
_ANSWER_HINTS = {
    "count": " Answer with a number.",
    "position": " Answer with left, right, top, bottom or center.",
    "exists": " Answer yes or no.",
}
_SUMMARIES = {
    "count": "I will identify every distinct shape in the image and count them to find the total.",
    "colour": "I will find the {shape} in the image and report the colour it is filled with.",
    "shape": "I will locate the {colour} object in the image and name the shape its outline forms.",
    "position": "I will locate the {colour} {shape} and report which part of the image it sits in.",
    "exists": "I will list the shapes in the image and check whether a {shape} is among them.",
}

Scene = dict  # {"background": str, "shapes": [{"shape": str, "colour": str, "position": str}, ...]}


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def random_scene(
    rng: random.Random, max_shapes: int = 4, positions: tuple[str, ...] = tuple(POSITIONS)
) -> Scene:
    """Draws a scene description: background and 1-``max_shapes`` shapes, all different in kind, colour and place.

    ``positions`` are the places a shape may take (at least ``max_shapes`` of ``POSITIONS``).
    """
    n = rng.randint(1, max_shapes)
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(sorted(COLOURS), n)
    positions = rng.sample(sorted(positions), n)
    items = [{"shape": s, "colour": c, "position": p} for s, c, p in zip(shapes, colours, positions)]
    return {"background": rng.choice(sorted(BACKGROUNDS)), "shapes": items}


def draw_scene(
    scene: Scene, image_size: int, rng: random.Random | None = None, radius: float = 0.12
) -> Image.Image:
    """Renders a scene as an RGB image without anti-aliasing (every shape pixel has its exact colour).

    Args:
        scene: The output of :func:`random_scene`.
        image_size: Width and height in pixels.
        rng: If given, each shape is jittered by up to 2% of the image size.
        radius: Shape radius as a fraction of the image size (over 0.13 only for one shape: neighbours
            would touch).

    Returns:
        An ``image_size`` x ``image_size`` RGB image.
    """
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(image)
    radius = radius * image_size
    for item in scene["shapes"]:
        fx, fy = POSITIONS[item["position"]]
        if rng is not None:
            fx, fy = fx + rng.uniform(-0.02, 0.02), fy + rng.uniform(-0.02, 0.02)
        cx, cy, fill = fx * image_size, fy * image_size, COLOURS[item["colour"]]
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if item["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif item["shape"] == "square":
            draw.rectangle(box, fill=fill)
        elif item["shape"] == "triangle":
            draw.polygon(
                [(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=fill
            )
        else:  # star: ten points alternating between the outer and the inner radius
            points = []
            for k in range(10):
                r = radius if k % 2 == 0 else radius * 0.45
                angle = -math.pi / 2 + k * math.pi / 5
                points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
            draw.polygon(points, fill=fill)
    return image


# The caption lists shapes in reading order, place first: what to say next depends only on the
# picture (a random order would make the caption a guess), and naming the place before the shape
# tells the model where to look for the colour and the outline it writes next.
READING_ORDER = ("top", "left", "center", "right", "bottom")


def _caption(scene: Scene) -> str:
    items = sorted(scene["shapes"], key=lambda i: READING_ORDER.index(i["position"]))
    noun = "shape" if len(items) == 1 else "shapes"
    parts = [f"{_WHERE[i['position']]}, {_a(i['colour'])} {i['shape']}" for i in items]
    return f"The image shows {_NUMBER_WORDS[len(items)]} {noun} on {_a(scene['background'])} background: {'; '.join(parts)}."


def _free_form(rng: random.Random, scene: Scene, task: str) -> tuple[str, str, str, str, list[str]]:
    """Returns (question, answer, summary, reasoning, option pool) for one task about the scene."""
    items = scene["shapes"]
    item = rng.choice(items)
    shape, colour, where = item["shape"], item["colour"], _WHERE[item["position"]]
    listed = _join([f"the {i['colour']} {i['shape']}" for i in items])
    present = f"The shapes in the image are {listed}." if len(items) > 1 else f"The only shape is {listed}."
    if task == "count":
        answer, pool = str(len(items)), ["1", "2", "3", "4"]
        total = f"there are {answer} shapes" if len(items) > 1 else "there is 1 shape"
        reasoning = f"Going through the image one object at a time, I see {listed}. So {total} in total."
    elif task == "colour":
        answer, pool = colour, sorted(COLOURS)
        reasoning = f"There is exactly one {shape} in the image, located {where}. Its fill is {colour}, so the {shape} is {colour}."
    elif task == "shape":
        answer, pool = shape, list(SHAPES)
        reasoning = f"The only {colour} object in the image sits {where}. Its outline has {_OUTLINE[shape]}, which makes it a {shape}."
    elif task == "position":
        answer, pool = item["position"], sorted(POSITIONS)
        reasoning = f"The {colour} {shape} is drawn {where} of the image, apart from any other shape. Its position is therefore {answer}."
    else:  # exists: ask about a present or an absent shape with equal odds, when one is absent
        absent = [s for s in SHAPES if s not in {i["shape"] for i in items}]
        if absent and rng.random() < 0.5:
            shape, answer = rng.choice(absent), "no"
            reasoning = f"{present} None of them is a {shape}, so the answer is no."
        else:
            answer = "yes"
            reasoning = f"{present} The {colour} {shape} {where} is a {shape}, so the answer is yes."
        pool = ["yes", "no"]
    question = rng.choice(_QUESTIONS[task]).format(shape=shape, colour=colour)
    summary = _SUMMARIES[task].format(shape=shape, colour=colour)
    return question, answer, summary, reasoning, pool


def _turn(rng: random.Random, scene: Scene, task: str, multiple_choice: bool) -> tuple[str, str, str]:
    """Builds one question-answer pair; returns (question, four-stage answer, gold short answer)."""
    question, answer, summary, reasoning, pool = _free_form(rng, scene, task)
    if multiple_choice and len(pool) >= 4:
        options = [answer] + rng.sample([o for o in pool if o != answer], 3)
        rng.shuffle(options)
        letter = "ABCD"[options.index(answer)]
        lines = [f"{x}. {o}" for x, o in zip("ABCD", options)]
        question = f"{question}\nOptions:\n" + "\n".join(lines)
        question += "\nAnswer with the option's letter from the given choices directly."
        summary += " Then I will pick the option that matches."
        reasoning += f" This matches option {letter}."
        answer = letter
    else:
        question += _ANSWER_HINTS.get(task, "")
    text = (
        f"<SUMMARY> {summary} </SUMMARY>\n\n<CAPTION> {_caption(scene)} </CAPTION>\n\n"
        f"<REASONING> {reasoning} </REASONING>\n\n<CONCLUSION> {answer} </CONCLUSION>"
    )
    return question, text, answer


def sample_texts(n: int = 200, seed: int = 0) -> list[str]:
    """Questions and four-stage answers of ``n`` random scenes, every task in both styles, no images.

    The tiny model's tokenizer is trained on these, so that the dataset's words are whole tokens, as
    they are in Llama 3's vocabulary.
    """
    rng = random.Random(f"cotune-shapes-text-{seed}")
    texts = []
    for _ in range(n):
        scene = random_scene(rng)
        for task in TASKS:
            for multiple_choice in (False, True):
                question, text, _ = _turn(rng, scene, task, multiple_choice)
                texts += [question, text]
    return texts


def make_sample(
    rng: random.Random,
    index: int,
    image_size: int,
    split: str = "train",
    tasks: tuple[str, ...] = TASKS,
    max_shapes: int = 4,
    multiple_choice_rate: float = MULTIPLE_CHOICE_RATE,
    follow_up_rate: float = FOLLOW_UP_RATE,
    radius: float = 0.12,
    positions: tuple[str, ...] = tuple(POSITIONS),
) -> tuple[Image.Image, dict]:
    """Draws one scene and builds its LLaVA-CoT record. Pure: all randomness comes from ``rng``.

    Args:
        rng: Source of randomness; the sample depends only on its state and the arguments.
        index: Sample number, used in the id and the image name (``images/train_00001.png``).
        image_size: Width and height of the image in pixels.
        split: Split name used in the id and the image name.

    Returns:
        The RGB image and its record: ``id``, ``image`` (relative to the JSONL file's folder),
        ``conversations`` (one or, for about 10% of samples, two human/gpt turns), ``answer``
        (the first turn's gold short answer), ``task`` (what the first question asks about; eval
        groups accuracy by it) and ``meta`` (``task``, ``background``, ``shapes``).
    """
    scene = random_scene(rng, max_shapes, positions)
    image = draw_scene(scene, image_size, rng, radius)
    task = rng.choice(tasks)
    question, text, answer = _turn(rng, scene, task, rng.random() < multiple_choice_rate)
    conversations = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": text}]
    others = [t for t in tasks if t != task]
    if others and rng.random() < follow_up_rate:
        follow_task = rng.choice(others)
        question2, text2, _ = _turn(rng, scene, follow_task, rng.random() < multiple_choice_rate)
        conversations += [{"from": "human", "value": question2}, {"from": "gpt", "value": text2}]
    record = {
        "id": f"shapes-{split}-{index:05d}",
        "image": f"images/{split}_{index:05d}.png",
        "conversations": conversations,
        "answer": answer,
        "task": task,
        "meta": {"task": task, **scene},
    }
    return image, record


def write_synthetic_dataset(
    out_dir: str | Path,
    n_train: int = 400,
    n_test: int = 40,
    seed: int = 0,
    image_size: int = 64,
    **scene_options: Any,
) -> dict[str, Path]:
    """Writes the shapes dataset: ``train.jsonl``, ``test.jsonl`` and PNGs under ``images/``.

    Train and test come from separate RNG streams derived from ``seed``; the same arguments give
    byte-identical files. Existing files of the same names are overwritten.

    Args:
        out_dir: Folder to write into; created if missing.
        n_train: Number of training records.
        n_test: Number of test records.
        seed: Seed for both splits.
        image_size: Width and height of every image in pixels.

    Returns:
        ``{"train": out_dir/"train.jsonl", "test": out_dir/"test.jsonl", "images": out_dir/"images"}``.
    """
    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    paths = {"train": out_dir / "train.jsonl", "test": out_dir / "test.jsonl", "images": images}
    for split, count in (("train", n_train), ("test", n_test)):
        # A string seed is hashed with SHA-512 by random.Random, so it is stable across processes.
        rng = random.Random(f"cotune-shapes-{split}-{seed}")
        with open(paths[split], "w", encoding="utf-8", newline="\n") as f:
            for index in range(1, count + 1):
                image, record = make_sample(rng, index, image_size, split, **scene_options)
                image.save(out_dir / record["image"], format="PNG")  # PIL writes no time or text chunks
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return paths
