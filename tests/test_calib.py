"""COCO calibration subsets (vlmsens.calib): validation, nesting, determinism, held-out disjointness,
legacy DB import, atomic writes and provenance (docs/DESIGN.md, "Data contracts")."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from vlmsens import __version__, calib
from vlmsens.calib import (
    MAX_LISTED,
    build_eval_subset,
    build_subset,
    normalise_caption,
    read_calib_db,
    select_samples,
)
from vlmsens.demo import build_demo_coco
from vlmsens.errors import VlmsensError

# Subsets written by an earlier COCO tool (tests/data/legacy-calib/README.md): the pipeline must
# accept them as pre-built calibration inputs.
LEGACY_DIR = Path(__file__).resolve().parent / "data" / "legacy-calib"

SEED = 7
N_TRAIN = 40
N_VAL = 16
TRAIN = "train2017"
VAL = "val2017"


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def coco_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("template") / "coco"
    build_demo_coco(root, n_train=N_TRAIN, n_val=N_VAL, seed=3, width=32, height=24)
    return root


@pytest.fixture
def coco(coco_template: Path, tmp_path: Path) -> Path:
    """A fresh, valid COCO-format tree per test (copied from one generated per module)."""
    root = tmp_path / "coco"
    shutil.copytree(coco_template, root)
    return root


def ann_file(root: Path, split: str = TRAIN) -> Path:
    return root / "annotations" / f"captions_{split}.json"


def load_json(root: Path, split: str = TRAIN) -> dict:
    return json.loads(ann_file(root, split).read_text())


def save_json(root: Path, data: dict, split: str = TRAIN) -> None:
    ann_file(root, split).write_text(json.dumps(data))


def file_name_of(data: dict, image_id: int) -> str:
    return next(img["file_name"] for img in data["images"] if img["id"] == image_id)


def candidate_order(root: Path, split: str = TRAIN, salt: int = 0) -> list[int]:
    """The seeded candidate order, read off a selection of every image of a clean tree."""
    n = len(load_json(root, split)["images"])
    return [s.image_id for s in select_samples(root, split, n, SEED, salt=salt, decode_images=False).samples]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def db_rows(path: Path) -> tuple[list[tuple], list[tuple]]:
    con = sqlite3.connect(path)
    try:
        rows = con.execute("SELECT * FROM vlm_calib_samples ORDER BY id").fetchall()
        meta = con.execute("SELECT key, value FROM meta ORDER BY key").fetchall()
    finally:
        con.close()
    return rows, meta


def subset(root: Path, out: Path, size_name: str, n: int, **kwargs) -> tuple[dict, Path, Path]:
    db = out / f"coco2017_vlm_calib_{size_name}.db"
    captions = out / f"coco2017_captions_{size_name}.txt"
    meta = build_subset(
        coco_root=root, split=kwargs.pop("split", TRAIN), size_name=size_name, num_samples=n, seed=kwargs.pop("seed", SEED),
        db_path=db, captions_path=captions, **kwargs,
    )
    return meta, db, captions


def eval_subset(root: Path, out: Path, split: str, n: int, **kwargs) -> list[calib.CalibSample]:
    db = out / "coco2017_vlm_eval.db"
    build_eval_subset(
        coco_root=root, split=split, num_images=n, seed=SEED, db_path=db,
        captions_path=out / "coco2017_captions_eval.txt", **kwargs,
    )
    return read_calib_db(db)[0]


def plant_bad_entries(root: Path) -> dict:
    """Make the first candidates of the seeded order bad in every planted way; return what was planted.

    order[0] missing file, [1] truncated JPEG, [2] '../' file_name, [3] absolute file_name,
    [4] only an empty/whitespace caption, [5] a good image with many captions (one with a newline).
    """
    order = candidate_order(root)
    data = load_json(root)
    ids = order[:6]
    names = {i: file_name_of(data, i) for i in ids}
    (root / TRAIN / names[ids[0]]).unlink()
    truncate(root / TRAIN / names[ids[1]])
    val_file = sorted(p.name for p in (root / VAL).iterdir())[0]
    dotdot = f"../{VAL}/{val_file}"  # an existing file, reached by escaping the split folder
    absolute = str((root / TRAIN / names[ids[3]]).resolve())  # an existing file, as an absolute path
    for img in data["images"]:
        if img["id"] == ids[2]:
            img["file_name"] = dotdot
        elif img["id"] == ids[3]:
            img["file_name"] = absolute
    next_id = max(a["id"] for a in data["annotations"]) + 1
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != ids[4]]
    data["annotations"].append({"id": next_id, "image_id": ids[4], "caption": "  \t \n "})
    extra = ["A second  caption\nover two lines.", "Third caption.", "Fourth caption.", "Fifth caption."]
    for k, text in enumerate(extra, start=1):
        data["annotations"].append({"id": next_id + k, "image_id": ids[5], "caption": text})
    save_json(root, data)
    return {
        "order": order,
        "bad": [
            (ids[0], f"{TRAIN}/{names[ids[0]]}", "file not found"),
            (ids[1], f"{TRAIN}/{names[ids[1]]}", "cannot decode image"),
            (ids[2], dotdot, "path escapes the COCO root"),
            (ids[3], absolute, "absolute path"),
            (ids[4], f"{TRAIN}/{names[ids[4]]}", "no non-empty caption"),
        ],
        "many_captions": ids[5],
        "many_captions_texts": {
            normalise_caption(a["caption"]) for a in data["annotations"] if a["image_id"] == ids[5]
        },
    }


# ---------------------------------------------------------------- bad entries


def test_error_mode_lists_every_planted_bad_entry(coco: Path, tmp_path: Path):
    planted = plant_bad_entries(coco)
    out = tmp_path / "out"
    with pytest.raises(VlmsensError) as err:
        subset(coco, out, "small", 6, on_bad_image="error")
    message = str(err.value)
    assert "5 bad calibration image(s)" in message
    for _, path, problem in planted["bad"]:
        line = next((ln for ln in message.splitlines() if ln.strip().startswith(f"{path}:")), None)
        assert line is not None, f"{path} not listed in:\n{message}"
        assert problem in line
    assert "on_bad_image: replace" in message
    assert "... and" not in message  # 5 <= MAX_LISTED: all listed, no count of the rest
    assert not out.exists() or not any(out.iterdir())


def test_error_mode_lists_first_entries_and_counts_the_rest(coco: Path, tmp_path: Path):
    order = candidate_order(coco)
    data = load_json(coco)
    n_bad = MAX_LISTED + 4
    missing = [f"{TRAIN}/{file_name_of(data, i)}" for i in order[:n_bad]]
    for rel in missing:
        (coco / rel).unlink()
    with pytest.raises(VlmsensError) as err:
        subset(coco, tmp_path / "out", "medium", 20, on_bad_image="error")
    message = str(err.value)
    assert f"{n_bad} bad calibration image(s)" in message
    for rel in missing[:MAX_LISTED]:
        assert f"{rel}: file not found" in message
    for rel in missing[MAX_LISTED:]:
        assert rel not in message
    assert f"... and {n_bad - MAX_LISTED} more" in message


def test_replace_mode_skips_records_and_is_deterministic(coco: Path, tmp_path: Path):
    planted = plant_bad_entries(coco)
    meta, db, captions = subset(coco, tmp_path / "a", "medium", 10, on_bad_image="replace")
    samples, db_meta = read_calib_db(db)

    # The five bad candidates are skipped, in order, and the next candidates take their places.
    good_order = [i for i in planted["order"] if i not in {b[0] for b in planted["bad"]}]
    assert [s.image_id for s in samples] == good_order[:10]
    skipped = json.loads(db_meta["skipped"])
    assert [(e["image_id"], e["path"]) for e in skipped] == [(i, p) for i, p, _ in planted["bad"]]
    for entry, (_, _, problem) in zip(skipped, planted["bad"], strict=True):
        assert problem in entry["problem"]
    assert meta["skipped"] == skipped

    # The image with many captions gives exactly one row, with one of its own captions on one line.
    rows = [s for s in samples if s.image_id == planted["many_captions"]]
    assert len(rows) == 1
    assert rows[0].caption in planted["many_captions_texts"]
    assert len({s.image_relpath for s in samples}) == len(samples) == len({s.image_id for s in samples})
    for s in samples:
        assert s.split == TRAIN and s.image_relpath.startswith(f"{TRAIN}/") and ".." not in s.image_relpath
        assert s.caption == normalise_caption(s.caption) and s.caption

    # A second run gives the same rows, meta and captions file.
    _, db2, captions2 = subset(coco, tmp_path / "b", "medium", 10, on_bad_image="replace")
    assert db_rows(db) == db_rows(db2)
    assert captions.read_bytes() == captions2.read_bytes()


def test_replace_mode_fails_clearly_when_too_few_usable_images(coco: Path, tmp_path: Path):
    plant_bad_entries(coco)
    with pytest.raises(VlmsensError, match=r"only 35 usable images .* subset of 36 \(5 skipped\)"):
        subset(coco, tmp_path / "out", "large", 36, on_bad_image="replace")
    assert not (tmp_path / "out" / "coco2017_vlm_calib_large.db").exists()


def test_null_caption_is_not_the_text_none(coco: Path, tmp_path: Path):
    order = candidate_order(coco)
    data = load_json(coco)
    for ann in data["annotations"]:
        if ann["image_id"] == order[0]:
            ann["caption"] = None
    save_json(coco, data)
    with pytest.raises(VlmsensError, match="no non-empty caption"):
        subset(coco, tmp_path / "out", "small", 2, on_bad_image="error")
    _, db, _ = subset(coco, tmp_path / "out", "small", 2, on_bad_image="replace")
    samples, _ = read_calib_db(db)
    assert order[0] not in [s.image_id for s in samples]
    assert all(s.caption != "None" for s in samples)


def test_two_image_ids_naming_one_file_give_one_row(coco: Path, tmp_path: Path):
    order = candidate_order(coco)
    data = load_json(coco)
    shared = file_name_of(data, order[0])
    for img in data["images"]:
        if img["id"] == order[1]:
            img["file_name"] = "./" + shared  # the same file, spelled differently
    save_json(coco, data)
    _, db, _ = subset(coco, tmp_path / "out", "small", 4, on_bad_image="replace")
    samples, meta = read_calib_db(db)
    assert order[1] not in [s.image_id for s in samples]
    assert json.loads(meta["skipped"])[0]["image_id"] == order[1]
    assert "same file as image id" in json.loads(meta["skipped"])[0]["problem"]


def test_malformed_annotations_give_a_clear_error(coco: Path, tmp_path: Path):
    data = load_json(coco)
    del data["annotations"][3]["image_id"]
    save_json(coco, data)
    with pytest.raises(VlmsensError, match=r"captions_train2017\.json has a malformed entry"):
        subset(coco, tmp_path / "out", "small", 4)
    ann_file(coco).write_text("{not json")
    with pytest.raises(VlmsensError, match="not valid JSON"):
        subset(coco, tmp_path / "out", "small", 4)
    ann_file(coco).write_text(json.dumps({"images": []}))
    with pytest.raises(VlmsensError, match="lacks the 'images' or 'annotations' list"):
        subset(coco, tmp_path / "out", "small", 4)


@pytest.mark.parametrize("kwargs, match", [
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"on_bad_image": "skip"}, "must be 'error' or 'replace'"),
])
def test_invalid_settings_are_rejected(coco: Path, tmp_path: Path, kwargs: dict, match: str):
    with pytest.raises(VlmsensError, match=match):
        subset(coco, tmp_path / "out", "small", 4, **kwargs)


def test_symlinked_split_folder_is_followed(coco: Path, tmp_path: Path):
    # A common layout: the image folders live on another disk and are linked into the COCO root.
    elsewhere = tmp_path / "other-disk" / TRAIN
    elsewhere.parent.mkdir()
    shutil.move(str(coco / TRAIN), elsewhere)
    (coco / TRAIN).symlink_to(elsewhere, target_is_directory=True)
    _, db, _ = subset(coco, tmp_path / "out", "small", 8, on_bad_image="error")
    assert len(read_calib_db(db)[0]) == 8


# ---------------------------------------------------------------- nesting, determinism, captions, meta


@pytest.mark.parametrize("on_bad_image, plant", [("error", False), ("replace", True)])
def test_sizes_are_nested_and_deterministic(coco: Path, tmp_path: Path, on_bad_image: str, plant: bool):
    if plant:
        plant_bad_entries(coco)
    sizes = {"small": 4, "medium": 8, "large": 16}
    runs = []
    for run in ("a", "b"):
        rows = {}
        for name, n in sizes.items():
            _, db, captions = subset(coco, tmp_path / run, name, n, on_bad_image=on_bad_image)
            samples, _ = read_calib_db(db)
            assert len(samples) == n
            assert len({s.image_id for s in samples}) == n  # one caption per image, no image repeated
            lines = captions.read_text().split("\n")
            assert lines[-1] == "" and lines[:-1] == [s.caption for s in samples]
            rows[name] = (samples, db_rows(db), captions.read_bytes())
        runs.append(rows)
    small, medium, large = (runs[0][name][0] for name in sizes)
    assert medium[: len(small)] == small
    assert large[: len(medium)] == medium
    assert runs[0] == runs[1]
    for name in sizes:  # the DB files themselves are byte-identical across runs
        db = f"coco2017_vlm_calib_{name}.db"
        assert (tmp_path / "a" / db).read_bytes() == (tmp_path / "b" / db).read_bytes()


def test_selection_does_not_depend_on_annotation_order(coco: Path, tmp_path: Path):
    _, db, _ = subset(coco, tmp_path / "a", "large", 16)
    data = load_json(coco)
    data["images"].reverse()
    data["annotations"].reverse()
    save_json(coco, data)
    _, db2, _ = subset(coco, tmp_path / "b", "large", 16)
    assert read_calib_db(db)[0] == read_calib_db(db2)[0]


def test_meta_table_records_provenance(coco: Path, tmp_path: Path):
    meta, db, _ = subset(coco, tmp_path / "out", "medium", 8, on_bad_image="replace")
    con = sqlite3.connect(db)
    try:
        columns = [(r[1], r[2]) for r in con.execute("PRAGMA table_info(meta)")]
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        con.close()
    assert columns == [("key", "TEXT"), ("value", "TEXT")]
    assert {"vlm_calib_samples", "meta"} <= tables
    _, stored = read_calib_db(db)
    assert stored["size_name"] == "medium"
    assert stored["random_seed"] == str(SEED)
    assert stored["num_samples"] == "8"
    assert stored["split"] == TRAIN
    assert stored["source_dataset"] == "coco2017"
    assert stored["annotation_sha256"] == hashlib.sha256(ann_file(coco).read_bytes()).hexdigest()
    assert stored["tool"] == f"vlmsens {__version__}"
    assert json.loads(stored["skipped"]) == []
    assert set(stored) == set(meta)


def test_caption_is_one_of_the_images_captions(coco: Path, tmp_path: Path):
    _, db, _ = subset(coco, tmp_path / "out", "large", 16)
    by_image: dict[int, dict[int, str]] = {}
    for ann in load_json(coco)["annotations"]:
        by_image.setdefault(ann["image_id"], {})[ann["id"]] = normalise_caption(ann["caption"])
    for s in read_calib_db(db)[0]:
        assert by_image[s.image_id][s.caption_id] == s.caption


# ---------------------------------------------------------------- held-out evaluation subset


def test_eval_subset_from_another_split_is_disjoint(coco: Path, tmp_path: Path):
    held_out = eval_subset(coco, tmp_path / "out", VAL, 8)
    assert len(held_out) == 8 and all(s.split == VAL for s in held_out)
    for name, n in {"small": 4, "medium": 8, "large": 16}.items():
        _, db, _ = subset(coco, tmp_path / "out", name, n, eval_split=VAL, eval_images=8)
        samples = read_calib_db(db)[0]
        assert not {s.image_relpath for s in samples} & {s.image_relpath for s in held_out}
        assert not {s.image_id for s in samples} & {s.image_id for s in held_out}


def test_eval_subset_from_the_calibration_split_is_excluded(coco: Path, tmp_path: Path):
    held_out = eval_subset(coco, tmp_path / "out", TRAIN, 8)
    held_ids = {s.image_id for s in held_out}
    subsets = {}
    for name, n in {"small": 4, "medium": 8, "large": N_TRAIN - 8}.items():
        meta, db, _ = subset(coco, tmp_path / "out", name, n, eval_split=TRAIN, eval_images=8)
        assert meta["excluded_held_out_images"] == 8
        subsets[name] = read_calib_db(db)[0]
        assert not {s.image_id for s in subsets[name]} & held_ids
        assert not {s.image_relpath for s in subsets[name]} & {s.image_relpath for s in held_out}
    assert subsets["medium"][:4] == subsets["small"] and subsets["large"][:8] == subsets["medium"]
    # Calibration (all that is left) and evaluation together are the whole split.
    assert {s.image_id for s in subsets["large"]} | held_ids == set(candidate_order(coco))


def test_eval_subset_replacing_a_bad_image_stays_disjoint(coco: Path, tmp_path: Path):
    # The evaluation subset decodes its images: when one of its first candidates is corrupt it takes
    # the next one, and the calibration subset must not take that one too.
    eval_order = candidate_order(coco, salt=1)
    data = load_json(coco)
    truncate(coco / TRAIN / file_name_of(data, eval_order[2]))
    held_out = eval_subset(coco, tmp_path / "out", TRAIN, 8, on_bad_image="replace")
    assert [s.image_id for s in held_out] == eval_order[:2] + eval_order[3:9]
    _, db, _ = subset(coco, tmp_path / "out", "large", N_TRAIN - 9, on_bad_image="replace", eval_split=TRAIN, eval_images=8)
    samples = read_calib_db(db)[0]
    assert not {s.image_id for s in samples} & {s.image_id for s in held_out}


# ---------------------------------------------------------------- legacy / pre-built DBs


def write_small_jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 30, 200)).save(path, quality=80)


def legacy_rows(size: str) -> list[calib.CalibSample]:
    return read_calib_db(LEGACY_DIR / f"coco2017_vlm_calib_{size}.db")[0]


def test_legacy_dbs_read():
    small, small_meta = read_calib_db(LEGACY_DIR / "coco2017_vlm_calib_small.db")
    medium, medium_meta = read_calib_db(LEGACY_DIR / "coco2017_vlm_calib_medium.db")
    assert (len(small), len(medium)) == (16, 128)
    assert small_meta == {} and medium_meta == {}  # the legacy tool wrote no meta table
    assert medium[:16] == small
    assert len({s.image_relpath for s in medium}) == 128
    for s in medium:
        assert s.image_relpath.startswith(f"{s.split}/") and s.image_relpath.endswith(".jpg")
        assert s.image_relpath == f"{s.split}/{s.image_id:012d}.jpg"
    for size, rows in (("small", small), ("medium", medium)):
        lines = (LEGACY_DIR / f"coco2017_captions_{size}.txt").read_text().splitlines()
        assert [normalise_caption(s.caption) for s in rows] == [normalise_caption(line) for line in lines]


def _write_prebuilt(folder: Path, rows: list[tuple]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(folder / "coco2017_vlm_calib_small.db")
    con.execute(
        "CREATE TABLE vlm_calib_samples (id INTEGER PRIMARY KEY AUTOINCREMENT, split TEXT, image_relpath TEXT, "
        "image_id INTEGER, caption_id INTEGER, caption TEXT)"
    )
    con.executemany("INSERT INTO vlm_calib_samples (split, image_relpath, image_id, caption_id, caption) VALUES (?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()


def test_prebuilt_db_with_null_caption_or_bad_id_is_rejected(coco: Path, tmp_path: Path):
    names = sorted(p.name for p in (coco / TRAIN).iterdir())[:2]
    good = (TRAIN, f"{TRAIN}/{names[0]}", 1, 11, "A caption.")
    _write_prebuilt(tmp_path / "null", [good, (TRAIN, f"{TRAIN}/{names[1]}", 2, 12, None)])
    with pytest.raises(VlmsensError, match=rf"{TRAIN}/{names[1]}: empty caption"):
        subset(coco, tmp_path / "out", "small", 2, prebuilt_dir=tmp_path / "null")
    _write_prebuilt(tmp_path / "badid", [good, (TRAIN, f"{TRAIN}/{names[1]}", "two", 12, "Text.")])
    with pytest.raises(VlmsensError, match="row 2 of vlm_calib_samples is malformed"):
        subset(coco, tmp_path / "out", "small", 2, prebuilt_dir=tmp_path / "badid")
    (tmp_path / "notdb").mkdir()
    (tmp_path / "notdb" / "coco2017_vlm_calib_small.db").write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(VlmsensError, match="not a readable SQLite DB"):
        subset(coco, tmp_path / "out", "small", 2, prebuilt_dir=tmp_path / "notdb")
    with pytest.raises(VlmsensError, match="calibration DB not found"):
        subset(coco, tmp_path / "out", "small", 2, prebuilt_dir=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()


def test_legacy_db_read_from_a_folder_with_uri_characters(tmp_path: Path):
    folder = tmp_path / "calib #1 ?x=%20"
    folder.mkdir()
    shutil.copy(LEGACY_DIR / "coco2017_vlm_calib_small.db", folder / "coco2017_vlm_calib_small.db")
    assert read_calib_db(folder / "coco2017_vlm_calib_small.db")[0] == legacy_rows("small")


@pytest.mark.parametrize("size, n", [("small", 16), ("medium", 128)])
def test_legacy_db_imported_as_prebuilt(tmp_path: Path, size: str, n: int):
    root = tmp_path / "coco"
    for s in legacy_rows("medium"):
        write_small_jpeg(root / s.image_relpath)
    meta, db, captions = subset(root, tmp_path / "out", size, n, prebuilt_dir=LEGACY_DIR)
    samples, stored = read_calib_db(db)
    legacy = legacy_rows(size)
    assert [(s.split, s.image_relpath, s.image_id, s.caption_id) for s in samples] == [
        (s.split, s.image_relpath, s.image_id, s.caption_id) for s in legacy
    ]
    assert [s.caption for s in samples] == [normalise_caption(s.caption) for s in legacy]
    assert captions.read_text().splitlines() == [s.caption for s in samples]
    assert stored["size_name"] == size and stored["num_samples"] == str(n)
    assert stored["prebuilt_had_meta"] == "false"
    assert stored["prebuilt_sha256"] == hashlib.sha256((LEGACY_DIR / f"coco2017_vlm_calib_{size}.db").read_bytes()).hexdigest()
    assert stored["tool"] == f"vlmsens {__version__}"
    assert set(stored) == set(meta)
    con = sqlite3.connect(db)
    try:
        assert "meta" in {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        con.close()
    if size == "medium":
        assert stored["split"] == f"{TRAIN},{VAL}"


def test_legacy_import_lists_missing_images(tmp_path: Path):
    root = tmp_path / "coco"
    rows = legacy_rows("medium")
    for s in rows[:100]:
        write_small_jpeg(root / s.image_relpath)
    out = tmp_path / "out"
    with pytest.raises(VlmsensError) as err:
        subset(root, out, "medium", 128, prebuilt_dir=LEGACY_DIR)
    message = str(err.value)
    assert "28 problem(s)" in message
    for s in rows[100 : 100 + MAX_LISTED]:
        assert f"{s.image_relpath}: file not found" in message
    assert f"... and {28 - MAX_LISTED} more" in message
    assert not (out / "coco2017_vlm_calib_medium.db").exists()


def test_legacy_import_rejects_a_corrupt_image(tmp_path: Path):
    root = tmp_path / "coco"
    rows = legacy_rows("small")
    for s in rows:
        write_small_jpeg(root / s.image_relpath)
    (root / rows[5].image_relpath).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(VlmsensError, match=rf"{rows[5].image_relpath}: cannot decode image"):
        subset(root, tmp_path / "out", "small", 16, prebuilt_dir=LEGACY_DIR)


def test_legacy_import_rejects_a_size_mismatch(tmp_path: Path):
    root = tmp_path / "coco"
    for s in legacy_rows("small"):
        write_small_jpeg(root / s.image_relpath)
    with pytest.raises(VlmsensError, match=r"holds 16 rows but sizes\.small is 17"):
        subset(root, tmp_path / "out", "small", 17, prebuilt_dir=LEGACY_DIR)
    assert not (tmp_path / "out" / "coco2017_vlm_calib_small.db").exists()


def test_legacy_import_rejects_overlap_with_the_eval_subset(tmp_path: Path):
    # The legacy medium DB holds four val2017 images; an evaluation subset drawn from a val2017
    # that contains only those must not be silently shared with calibration.
    root = tmp_path / "coco"
    rows = legacy_rows("medium")
    for s in rows:
        write_small_jpeg(root / s.image_relpath)
    val_rows = [s for s in rows if s.split == VAL]
    assert len(val_rows) == 4
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / f"captions_{VAL}.json").write_text(json.dumps({
        "images": [{"id": s.image_id, "file_name": Path(s.image_relpath).name} for s in val_rows],
        "annotations": [{"id": s.caption_id, "image_id": s.image_id, "caption": s.caption} for s in val_rows],
    }))
    with pytest.raises(VlmsensError, match="also in the held-out evaluation subset") as err:
        subset(root, tmp_path / "out", "medium", 128, prebuilt_dir=LEGACY_DIR, eval_split=VAL, eval_images=2)
    assert "choose another seed or coco.eval_split" in str(err.value)
    # The small DB has no val2017 image: accepted with the same settings.
    meta, _, _ = subset(root, tmp_path / "out", "small", 16, prebuilt_dir=LEGACY_DIR, eval_split=VAL, eval_images=2)
    assert meta["checked_against_held_out_images"] == 2


# ---------------------------------------------------------------- atomic writes


class _FailingConnection(sqlite3.Connection):
    """Writes half of the sample rows, then fails like a full disk."""

    def executemany(self, sql, rows):
        if calib.SAMPLES_TABLE in sql:
            rows = list(rows)
            super().executemany(sql, rows[: len(rows) // 2])
            raise sqlite3.OperationalError("database or disk is full (simulated)")
        return super().executemany(sql, rows)


def _fail_midway(monkeypatch) -> None:
    real_connect = sqlite3.connect

    def connect(*args, **kwargs):
        kwargs["factory"] = _FailingConnection
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(calib.sqlite3, "connect", connect)


def test_failed_write_leaves_no_file(coco: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    _fail_midway(monkeypatch)
    with pytest.raises(sqlite3.OperationalError, match="simulated"):
        subset(coco, out, "medium", 8)
    assert sorted(p.name for p in out.iterdir()) == []  # no DB, no captions, no temp or journal file


def test_failed_connect_leaves_no_file(coco: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "out"

    def connect(*args, **kwargs):
        raise sqlite3.OperationalError("unable to open database file (simulated)")

    monkeypatch.setattr(calib.sqlite3, "connect", connect)
    with pytest.raises(sqlite3.OperationalError, match="simulated"):
        subset(coco, out, "medium", 8)
    assert sorted(p.name for p in out.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_db(coco: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    _, db, captions = subset(coco, out, "medium", 8)
    before = db.read_bytes(), captions.read_bytes()
    _fail_midway(monkeypatch)
    with pytest.raises(sqlite3.OperationalError):
        subset(coco, out, "medium", 8, seed=SEED + 1)
    assert (db.read_bytes(), captions.read_bytes()) == before
    assert sorted(p.name for p in out.iterdir()) == sorted([db.name, captions.name])


def test_failed_captions_write_takes_the_new_db_away(coco: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "out"

    def fail(path, samples):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(calib, "write_captions", fail)
    with pytest.raises(OSError, match="simulated"):
        subset(coco, out, "medium", 8)
    assert sorted(p.name for p in out.iterdir()) == []
