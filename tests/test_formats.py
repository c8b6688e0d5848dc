"""Every format reads into the same Samples; ``auto`` detects each; each trains end to end."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from cotune.config import load_config
from cotune.data.formats import detect_format
from cotune.data.images import load_image
from cotune.data.records import load_samples
from cotune.data.sample import conversation_to_messages
from cotune.train.loop import finetune

COLOURS = ("red", "green", "blue", "orange")
# (question, answer, image indices): one image, two images, text only, one image
RECORDS = [
    ("<image>\nWhat colour is the square?", "It is red.", [0]),
    ("<image> and <image>: which is greener?", "The first one.", [1, 2]),
    ("Say hi.", "hi", []),
    ("<image>\nIs it orange?", "yes", [3]),
]


def png_bytes(k: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), COLOURS[k]).save(buf, "PNG")
    return buf.getvalue()


def expected_messages():
    return [conversation_to_messages([("user", q), ("assistant", a)], len(imgs)) for q, a, imgs in RECORDS]


def _images(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    for k in range(len(COLOURS)):
        (folder / f"{k}.png").write_bytes(png_bytes(k))
    return [f"img/{k}.png" for k in range(len(COLOURS))]


def write_llava(tmp_path, layout):
    paths = _images(tmp_path)
    objs = []
    for n, (q, a, imgs) in enumerate(RECORDS):
        obj = {"id": f"r{n}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        if imgs:
            obj["image"] = paths[imgs[0]] if len(imgs) == 1 else [paths[i] for i in imgs]
        objs.append(obj)
    if layout == "jsonl":
        path = tmp_path / "train.jsonl"
        path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    else:
        path = tmp_path / "train.json"
        path.write_text(json.dumps(objs, indent=2))
    return path, {}


def write_sharegpt(tmp_path, layout):
    paths = _images(tmp_path)
    objs = [
        {
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "images": [paths[i] for i in imgs],
        }
        for q, a, imgs in RECORDS
    ]
    path = tmp_path / f"sharegpt.{layout}"
    text = json.dumps(objs, indent=2) if layout == "json" else "".join(json.dumps(o) + "\n" for o in objs)
    path.write_text(text)
    return path, {}


def write_hf(tmp_path, kind):
    """A datasets table whose columns are named otherwise and whose images are stored inside it."""
    import datasets
    import pyarrow as pa

    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a, _ in RECORDS]
    pics = [[{"bytes": png_bytes(i), "path": None} for i in imgs] for _, _, imgs in RECORDS]
    if kind == "save_to_disk":
        features = datasets.Features(
            {
                "chat": datasets.List(
                    {"role": datasets.Value("string"), "content": datasets.Value("string")}
                ),
                "pics": datasets.List(datasets.Image()),
            }
        )
        datasets.Dataset.from_dict({"chat": chats, "pics": pics}, features=features).save_to_disk(
            tmp_path / "ds"
        )
        return tmp_path / "ds", {"messages": "chat", "images": "pics"}
    if kind == "parquet":  # VQA style: question / answer columns, Image cells
        features = datasets.Features(
            {
                "q": datasets.Value("string"),
                "a": datasets.Value("string"),
                "images": datasets.List(datasets.Image()),
            }
        )
        rows = {"q": [r[0] for r in RECORDS], "a": [r[1] for r in RECORDS], "images": pics}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "train.parquet")
        return tmp_path / "train.parquet", {"question": "q", "answer": "a"}
    if kind == "arrow":  # plain Arrow stream, raw bytes
        table = pa.table(
            {"messages": chats, "images": [[png_bytes(i) for i in imgs] for _, _, imgs in RECORDS]}
        )
        with pa.OSFile(str(tmp_path / "train.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table)
        return tmp_path / "train.arrow", {}
    paths = _images(tmp_path)  # JSON lines with other column names and image paths
    rows = [{"conv": c, "img": [paths[i] for i in imgs]} for c, (_, _, imgs) in zip(chats, RECORDS)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "rows.jsonl", {"messages": "conv", "images": "img"}


COOKBOOK = """
from PIL import Image
RECORDS = {records!r}
ROOT = {root!r}

def get_custom_dataset(dataset_config, processor, split):
    return [dict(q=q.replace("<image>", "").strip(), a=a, imgs=imgs) for q, a, imgs in RECORDS if len(imgs) == 1]

class Collator:
    def __init__(self, processor):
        self.processor = processor

    def __call__(self, samples):
        dialogs = [[{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": s["q"]}}]}},
                    {{"role": "assistant", "content": [{{"type": "text", "text": s["a"]}}]}}] for s in samples]
        text = [self.processor.apply_chat_template(d) for d in dialogs]
        images = [[Image.open(f"{{ROOT}}/img/{{s['imgs'][0]}}.png").convert("RGB")] for s in samples]
        batch = self.processor(images=images, text=text, padding=True, add_special_tokens=False, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batch["labels"] = labels.masked_fill(labels == 128256, -100)  # the image token is not predicted
        return batch

def get_data_collator(processor):
    return Collator(processor)
"""


def write_cookbook(tmp_path, _):
    _images(tmp_path)
    path = tmp_path / "my_dataset.py"
    path.write_text(COOKBOOK.format(records=RECORDS, root=str(tmp_path)))
    return path, {}


VARIANTS = {
    "llava_cot_jsonl": (write_llava, "jsonl", "llava_cot_jsonl"),
    "llava_json": (write_llava, "json", "llava_json"),
    "sharegpt_json": (write_sharegpt, "json", "sharegpt"),
    "sharegpt_jsonl": (write_sharegpt, "jsonl", "sharegpt"),
    "hf_save_to_disk": (write_hf, "save_to_disk", "hf"),
    "hf_parquet": (write_hf, "parquet", "hf"),
    "hf_arrow": (write_hf, "arrow", "hf"),
    "hf_jsonl_mapped": (write_hf, "jsonl", "hf"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_format_reads_into_the_same_samples(tmp_path, variant):
    writer, arg, fmt = VARIANTS[variant]
    path, columns = writer(tmp_path, arg)
    assert detect_format(path, columns)[0] == fmt
    said = []
    samples, problems = load_samples(path, columns=columns, log=said.append)
    assert not problems, problems
    assert said and f"format '{fmt}' detected" in said[0]
    assert [s.messages for s in samples] == expected_messages()
    for s, (_, _, imgs) in zip(samples, RECORDS):
        got = [np.asarray(load_image(ref)) for ref in s.images]
        want = [np.asarray(Image.new("RGB", (24, 16), COLOURS[i])) for i in imgs]
        assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))


def test_json_list_problems_carry_the_line_of_their_record(tmp_path):
    _images(tmp_path)
    good = {"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "ho"}]}
    objs = [
        {**good, "images": ["img/0.png"]},
        {**good, "images": ["../outside.png"]},
        {**good, "images": [str(tmp_path.parent / "abs.png")]},
        {"messages": [{"role": "robot", "content": "x"}]},
        {**good, "images": ["img/0.png", "img/1.png"]},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(objs, indent=1))
    lines = path.read_text().splitlines()
    starts = [n for n, line in enumerate(lines, start=1) if line == " {"]
    samples, problems = load_samples(path)
    assert len(samples) == 1
    assert [p.where for p in problems] == [f"data.json:{n}" for n in starts[1:]]
    assert "escapes the image root" in problems[0].reason and "escapes the image root" in problems[1].reason
    assert "unknown role 'robot'" in problems[2].reason
    assert "1 '<image>' markers but 2 images" in problems[3].reason


def test_unknown_layout_names_the_keys_and_the_fix(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"\['completion', 'prompt'\].*data.columns"):
        load_samples(path)


E2E = {
    "llava_cot_jsonl": (write_llava, "jsonl"),
    "llava_json": (write_llava, "json"),
    "sharegpt": (write_sharegpt, "json"),
    "hf": (write_hf, "save_to_disk"),
    "cookbook": (write_cookbook, None),
}


@pytest.mark.parametrize("fmt", list(E2E))
def test_every_format_trains_end_to_end(tiny_mllama, tmp_path, fmt):
    writer, arg = E2E[fmt]
    path, columns = writer(tmp_path, arg)
    overrides = [
        ("model_name", str(tiny_mllama)),
        ("dataset", str(path)),
        ("data.columns", json.dumps(columns)),
        ("output_dir", str(tmp_path / "run")),
        ("max_train_step", "2"),
        ("batch_size_training", "1"),
        ("run_validation", "False"),
        ("save_model", "False"),
        ("progress", "False"),
        ("data.max_seq_len", "128"),
    ]
    logs = []
    result = finetune(load_config(None, overrides), log=logs.append)
    assert result.steps == 2 and all(np.isfinite(result.train_losses))
    assert any(f"format '{fmt}'" in line for line in logs), logs


def test_single_image_cells_and_path_columns(tmp_path):
    import datasets

    _images(tmp_path)
    rows = {
        "question": ["<image>\nWhat colour?", "Say hi.", "What colour?"],
        "answer": ["red", "hi", "green"],
        "picture": [{"bytes": png_bytes(0), "path": None}, None, {"bytes": png_bytes(1), "path": None}],
        "file": ["img/0.png", None, "img/1.png"],
    }
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "picture": datasets.Image(),
            "file": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "vqa.parquet")
    for column in ("picture", "file"):
        samples, problems = load_samples(tmp_path / "vqa.parquet", columns={"image": column})
        assert not problems
        assert [len(s.images) for s in samples] == [1, 0, 1]
        assert samples[2].messages[0]["content"][0] == {"type": "image"}  # no marker: image goes first
        colours = [load_image(s.images[0]).getpixel((0, 0)) for s in samples if s.images]
        assert colours == [(255, 0, 0), (0, 128, 0)]
