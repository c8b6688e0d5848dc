"""`cotune data import`: every source kind into LLaVA-CoT records that train, problems named with
file and reason, 16-bit pictures and DICOM scans through fixed windows (checked against pydicom's own
windowing), grouping keys kept."""

from __future__ import annotations

import base64
import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from cotune.cli import main
from cotune.data.records import load_samples
from cotune.data.sample import DataError
from cotune.data.sources import detect_kind, import_source
from cotune.data.sources.window import PRESETS, apply_window
from cotune.demo.synthetic import draw_scene
from cotune.options.sources import ImportOptions


def circle(colour: str, seed: int = 0, size: int = 32) -> Image.Image:
    scene = {"background": "white", "shapes": [{"shape": "circle", "colour": colour, "position": "center"}]}
    return draw_scene(scene, size, random.Random(seed), 0.3)


def records(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_folder_tree_imports_into_records_that_train(tmp_path, processor, tiny_mllama):
    root = tmp_path / "photos"
    for colour in ("red", "blue"):
        (root / colour / "sub").mkdir(parents=True)
        for k in range(2):
            circle(colour, k).save(root / colour / f"{k}.png")
        circle(colour, 9).save(root / colour / "sub" / "deep.jpg", quality=90)
    (root / "red" / "notes.txt").write_text("not a picture")
    (root / "blue" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "imported"
    rc = main(
        ["data", "import", str(root), "--output", str(out), "--question", "What colour is it? ({classes})"]
    )
    assert rc == 0
    recs = records(out / "data.jsonl")
    assert len(recs) == 6 and {r["answer"] for r in recs} == {"red", "blue"}
    assert recs[0]["conversations"][0]["value"] == "<image>\nWhat colour is it? (blue, red)"
    assert recs[0]["conversations"][1]["value"] == recs[0]["answer"]
    jpg = next(r for r in recs if r["image"].endswith(".jpg"))  # copied byte for byte, not re-encoded
    assert (out / jpg["image"]).read_bytes() == (root / jpg["answer"] / "sub" / "deep.jpg").read_bytes()
    # the records pass every check training runs, with the real processor
    from transformers import AutoConfig

    from cotune.config import load_options
    from cotune.data.check import check_data
    from cotune.models.families import family_for

    cfg = load_options("data").options
    report = check_data(
        cfg,
        out / "data.jsonl",
        processor,
        family_for(AutoConfig.from_pretrained(tiny_mllama)),
        log=lambda s: None,
    )
    assert report.problems == [] and report.usable == 6


def test_every_problem_is_named_and_raise_writes_nothing(tmp_path, capsys):
    root = tmp_path / "photos"
    (root / "red").mkdir(parents=True)
    circle("red").save(root / "red" / "ok.png")
    (root / "red" / "broken.png").write_bytes(b"junk")
    (root / "red" / "empty.png").write_bytes(b"")
    report = import_source(root, tmp_path / "out", ImportOptions(), log=lambda s: None)
    reasons = {str(p.where): p.reason for p in report.problems}
    assert set(reasons) == {"red/broken.png", "red/empty.png"}
    assert "cannot be decoded" in reasons["red/broken.png"] and "empty" in reasons["red/empty.png"]
    rc = main(["data", "import", str(root), "--output", str(tmp_path / "strict"), "--on_error", "raise"])
    assert rc == 2 and not (tmp_path / "strict").exists()
    assert "red/broken.png" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("x")
    with pytest.raises(DataError, match="not written by 'cotune data import'"):
        import_source(root, tmp_path / "mine", ImportOptions(), log=lambda s: None)


def test_sixteen_bit_pictures_use_one_fixed_window_not_a_per_image_stretch(tmp_path):
    root = tmp_path / "scans"
    (root / "a").mkdir(parents=True)
    # the same value (20000) in two files whose own ranges differ: it must get the same grey in both
    for name, other in (("narrow", 21000), ("wide", 60000)):
        values = np.full((16, 16), 20000, dtype=np.uint16)
        values[0, 0] = other
        Image.fromarray(values).save(root / "a" / f"{name}.png")
    for window, expected in (("", apply_window(np.array([20000]), 32768, 65536)[0]), ("20000,2000", 128)):
        out = tmp_path / f"out{len(window)}"
        import_source(root, out, ImportOptions(question="Q?", window=window), log=lambda s: None)
        greys = {r["id"]: np.asarray(Image.open(out / r["image"]))[5, 5] for r in records(out / "data.jsonl")}
        assert greys == {"a-narrow": expected, "a-wide": expected}


def test_table_with_mapped_columns_keeps_grouping_fields(tmp_path):
    (tmp_path / "img").mkdir()
    rows = ["file,diagnosis_text,patient,device"]
    for k, colour in enumerate(("red", "blue", "red")):
        circle(colour, k).save(tmp_path / "img" / f"{k}.png")
        rows.append(f"img/{k}.png,{colour},P{k % 2},scanner-1")
    rows.append("../outside.png,red,P9,x")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    report = import_source(
        tmp_path / "labels.csv", out, ImportOptions(question="Which colour? {classes}"),
        data=_data(columns={"image": "file", "answer": "diagnosis_text"}), log=lambda s: None,
    )  # fmt: skip
    recs = records(out / "data.jsonl")
    assert [(r["answer"], r["patient"], r["device"]) for r in recs] == [
        ("red", "P0", "scanner-1"), ("blue", "P1", "scanner-1"), ("red", "P0", "scanner-1")]  # fmt: skip
    assert recs[0]["conversations"][0]["value"].endswith("Which colour? blue, red")
    assert [(p.where, "escapes the image root" in p.reason) for p in report.problems] == [
        ("labels.csv:5", True)
    ]


def _data(**kw):
    from cotune.options.data import DataOptions

    return DataOptions(**kw)


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_vlmeval_tsv_is_prompted_as_vlmevalkit_prompts(tmp_path):
    from cotune.data.benchmarks import build_vlmeval_prompt, read_vlmeval_tsv

    lines = ["index\timage\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory"]
    for k, colour in enumerate(("red", "green", "blue")):
        options = ["red", "green", "blue", "purple"]
        lines.append(f"{k}\t{_b64(circle(colour, k))}\tWhat colour is the circle?\t\t" + "\t".join(options)
                     + f"\t{'ABC'[k]}\tcolour")  # fmt: skip
    lines.append("3\t0\tSame picture as row 0?\t\t\t\t\t\tYes\tshared")  # a row sharing row 0's picture
    path = tmp_path / "MMBench_TOY.tsv"
    path.write_text("\n".join(lines) + "\n")
    assert detect_kind(path)[0] == "vlmeval"
    out = tmp_path / "out"
    import_source(path, out, ImportOptions(), log=lambda s: None)
    recs, rows = records(out / "data.jsonl"), read_vlmeval_tsv(path)
    assert [r["answer"] for r in recs] == ["A", "B", "C", "Yes"]
    assert [r["conversations"][0]["value"] for r in recs] == [
        f"<image>\n{build_vlmeval_prompt(r).strip()}" for r in rows
    ]
    assert recs[0]["options"] == {"A": "red", "B": "green", "C": "blue", "D": "purple"}
    assert np.array_equal(np.asarray(Image.open(out / recs[0]["image"])), np.asarray(circle("red", 0)))
    samples, problems = load_samples(out / "data.jsonl")
    assert problems == [] and len(samples) == 4


def test_coco_captions_and_vqa(tmp_path):
    (tmp_path / "train2014").mkdir()
    for image_id, colour in ((1, "red"), (2, "blue")):
        circle(colour).save(tmp_path / "train2014" / f"COCO_train2014_{image_id:012d}.jpg")
    captions = {"images": [{"id": 1, "file_name": "train2014/COCO_train2014_000000000001.jpg"},
                           {"id": 3, "file_name": "train2014/missing.jpg"}],
                "annotations": [{"image_id": 1, "caption": "A red circle."}, {"image_id": 1, "caption": "Red disc."},
                                {"image_id": 3, "caption": "Gone."}]}  # fmt: skip
    (tmp_path / "captions_train2014.json").write_text(json.dumps(captions))
    report = import_source(
        tmp_path / "captions_train2014.json", tmp_path / "cap", ImportOptions(), log=lambda s: None
    )
    (rec,) = records(tmp_path / "cap" / "data.jsonl")
    assert rec["answer"] == "A red circle." and rec["answers"] == ["A red circle.", "Red disc."]
    assert "not found" in report.problems[0].reason
    questions = {"data_subtype": "train2014", "questions": [
        {"image_id": 1, "question": "Is it red?", "question_id": 10},
        {"image_id": 2, "question": "What colour?", "question_id": 20}]}  # fmt: skip
    answers = [{"answer": a} for a in ["blue"] * 6 + ["navy"] * 3 + ["teal"]]
    annotations = {"annotations": [
        {"question_id": 10, "image_id": 1, "multiple_choice_answer": "yes", "answer_type": "yes/no",
         "answers": [{"answer": "yes"}] * 10},
        {"question_id": 20, "image_id": 2, "multiple_choice_answer": "blue", "answer_type": "other", "answers": answers}]}  # fmt: skip
    (tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps(questions))
    (tmp_path / "v2_mscoco_train2014_annotations.json").write_text(json.dumps(annotations))
    import_source(tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json", tmp_path / "vqa", ImportOptions(),
                  log=lambda s: None)  # fmt: skip
    recs = records(tmp_path / "vqa" / "data.jsonl")
    assert [(r["answer"], r["answers"], r["answer_type"], r["image_id"]) for r in recs] == [
        ("yes", ["yes"], "yes/no", 1), ("blue", ["blue", "navy"], "other", 2)]  # fmt: skip


# ----------------------------------------------------------------------------- DICOM


def write_ct(path, values, patient="P1", study="1.2.3.1", sop="1.2.3.1.1", window=None, slope=1.0,
             intercept=-1024.0, photometric="MONOCHROME2"):  # fmt: skip
    """A CT image (or multi-frame: ``values`` 3-D) with stored values ``values`` (uint16)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = CTImageStorage, sop, study
    ds.SeriesInstanceUID, ds.PatientID, ds.Modality = study + ".9", patient, "CT"
    values = np.asarray(values, dtype=np.uint16)
    if values.ndim == 3:
        ds.NumberOfFrames = values.shape[0]
    ds.Rows, ds.Columns = values.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = values.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_dicom_window_rescale_frames_labels_and_grouping_keys(tmp_path):
    pydicom = pytest.importorskip("pydicom")  # the dicom extra (in dev)
    scans = tmp_path / "study"
    scans.mkdir()
    ramp = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    a = write_ct(scans / "a.dcm", ramp, window=(40, 400))  # its own soft-tissue window
    write_ct(
        scans / "b.dcm", ramp, patient="P2", study="1.2.3.2", sop="1.2.3.2.1", slope=2.0, intercept=-2048
    )
    write_ct(
        scans / "multi.dcm",
        np.stack([ramp, ramp[::-1], ramp.T]),
        patient="P2",
        study="1.2.3.2",
        sop="1.2.3.2.2",
    )
    write_ct(scans / "unlabelled.dcm", ramp, patient="P3", study="9.9", sop="9.9.1")
    (scans / "junk.dcm").write_bytes(b"not dicom at all")
    (tmp_path / "labels.csv").write_text("key,diagnosis\na.dcm,nodule\n1.2.3.2,normal\nghost.dcm,x\n")
    out = tmp_path / "out"
    opts = ImportOptions(labels=str(tmp_path / "labels.csv"), frames="0,2")
    report = import_source(scans, out, opts, data=_data(columns={"answer": "diagnosis"}), log=lambda s: None)
    recs = {r["id"]: r for r in records(out / "data.jsonl")}
    assert sorted(recs) == ["a", "b", "multi-f0", "multi-f2"]
    assert (recs["a"]["answer"], recs["a"]["patient_id"], recs["a"]["study_uid"]) == (
        "nodule",
        "P1",
        "1.2.3.1",
    )
    assert recs["multi-f2"]["answer"] == "normal" and recs["multi-f2"]["frame"] == 2
    # the file's own window, after the rescale, exactly as pydicom windows it
    got = np.asarray(Image.open(out / recs["a"]["image"])).astype(int)
    assert np.abs(got - _pydicom_8bit(a, 40, 400)).max() <= 1 and 0 < got.mean() < 255
    # no window in the file: the full range of its 12 stored bits after the rescale, never the slice's own
    b = pydicom.dcmread(scans / "b.dcm")
    assert "WindowCenter" not in b
    lo, hi = 0 * 2.0 - 2048, 4095 * 2.0 - 2048
    got_b = np.asarray(Image.open(out / recs["b"]["image"])).astype(int)
    assert np.abs(got_b - _pydicom_8bit(b, (lo + hi + 1) / 2, hi - lo + 1)).max() <= 1
    reasons = {p.where: p.reason for p in report.problems}
    assert (
        "no label in labels.csv" in reasons["unlabelled.dcm"]
        and "not a readable DICOM" in reasons["junk.dcm"]
    )
    assert [w.where for w in report.warnings] == ["labels.csv:4"]  # ghost.dcm matched no file
    # a preset replaces the file's window
    import_source(scans, tmp_path / "lung", ImportOptions(labels=str(tmp_path / "labels.csv"), window="lung"),
                  data=_data(columns={"answer": "diagnosis"}), log=lambda s: None)  # fmt: skip
    lung = next(r for r in records(tmp_path / "lung" / "data.jsonl") if r["id"] == "a")
    got_lung = np.asarray(Image.open(tmp_path / "lung" / lung["image"])).astype(int)
    assert np.abs(got_lung - _pydicom_8bit(a, *PRESETS["lung"])).max() <= 1


def _pydicom_8bit(ds, center, width) -> np.ndarray:
    """pydicom's own linear windowing of the rescaled pixels, from its output range to 0-255: the reference."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_windowing

    ds = pydicom.dcmread(ds.filename)
    ds.WindowCenter, ds.WindowWidth = center, width
    windowed = apply_windowing(apply_modality_lut(ds.pixel_array, ds), ds)
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    y_min, y_max = intercept, (2**ds.BitsStored - 1) * slope + intercept  # pydicom's output range
    return np.round((windowed - y_min) / (y_max - y_min) * 255).astype(int)
