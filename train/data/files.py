"""File lists: the ImageFolder class mapping, and the scan that checks every image once.

The pipelines never walk a dataset themselves; they read a `FileList` (root, relative paths, labels,
class names). `scan` builds the clean list: every file is fully decoded once (in parallel, resumable),
files that cannot be decoded or are truncated are listed in `bad.tsv` and left out, files that decode
but are not plain RGB/gray JPEGs (CMYK, PNG or GIF renamed .jpg, ...) are kept and listed in
`notes.tsv`. The class mapping always comes from the directory names, so dropping a bad file (or a
class whose files are all bad) never shifts the labels of the others.
"""
import json
import logging
import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

log = logging.getLogger(__name__)

# torchvision's ImageFolder extensions (lower-case match), so class mapping and order are the reference's.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class FileList:
    root: Path
    paths: list        # relative to root, ImageFolder order
    labels: list       # int, index into classes
    classes: list      # class names; label i <-> classes[i]

    def __len__(self):
        return len(self.paths)

    def abspath(self, i):
        return os.path.join(self.root, self.paths[i])

    def write(self, out_dir):
        """files.tsv (relpath<TAB>label) + classes.json + root.txt, written atomically."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(out_dir / "classes.json", json.dumps(self.classes, indent=0))
        _atomic_write(out_dir / "root.txt", str(Path(self.root).resolve()) + "\n")
        _atomic_write(out_dir / "files.tsv", "".join(f"{p}\t{y}\n" for p, y in zip(self.paths, self.labels)))

    @classmethod
    def read(cls, scan_dir, root=None):
        scan_dir = Path(scan_dir)
        classes = json.loads((scan_dir / "classes.json").read_text())
        root = Path(root) if root is not None else Path((scan_dir / "root.txt").read_text().strip())
        paths, labels = [], []
        for line in (scan_dir / "files.tsv").read_text().splitlines():
            p, y = line.rsplit("\t", 1)
            paths.append(p)
            labels.append(int(y))
        return cls(root, paths, labels, classes)


def find_classes(root):
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders in {root} (expected ROOT/<class>/<image>)")
    return classes


def image_folder(root):
    """The file list torchvision.datasets.ImageFolder(root) would build, unchecked, same order."""
    root = Path(root)
    classes = find_classes(root)
    paths, labels = [], []
    for label, name in enumerate(classes):
        for dirpath, _, fnames in sorted(os.walk(root / name, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    paths.append(os.path.relpath(os.path.join(dirpath, fname), root))
                    labels.append(label)
    return FileList(root, paths, labels, classes)


def load_file_list(data):
    """A scan folder (has files.tsv) or an image root (walked like ImageFolder, unchecked)."""
    data = Path(data)
    if (data / "files.tsv").is_file():
        return FileList.read(data)
    log.warning("%s has no files.tsv: using the unchecked ImageFolder listing (run `python -m train.data scan`)",
                data)
    return image_folder(data)


# ---------------------------------------------------------------------------------------------- the scan

_JPEG_EXT = (".jpg", ".jpeg")


def check_image(path):
    """Decode one file fully. Returns (status, note): status 'ok' or 'bad'; note says what is odd."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            fmt, mode = im.format, im.mode
            im.load()  # full decode: a truncated file raises here (PIL's LOAD_TRUNCATED_IMAGES is off)
            im.convert("RGB")
    except Exception as e:  # noqa: BLE001 -- any decode failure means "bad file", the reason is kept
        return "bad", f"{type(e).__name__}: {e}".replace("\t", " ").replace("\n", " ")[:300]
    notes = []
    if path.lower().endswith(_JPEG_EXT) and fmt != "JPEG":
        notes.append(f"{fmt}-in-jpg")
    if mode not in ("RGB", "L"):
        notes.append(mode)
    elif mode == "L":
        notes.append("grayscale")
    return "ok", ",".join(notes)


def _check(args):
    rel, path = args
    status, note = check_image(path)
    return rel, status, note


def scan(root, out_dir=None, workers=None, chunksize=16, progress=True):
    """Check every image under root once; write the clean list to out_dir (default: ROOT.scan beside root).

    Resumable: results are appended to out_dir/scan.partial.jsonl as they come; a rerun checks only the
    files not in it (a torn last line is ignored). Returns a dict of counts.
    """
    root = Path(root).resolve()
    out_dir = Path(out_dir) if out_dir else root.with_name(root.name + ".scan")
    out_dir.mkdir(parents=True, exist_ok=True)
    listing = image_folder(root)
    partial = out_dir / "scan.partial.jsonl"
    done = _read_partial(partial)
    todo = [(p, os.path.join(root, p)) for p in listing.paths if p not in done]
    log.info("scan %s: %d files, %d already checked, %d to check", root, len(listing), len(done), len(todo))
    if todo:
        workers = workers or os.cpu_count() or 1
        bar = _progress(len(todo), "scan") if progress else None
        _end_with_newline(partial)
        with open(partial, "a") as f, get_context("fork").Pool(workers) as pool:
            for i, (rel, status, note) in enumerate(pool.imap_unordered(_check, todo, chunksize=chunksize)):
                done[rel] = (status, note)
                f.write(json.dumps({"path": rel, "status": status, "note": note}) + "\n")
                if i % 256 == 0:
                    f.flush()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()

    keep = [i for i, p in enumerate(listing.paths) if done[p][0] == "ok"]
    clean = FileList(root, [listing.paths[i] for i in keep], [listing.labels[i] for i in keep], listing.classes)
    bad = [(p, done[p][1]) for p in listing.paths if done[p][0] == "bad"]
    notes = [(p, done[p][1]) for p in listing.paths if done[p][0] == "ok" and done[p][1]]
    clean.write(out_dir)
    _atomic_write(out_dir / "bad.tsv", "".join(f"{p}\t{r}\n" for p, r in bad))
    _atomic_write(out_dir / "notes.tsv", "".join(f"{p}\t{r}\n" for p, r in notes))
    counts = {"files": len(listing), "ok": len(clean), "bad": len(bad), "noted": len(notes),
              "classes": len(listing.classes),
              "empty_classes": [c for i, c in enumerate(listing.classes) if i not in set(clean.labels)]}
    for kind in sorted({k for _, r in notes for k in r.split(",")}):
        counts[f"note:{kind}"] = sum(kind in r.split(",") for _, r in notes)
    _atomic_write(out_dir / "summary.json", json.dumps(counts, indent=1))
    log.info("scan %s: %s (clean list in %s)", root, counts, out_dir)
    if bad:
        log.warning("scan: %d bad files left out, listed in %s", len(bad), out_dir / "bad.tsv")
    return counts


def _read_partial(path):
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # torn write of a killed run: that file is simply checked again
                continue
            done[r["path"]] = (r["status"], r["note"])
    return done


def _end_with_newline(path):
    """After a torn last line, start the next record on its own line."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _atomic_write(path, text):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _progress(total, desc):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)
