"""COCO 2017 calibration subsets: nested, seeded, validated, written atomically.

Contract (docs/DESIGN.md, "Data contracts"): one SQLite DB per size with the legacy
``vlm_calib_samples`` table plus a ``meta`` table, and a captions text file with the same captions
in the same order. Subsets of one config are nested (small ⊂ medium ⊂ large, prefix order); the
held-out evaluation subset never shares an image with a calibration subset.
"""

from __future__ import annotations

import json
import logging
import numbers
import posixpath
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from . import __version__
from .errors import VlmsensError
from .io import atomic_path, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

SAMPLES_TABLE = "vlm_calib_samples"
SAMPLE_COLUMNS = ("id", "split", "image_relpath", "image_id", "caption_id", "caption")
_CREATE_SAMPLES = f"""
CREATE TABLE {SAMPLES_TABLE} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    split TEXT NOT NULL,
    image_relpath TEXT NOT NULL,
    image_id INTEGER NOT NULL,
    caption_id INTEGER NOT NULL,
    caption TEXT NOT NULL
)"""
_CREATE_META = "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)"
# How many offending entries an error lists before it only counts the rest.
MAX_LISTED = 10


@dataclass(frozen=True)
class CalibSample:
    split: str
    image_relpath: str
    image_id: int
    caption_id: int
    caption: str


@dataclass
class Selection:
    samples: list[CalibSample]
    skipped: list[dict] = field(default_factory=list)


def _listed(problems: list[str]) -> str:
    """The first MAX_LISTED problems, one per line, and how many more there are."""
    listed = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"  {listed}{more}"


def normalise_caption(text: str) -> str:
    """One line, single spaces: captions become one line of the captions file."""
    return re.sub(r"\s+", " ", text or "").strip()


def load_annotations(path: str | Path) -> tuple[dict[int, str], dict[int, list[tuple[int, str]]]]:
    """File name per image id, and (caption id, caption) pairs per image id, from a COCO captions JSON."""
    path = Path(path)
    if not path.is_file():
        raise VlmsensError(f"COCO captions file not found: {path}. Check coco.root in the config.")
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise VlmsensError(f"COCO captions file {path} is not valid JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise VlmsensError(
            f"COCO captions file {path} is not valid UTF-8 (byte {err.start}: {err.reason}); "
            "save it as UTF-8 (the COCO annotations are UTF-8 JSON)"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise VlmsensError(f"COCO captions file {path} lacks the 'images' or 'annotations' list.")
    images, annotations = data["images"], data["annotations"]
    del data
    file_names: dict[int, str] = {}
    captions: dict[int, list[tuple[int, str]]] = {}
    entry: object = None
    try:
        for entry in images:
            file_names[int(entry["id"])] = str(entry["file_name"])
        for entry in annotations:
            text = entry.get("caption")
            # A null or non-text caption is no caption (str(None) would make it the caption "None").
            captions.setdefault(int(entry["image_id"]), []).append((int(entry["id"]), text if isinstance(text, str) else ""))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        shown = json.dumps(entry, default=str)[:200]
        raise VlmsensError(
            f"COCO captions file {path} has a malformed entry ({type(err).__name__}: {err}): {shown}; "
            "every image needs 'id' and 'file_name', every annotation 'id', 'image_id' and 'caption'."
        ) from None
    return file_names, captions


def unsafe_path_reason(relpath: str) -> str | None:
    """Why ``relpath`` may not be used as a path relative to the COCO root, or None."""
    if "\x00" in relpath:
        return "path contains a NUL byte"
    posix = PurePosixPath(relpath.replace("\\", "/"))
    if posix.is_absolute() or re.match(r"^[A-Za-z]:", relpath):
        return "absolute path"
    if ".." in posix.parts:
        return "path escapes the COCO root ('..')"
    return None


def image_problem(coco_root: Path, relpath: str, *, decode: bool = True) -> str | None:
    """Why ``relpath`` is not a usable image under ``coco_root``, or None when it is."""
    reason = unsafe_path_reason(relpath)
    if reason:
        return reason
    # The checks above keep annotation-supplied paths inside the root. Symbolic links that the user
    # put under the root (train2017 -> another disk is a common layout) are followed on purpose.
    full = Path(coco_root) / relpath
    if not full.is_file():
        return "file not found"
    if decode:
        from PIL import Image

        try:
            with Image.open(full) as img:
                img.load()
        except Exception as err:  # PIL raises many types for corrupt data
            return f"cannot decode image ({type(err).__name__}: {err})"
    return None


def _candidate_order(image_ids: list[int], seed: int, salt: int) -> list[int]:
    """A seeded permutation of sorted image ids; the same on any machine for the same inputs."""
    rng = np.random.default_rng([seed, salt])
    ordered = np.array(sorted(image_ids), dtype=np.int64)
    return ordered[rng.permutation(len(ordered))].tolist()


def _pick_caption(captions: list[tuple[int, str]], seed: int, image_id: int) -> tuple[int, str] | None:
    usable = sorted((cid, normalise_caption(text)) for cid, text in captions if normalise_caption(text))
    if not usable:
        return None
    rng = np.random.default_rng([seed, image_id])
    return usable[int(rng.integers(len(usable)))]


def select_samples(
    coco_root: str | Path,
    split: str,
    num_samples: int,
    seed: int,
    *,
    on_bad_image: str = "error",
    exclude_image_ids: frozenset[int] = frozenset(),
    salt: int = 0,
    decode_images: bool = True,
    annotations: tuple[dict, dict] | None = None,
    count_key: str = "sizes",
) -> Selection:
    """The first ``num_samples`` usable images of the seeded order, one caption each.

    Taking a prefix of one fixed order makes subsets of different sizes nested. A bad candidate
    (missing file, undecodable, path outside the root, no non-empty caption) raises, or with
    ``on_bad_image='replace'`` is skipped for the next candidate and recorded in ``skipped``.
    ``count_key`` is the config key of ``num_samples``, named when the split has too few images.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples <= 0:
        raise VlmsensError(f"sample count must be a positive integer, got {num_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise VlmsensError(f"seed must be a non-negative integer, got {seed!r}")
    if on_bad_image not in ("error", "replace"):
        raise VlmsensError(f"coco.on_bad_image must be 'error' or 'replace', got {on_bad_image!r}")
    root = Path(coco_root)
    file_names, captions = annotations or load_annotations(root / "annotations" / f"captions_{split}.json")
    order = [i for i in _candidate_order(list(captions), seed, salt) if i not in exclude_image_ids]
    samples: list[CalibSample] = []
    skipped: list[dict] = []
    problems: list[str] = []
    used: dict[str, int] = {}  # normalised relpath -> image id, so no file is taken twice
    considered = 0  # candidates counted against the subset: usable ones, plus bad ones in error mode
    for image_id in order:
        if considered == num_samples:
            break
        file_name = file_names.get(image_id)
        if file_name is None:
            relpath, problem = None, "image id has no entry in 'images'"
        elif reason := unsafe_path_reason(file_name):
            relpath, problem = file_name, reason  # reported as written in the annotations
        else:
            relpath = f"{split}/{file_name}"
            first = used.get(posixpath.normpath(relpath.replace("\\", "/")))
            if first is not None:
                problem = f"same file as image id {first} (listed twice in 'images')"
            else:
                problem = image_problem(root, relpath, decode=decode_images)
        picked = None if problem else _pick_caption(captions[image_id], seed, image_id)
        if problem is None and picked is None:
            problem = "no non-empty caption"
        if problem:
            entry = {"image_id": image_id, "path": relpath, "problem": problem}
            if on_bad_image == "error":
                # A bad candidate still takes its place, so the error lists every bad entry
                # of the subset as requested, not just the first.
                problems.append(f"{relpath or image_id}: {problem}")
                considered += 1
            else:
                skipped.append(entry)
            continue
        samples.append(CalibSample(split, relpath, image_id, picked[0], picked[1]))
        used[posixpath.normpath(relpath.replace("\\", "/"))] = image_id
        considered += 1
    if problems:
        raise VlmsensError(
            f"{len(problems)} bad calibration image(s) in {root}/{split} among the first "
            f"{num_samples} candidates:\n{_listed(problems)}\n"
            "Fix the files, or set coco.on_bad_image: replace to skip them deterministically."
        )
    if len(samples) < num_samples:
        raise VlmsensError(
            f"only {len(samples)} usable images in {root}/{split} for a subset of {num_samples} "
            f"({len(skipped)} skipped); lower {count_key} in the config or fix the data."
        )
    return Selection(samples=samples, skipped=skipped)


def write_calib_db(path: str | Path, samples: list[CalibSample], meta: dict[str, object]) -> None:
    """Write the DB atomically: a reader never sees a half-written file under ``path``."""
    with atomic_path(path) as tmp:
        tmp.unlink()
        con = sqlite3.connect(tmp)
        try:
            con.execute(_CREATE_SAMPLES)
            con.execute(_CREATE_META)
            con.executemany(
                f"INSERT INTO {SAMPLES_TABLE} (split, image_relpath, image_id, caption_id, caption) "
                "VALUES (?, ?, ?, ?, ?)",
                [(s.split, s.image_relpath, s.image_id, s.caption_id, s.caption) for s in samples],
            )
            con.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in sorted(meta.items())],
            )
            con.commit()
        finally:
            con.close()


def write_captions(path: str | Path, samples: list[CalibSample]) -> None:
    atomic_write_text(path, "".join(s.caption + "\n" for s in samples))


def read_calib_db(path: str | Path) -> tuple[list[CalibSample], dict[str, str]]:
    """Rows in id order and the meta table (empty for legacy DBs without one)."""
    path = Path(path)
    if not path.is_file():
        raise VlmsensError(f"calibration DB not found: {path}")
    try:
        # as_uri() percent-encodes the path: '?', '#' or '%' in a folder name stay part of the path.
        con = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if SAMPLES_TABLE not in tables:
                raise VlmsensError(
                    f"{path} has no table {SAMPLES_TABLE!r} (tables: {sorted(tables)}); "
                    "it is not a calibration DB of this schema."
                )
            columns = [r[1] for r in con.execute(f"PRAGMA table_info({SAMPLES_TABLE})")]
            missing = [c for c in SAMPLE_COLUMNS if c not in columns]
            if missing:
                raise VlmsensError(f"{path}: table {SAMPLES_TABLE} lacks column(s) {missing}")
            rows = con.execute(
                f"SELECT split, image_relpath, image_id, caption_id, caption FROM {SAMPLES_TABLE} ORDER BY id"
            ).fetchall()
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
        finally:
            con.close()
    except sqlite3.DatabaseError as err:
        raise VlmsensError(f"{path} is not a readable SQLite DB: {err}") from None
    samples = []
    for number, (split, relpath, image_id, caption_id, caption) in enumerate(rows, start=1):
        try:
            if split is None or relpath is None:
                raise ValueError("NULL split or image_relpath")
            # A NULL caption is an empty one (str(None) would make it the caption "None").
            samples.append(CalibSample(str(split), str(relpath), int(image_id), int(caption_id), "" if caption is None else str(caption)))
        except (TypeError, ValueError) as err:
            raise VlmsensError(
                f"{path}: row {number} of {SAMPLES_TABLE} is malformed ({err}): "
                f"{(split, relpath, image_id, caption_id, caption)!r}"
            ) from None
    return samples, meta


def _validate_rows(samples: list[CalibSample], coco_root: Path, source: Path, decode: bool) -> None:
    problems = []
    for s in samples:
        problem = image_problem(coco_root, s.image_relpath, decode=decode)
        if problem is None and not normalise_caption(s.caption):
            problem = "empty caption"
        if problem:
            problems.append(f"{s.image_relpath}: {problem}")
    seen, repeats = set(), []
    for s in samples:
        if s.image_relpath in seen:
            repeats.append(s.image_relpath)
        seen.add(s.image_relpath)
    if repeats:
        problems.append(f"{len(repeats)} image(s) repeated, e.g. {repeats[0]}")
    if problems:
        raise VlmsensError(
            f"pre-built calibration DB {source}: {len(problems)} problem(s) against COCO root {coco_root}:\n"
            f"{_listed(problems)}"
        )


def _check_disjoint_from_held_out(samples: list[CalibSample], held_out: frozenset[str], source: Path) -> None:
    shared = [f"{s.image_relpath}: also in the held-out evaluation subset" for s in samples
              if posixpath.normpath(s.image_relpath) in held_out]
    if shared:
        raise VlmsensError(
            f"pre-built calibration DB {source}: {len(shared)} problem(s):\n{_listed(shared)}\n"
            "The evaluation subset must not share images with calibration: choose another seed or coco.eval_split."
        )


def _held_out(
    root: Path, split: str, eval_images: int, seed: int, decode_images: bool, annotations: tuple[dict, dict] | None
) -> Selection:
    """The images ``build_eval_subset`` takes, computed the same way (salt 1, same decoding).

    Replace mode gives exactly the evaluation subset whenever that one can be built: in error mode
    it succeeds only when its first candidates are all good, and then both agree.
    """
    try:
        return select_samples(
            root, split, eval_images, seed, on_bad_image="replace", salt=1,
            decode_images=decode_images, annotations=annotations, count_key="coco.eval_images",
        )
    except VlmsensError as err:
        raise VlmsensError(f"held-out evaluation subset (coco.eval_images={eval_images}, split {split}): {err}") from None


def _write_outputs(db_path: str | Path, captions_path: str | Path, samples: list[CalibSample], meta: dict) -> None:
    """DB then captions, each atomic; a failed captions write takes the new DB away again."""
    write_calib_db(db_path, samples, meta)
    try:
        write_captions(captions_path, samples)
    except BaseException:
        Path(db_path).unlink(missing_ok=True)
        raise


def build_subset(
    *,
    coco_root: str | Path,
    split: str,
    size_name: str,
    num_samples: int,
    seed: int,
    db_path: str | Path,
    captions_path: str | Path,
    on_bad_image: str = "error",
    eval_split: str | None = None,
    eval_images: int = 0,
    prebuilt_dir: str | Path | None = None,
    decode_images: bool = True,
) -> dict[str, object]:
    """Write one calibration subset (DB + captions) and return its meta."""
    root = Path(coco_root)
    if prebuilt_dir:

        def held_out_paths() -> frozenset[str]:
            if not (eval_split and eval_images):
                return frozenset()
            eval_file = root / "annotations" / f"captions_{eval_split}.json"
            if not eval_file.is_file():
                log.warning("%s not found: cannot check the pre-built DB against the evaluation subset", eval_file)
                return frozenset()
            return frozenset(
                posixpath.normpath(s.image_relpath)
                for s in _held_out(root, eval_split, eval_images, seed, decode_images, None).samples
            )

        return import_prebuilt(
            prebuilt_dir=prebuilt_dir,
            size_name=size_name,
            num_samples=num_samples,
            coco_root=root,
            db_path=db_path,
            captions_path=captions_path,
            decode_images=decode_images,
            held_out_relpaths=held_out_paths,
        )
    annotation_file = root / "annotations" / f"captions_{split}.json"
    annotations = load_annotations(annotation_file)
    exclude: frozenset[int] = frozenset()
    n_held_out = 0
    if eval_split == split and eval_images:
        # Same split for both: the held-out images are removed from the calibration candidates.
        held_out = _held_out(root, split, eval_images, seed, decode_images, annotations)
        held_paths = {posixpath.normpath(s.image_relpath) for s in held_out.samples}
        # By id, and by file for ids that name the same file as a held-out image.
        exclude = frozenset(s.image_id for s in held_out.samples) | frozenset(
            i for i, name in annotations[0].items() if posixpath.normpath(f"{split}/{name}") in held_paths
        )
        n_held_out = len(held_out.samples)
    selection = select_samples(
        root, split, num_samples, seed, on_bad_image=on_bad_image, exclude_image_ids=exclude,
        decode_images=decode_images, annotations=annotations, count_key=f"sizes.{size_name}",
    )
    meta = {
        "source_dataset": "coco2017",
        "size_name": size_name,
        "num_samples": str(num_samples),
        "random_seed": str(seed),
        "split": split,
        "role": "calibration",
        "selection": "seeded permutation of image ids, prefix order (nested across sizes), one caption per image",
        "annotation_file": str(annotation_file.relative_to(root)),
        "annotation_sha256": sha256_file(annotation_file),
        "on_bad_image": on_bad_image,
        "skipped": selection.skipped,
        "excluded_held_out_images": n_held_out,
        "tool": f"vlmsens {__version__}",
    }
    _write_outputs(db_path, captions_path, selection.samples, meta)
    log.info("%s subset: %d samples from %s (%d skipped)", size_name, num_samples, split, len(selection.skipped))
    return meta


def build_eval_subset(
    *,
    coco_root: str | Path,
    split: str,
    num_images: int,
    seed: int,
    db_path: str | Path,
    captions_path: str | Path,
    on_bad_image: str = "error",
    decode_images: bool = True,
) -> dict[str, object]:
    """The held-out evaluation subset; salt 1 keeps its order independent of calibration's."""
    root = Path(coco_root)
    annotation_file = root / "annotations" / f"captions_{split}.json"
    selection = select_samples(
        root, split, num_images, seed, on_bad_image=on_bad_image, salt=1, decode_images=decode_images,
        count_key="coco.eval_images",
    )
    meta = {
        "source_dataset": "coco2017",
        "size_name": "eval",
        "num_samples": str(num_images),
        "random_seed": str(seed),
        "split": split,
        "role": "held-out evaluation",
        "annotation_file": str(annotation_file.relative_to(root)),
        "annotation_sha256": sha256_file(annotation_file),
        "on_bad_image": on_bad_image,
        "skipped": selection.skipped,
        "tool": f"vlmsens {__version__}",
    }
    _write_outputs(db_path, captions_path, selection.samples, meta)
    return meta


def import_prebuilt(
    *,
    prebuilt_dir: str | Path,
    size_name: str,
    num_samples: int,
    coco_root: Path,
    db_path: str | Path,
    captions_path: str | Path,
    decode_images: bool = True,
    held_out_relpaths: frozenset[str] | Callable[[], frozenset[str]] = frozenset(),
) -> dict[str, object]:
    """Accept a pre-built DB (e.g. the legacy tool's) after validating its schema and images.

    ``held_out_relpaths`` are the evaluation subset's images (or a function returning them, called
    only once the DB's own rows are valid); a pre-built row using one is an error.
    """
    source = Path(prebuilt_dir) / f"coco2017_vlm_calib_{size_name}.db"
    samples, source_meta = read_calib_db(source)
    if len(samples) != num_samples:
        raise VlmsensError(
            f"pre-built DB {source} holds {len(samples)} rows but sizes.{size_name} is {num_samples}; "
            "make the config's size match the file."
        )
    _validate_rows(samples, Path(coco_root), source, decode_images)
    held_out = frozenset(held_out_relpaths() if callable(held_out_relpaths) else held_out_relpaths)
    _check_disjoint_from_held_out(samples, held_out, source)
    samples = [CalibSample(s.split, s.image_relpath, s.image_id, s.caption_id, normalise_caption(s.caption)) for s in samples]
    meta = {
        "source_dataset": source_meta.get("source_dataset", "coco2017"),
        "size_name": size_name,
        "num_samples": str(len(samples)),
        "random_seed": source_meta.get("random_seed", "unknown (pre-built)"),
        "split": ",".join(sorted({s.split for s in samples})),
        "role": "calibration",
        "prebuilt_from": str(source),
        "prebuilt_sha256": sha256_file(source),
        "prebuilt_had_meta": bool(source_meta),
        "checked_against_held_out_images": len(held_out),
        "tool": f"vlmsens {__version__}",
    }
    _write_outputs(db_path, captions_path, samples, meta)
    return meta
