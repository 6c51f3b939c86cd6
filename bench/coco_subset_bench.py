"""COCO subset extraction benchmark: ``vlmsens.calib.build_subset`` on a COCO train2017-sized captions file.

Generates a synthetic ``annotations/captions_train2017.json`` with as many images and captions as the
real one (118,287 images, 591,753 captions of 8-20 words, about 90 MB) plus JPEG files for the images
the selection will take, then runs ``build_subset`` once per size (small=16, medium=128, large=512), each
in a fresh Python process, recording the wall time of the process and its peak resident memory
(``os.wait4``, i.e. the child's own ``ru_maxrss``).

    .venv/bin/python bench/coco_subset_bench.py --write-results bench/RESULTS.md

Target: at most 30 s and 2 GiB per size.  CPU only; no GPU is used.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 118_287
TRAIN_CAPTIONS = 591_753
DEFAULT_SIZES = {"small": 16, "medium": 128, "large": 512}
TARGET_WALL_S = 30.0
TARGET_RSS_MIB = 2048.0
SECTION = "## COCO subset extraction"
RESULTS_HEADING = "# vlmsens benchmark results"

# Short everyday words: captions of 8-20 of them are about as long as COCO's.
WORDS = (
    "a an the man woman child dog cat horse bus car train plane boat bike kite pizza cake plate table "
    "chair couch bed tv laptop phone street road field park beach snow water sky tree grass wall room "
    "kitchen sink toilet window door sign light clock bird sheep cow bear zebra giraffe elephant ball "
    "bat racket skis board frisbee umbrella bag tie cup bowl fork knife spoon banana apple orange food "
    "is are sits stands walks runs rides holds eats plays looks flies lies parked next to on in at with "
    "of near under over by and two three some small large big red white black blue green old young "
    "little tall open empty busy city"
).split()


def generate_coco(
    root: str | Path,
    n_images: int = TRAIN_IMAGES,
    n_captions: int = TRAIN_CAPTIONS,
    seed: int = 0,
    split: str = "train2017",
) -> Path:
    """Write ``root/annotations/captions_{split}.json`` shaped like COCO's; return its path.

    Image ids are sparse like COCO's, every image has ``n_captions // n_images`` captions and the
    remainder goes one each to random images; annotations are shuffled (COCO's are not grouped).
    """
    if n_captions < n_images:
        raise ValueError("need at least one caption per image")
    rng = random.Random(seed)
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    image_ids = sorted(rng.sample(range(1, max(581_930, 5 * n_images)), n_images))
    images = []
    for image_id in image_ids:
        file_name = f"{image_id:012d}.jpg"
        width, height = rng.choice(((640, 480), (640, 427), (480, 640), (500, 375), (640, 426)))
        images.append(
            {
                "license": rng.randint(1, 8),
                "file_name": file_name,
                "coco_url": f"http://images.cocodataset.org/{split}/{file_name}",
                "height": height,
                "width": width,
                "date_captured": f"2013-11-{rng.randint(10, 28)} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
                "flickr_url": f"http://farm{rng.randint(1, 9)}.staticflickr.com/{rng.randint(1000, 9999)}/{rng.randint(10**9, 10**10 - 1)}_{rng.getrandbits(40):010x}_z.jpg",
                "id": image_id,
            }
        )
    per_image = n_captions // n_images
    owners = [i for i in image_ids for _ in range(per_image)]
    owners += rng.sample(image_ids, n_captions - len(owners)) if n_captions - len(owners) <= n_images else rng.choices(image_ids, k=n_captions - len(owners))
    rng.shuffle(owners)
    caption_ids = rng.sample(range(1, 2 * n_captions), n_captions)
    choices, triangular = rng.choices, rng.triangular
    annotations = []
    for owner, caption_id in zip(owners, caption_ids, strict=True):
        # 8-20 words, most of them short (COCO's mean is about 11 words).
        text = " ".join(choices(WORDS, k=min(20, int(triangular(8, 21, 8)))))
        annotations.append({"image_id": owner, "id": caption_id, "caption": text[0].upper() + text[1:] + "."})
    payload = {
        "info": {"description": "vlmsens synthetic COCO captions (benchmark)", "version": "1.0", "year": 2017},
        "licenses": [{"url": "http://creativecommons.org/licenses/by/2.0/", "id": i, "name": "Attribution License"} for i in range(1, 9)],
        "images": images,
        "annotations": annotations,
    }
    path = root / "annotations" / f"captions_{split}.json"
    with open(path, "w") as handle:
        json.dump(payload, handle, separators=(",", ":"))
    return path


def selected_relpaths(root: str | Path, count: int, seed: int = 0, split: str = "train2017") -> list[str]:
    """Relative paths of the first ``count`` candidates of the seeded order (what ``build_subset`` takes)."""
    from vlmsens.calib import _candidate_order, load_annotations

    file_names, captions = load_annotations(Path(root) / "annotations" / f"captions_{split}.json")
    order = _candidate_order(list(captions), seed, 0)
    return [f"{split}/{file_names[i]}" for i in order[:count]]


def write_jpegs(root: str | Path, relpaths: list[str], width: int = 640, height: int = 480, variants: int = 8, seed: int = 0) -> int:
    """Write photo-sized JPEGs (smooth colour fields plus noise) at ``relpaths``; return total bytes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(max(1, variants)):
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
        noisy = np.clip(field + rng.integers(-24, 25, size=field.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noisy).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    total = 0
    for index, relpath in enumerate(relpaths):
        target = Path(root) / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blobs[index % len(blobs)])
        total += len(blobs[index % len(blobs)])
    return total


_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from vlmsens.calib import build_subset
t1 = time.perf_counter()
build_subset(**json.loads(sys.argv[1]))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "build_s": t2 - t1}))
"""


def run_extraction(
    coco_root: str | Path,
    out_dir: str | Path,
    size_name: str,
    num_samples: int,
    seed: int = 0,
    split: str = "train2017",
    decode_images: bool = True,
) -> dict:
    """Run ``build_subset`` for one size in a fresh interpreter; wall time and that process's peak RSS."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {
        "coco_root": str(coco_root),
        "split": split,
        "size_name": size_name,
        "num_samples": num_samples,
        "seed": seed,
        "db_path": str(out_dir / f"coco2017_vlm_calib_{size_name}.db"),
        "captions_path": str(out_dir / f"coco2017_captions_{size_name}.txt"),
        "on_bad_image": "error",
        "eval_split": "val2017",
        "eval_images": 100,
        "decode_images": decode_images,
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(kwargs)], stdout=stdout, stderr=stderr, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read().decode(), stderr.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"build_subset {size_name} failed (exit {proc.returncode}):\n{err[-4000:]}")
    inner = json.loads(out.strip().splitlines()[-1])
    return {
        "size": size_name,
        "samples": num_samples,
        "wall_s": wall,
        "build_s": inner["build_s"],
        "import_s": inner["import_s"],
        "peak_rss_mib": usage.ru_maxrss / 1024.0,  # Linux reports KiB
        "db_path": kwargs["db_path"],
    }


def machine() -> dict:
    mem_gib = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    mem_gib = int(line.split()[1]) / 1024**2
                    break
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((ln.split(":", 1)[1].strip() for ln in handle if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "ram_gib": mem_gib,
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def render_table(rows: list[dict]) -> str:
    lines = [
        "| size | samples | wall s (process) | build_subset s | peak RSS MiB | within target |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = r["wall_s"] <= TARGET_WALL_S and r["peak_rss_mib"] <= TARGET_RSS_MIB
        lines.append(
            f"| {r['size']} | {r['samples']} | {r['wall_s']:.2f} | {r['build_s']:.2f} | {r['peak_rss_mib']:.0f} | {'yes' if ok else 'NO'} |"
        )
    return "\n".join(lines)


def render_section(rows: list[dict], info: dict, command: str) -> str:
    m = info["machine"]
    ram = f"{m['ram_gib']:.1f} GiB" if m["ram_gib"] else "unknown"
    return "\n".join(
        [
            SECTION,
            "",
            f"Measured {info['date']} with `{command}`.",
            "",
            f"Machine: {m['nproc']} CPUs ({m['cpu']}), {ram} RAM, Python {m['python']}, {m['platform']}"
            + (f"; 1-min load average {m['loadavg']:.1f} when the runs started (other work shared the CPUs)." if m.get("loadavg") else "."),
            "",
            f"Input: synthetic `captions_train2017.json` with {info['images']:,} images and {info['captions']:,} captions "
            f"(8-20 words each), {info['json_mib']:.1f} MiB, generated in {info['generate_s']:.1f} s; "
            f"{info['jpegs']} JPEGs of {info['jpeg_size']} ({info['jpeg_kib']:.0f} KiB each on average) at the selected paths. "
            "Each size runs `vlmsens.calib.build_subset` (`on_bad_image: error`, every selected image decoded, "
            "eval split val2017) in a fresh Python process; wall time is the whole process (interpreter start and "
            f"imports included; files in the page cache), peak RSS is that process's `ru_maxrss`. "
            f"Fastest wall time of {info.get('repeats', 1)} run(s) per size, largest peak RSS of them.",
            "",
            render_table(rows),
            "",
            f"Target: at most {TARGET_WALL_S:.0f} s and {TARGET_RSS_MIB / 1024:.0f} GiB per size.",
            "",
        ]
    )


def write_section(path: str | Path, section: str) -> None:
    """Put ``section`` into the results file, replacing an earlier copy and keeping every other section."""
    path = Path(path)
    text = path.read_text() if path.exists() else RESULTS_HEADING + "\n"
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == SECTION), None)
    if start is None:
        body = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        before = "\n".join(lines[:start]).rstrip("\n")
        after = "\n".join(lines[end:])
        body = before + "\n\n" + section.rstrip("\n") + "\n" + ("\n" + after.rstrip("\n") + "\n" if after.strip() else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)


def run_bench(
    workdir: str | Path,
    sizes: dict[str, int],
    n_images: int = TRAIN_IMAGES,
    n_captions: int = TRAIN_CAPTIONS,
    seed: int = 0,
    jpeg_size: tuple[int, int] = (640, 480),
    repeats: int = 1,
) -> tuple[list[dict], dict]:
    workdir = Path(workdir)
    coco = workdir / "coco"
    t0 = time.perf_counter()
    ann = generate_coco(coco, n_images, n_captions, seed=seed)
    load = machine()["loadavg"]
    generate_s = time.perf_counter() - t0
    relpaths = selected_relpaths(coco, max(sizes.values()), seed=seed)
    jpeg_bytes = write_jpegs(coco, relpaths, *jpeg_size)
    rows = []
    for name, count in sizes.items():
        runs = [run_extraction(coco, workdir / "out", name, count, seed=seed) for _ in range(max(1, repeats))]
        best = min(runs, key=lambda r: r["wall_s"])
        best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
        _check_prefix(best["db_path"], relpaths[:count])
        rows.append(best)
    info = {
        "images": n_images,
        "captions": n_captions,
        "json_mib": ann.stat().st_size / 2**20,
        "generate_s": generate_s,
        "jpegs": len(relpaths),
        "jpeg_size": f"{jpeg_size[0]}x{jpeg_size[1]}",
        "jpeg_kib": jpeg_bytes / max(1, len(relpaths)) / 1024,
        "machine": {**machine(), "loadavg": load},
        "date": _dt.date.today().isoformat(),
        "repeats": max(1, repeats),
    }
    return rows, info


def _check_prefix(db_path: str, expected: list[str]) -> None:
    from vlmsens.calib import read_calib_db

    samples, _ = read_calib_db(db_path)
    got = [s.image_relpath for s in samples]
    if got != expected:
        raise RuntimeError(f"{db_path}: selection differs from the seeded candidate order the JPEGs were written for")


def _parse_sizes(text: str) -> dict[str, int]:
    sizes = {}
    for part in text.split(","):
        name, _, count = part.partition("=")
        sizes[name.strip()] = int(count)
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=TRAIN_IMAGES)
    parser.add_argument("--captions", type=int, default=TRAIN_CAPTIONS)
    parser.add_argument("--sizes", type=_parse_sizes, default=DEFAULT_SIZES, help="e.g. small=16,medium=128,large=512")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per size; the fastest wall time is reported")
    parser.add_argument("--workdir", help="keep the generated tree here (default: a temporary folder)")
    parser.add_argument("--write-results", metavar="MD", help="write/replace the 'COCO subset extraction' section of this file")
    args = parser.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/coco_subset_bench.py", *(sys.argv[1:] if argv is None else argv)])
    if args.workdir:
        rows, info = run_bench(args.workdir, args.sizes, args.images, args.captions, args.seed, repeats=args.repeats)
    else:
        with tempfile.TemporaryDirectory(prefix="vlmsens-coco-bench-") as tmp:
            rows, info = run_bench(tmp, args.sizes, args.images, args.captions, args.seed, repeats=args.repeats)
    section = render_section(rows, info, command)
    print(section)
    if args.write_results:
        write_section(args.write_results, section)
    ok = all(r["wall_s"] <= TARGET_WALL_S and r["peak_rss_mib"] <= TARGET_RSS_MIB for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
