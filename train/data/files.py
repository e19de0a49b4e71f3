"""File lists: the ImageFolder class mapping, and the scan that checks every image once.

The pipelines never walk a dataset themselves; they read a `FileList` (root, relative paths, labels,
class names). `scan` builds the clean list: every file is fully decoded once (in parallel, resumable),
files that cannot be decoded or are truncated are listed in `bad.tsv` and left out, files that decode
but are not plain RGB/gray JPEGs (CMYK, PNG or GIF renamed .jpg, ...) are kept and listed in
`notes.tsv`. The class mapping always comes from the directory names, so dropping a bad file (or a
class whose files are all bad) never shifts the labels of the others.

Only regular files are opened: a FIFO, socket or device named like an image (a FIFO would block the scan
forever), a dangling link or a symlink loop is listed in skipped.tsv as what it is. Hidden entries (a name
starting with "."; e.g. `.cache/`, `._x.jpg` of macOS) are skipped and listed too -- a hidden folder is no
class, so it cannot shift every label by one.
"""
import json
import logging
import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Optional, Union

from modeling.safe_load import describe_path

from . import DataError
from .transforms import MAX_ASPECT, MAX_PIXELS, ImageRejected, check_size, require_regular_file, to_rgb

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

    def abspath(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def write(self, out_dir: Union[str, Path]) -> None:
        """files.tsv (relpath<TAB>label, the path escaped by `encode_path`) + classes.json + root.txt (the
        root, escaped the same way) + format.json, written atomically."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(out_dir / "format.json", json.dumps({"version": FORMAT_VERSION, "paths": PATH_ENCODING}))
        _atomic_write(out_dir / "classes.json", json.dumps(self.classes, indent=0))
        _atomic_write(out_dir / "root.txt", encode_path(str(Path(self.root).resolve())) + "\n")
        _atomic_write(out_dir / "files.tsv", "".join(f"{encode_path(p)}\t{y}\n" for p, y in zip(self.paths, self.labels)))

    @classmethod
    def read(cls, scan_dir: Union[str, Path], root: Optional[Union[str, Path]] = None) -> "FileList":
        scan_dir = Path(scan_dir)
        try:
            fmt = json.loads((scan_dir / "format.json").read_text()) if (scan_dir / "format.json").is_file() else {}
            classes = json.loads((scan_dir / "classes.json").read_text())
        except ValueError as e:
            raise DataError(f"{scan_dir}: unreadable scan folder ({e}); run the scan again") from None
        decode = decode_path if fmt.get("version", 1) >= 2 else (lambda p: p)  # v1: raw paths
        if root is None:
            root = decode((scan_dir / "root.txt").read_text(encoding="utf-8").rstrip("\n"))
        paths, labels = [], []
        for n, line in enumerate((scan_dir / "files.tsv").read_text(encoding="utf-8").split("\n"), 1):
            if not line:
                continue
            p, sep, y = line.rpartition("\t")
            if not sep or not y.lstrip("-").isdigit() or not 0 <= int(y) < len(classes):
                raise DataError(f"{scan_dir / 'files.tsv'} line {n}: expected PATH<TAB>LABEL with a label in "
                                f"0..{len(classes) - 1}, got {line[:80]!r}")
            paths.append(decode(p))
            labels.append(int(y))
        return cls(Path(root), paths, labels, classes)


FORMAT_VERSION = 2
PATH_ENCODING = "percent-escaped: '%', control and other unprintable characters, undecodable bytes"


def encode_path(path: str) -> str:
    """A file name as one line of text that `decode_path` maps back exactly, whatever it holds (tabs, newlines,
    bytes that are not UTF-8). Printable characters other than '%' are kept as they are."""
    out = []
    for ch in path:
        if ch != "%" and ch.isprintable() and not 0xD800 <= ord(ch) <= 0xDFFF:
            out.append(ch)
        else:
            out.append("".join(f"%{b:02X}" for b in os.fsencode(ch)))
    return "".join(out)


def decode_path(text: str) -> str:
    from urllib.parse import unquote_to_bytes
    return os.fsdecode(unquote_to_bytes(text))


HIDDEN_FOLDER = "hidden folder: skipped (not a class; rename it without the leading '.' to use it)"
HIDDEN_SUBFOLDER = "hidden folder: skipped"
HIDDEN_FILE = "hidden file: skipped"


def find_classes(root: Union[str, Path], skipped: Optional[list[tuple[str, str]]] = None) -> list[str]:
    """The class folder names of ROOT, sorted; hidden folders (".name") are left out and go to `skipped`."""
    classes = []
    for e in os.scandir(root):
        if e.is_dir():
            if e.name.startswith("."):
                if skipped is not None:
                    skipped.append((e.name, HIDDEN_FOLDER))
            else:
                classes.append(e.name)
    if not classes:
        raise FileNotFoundError(f"no class folders in {root} (expected ROOT/<class>/<image>)")
    return sorted(classes)


def image_folder(root: Union[str, Path], skipped: Optional[list[tuple[str, str]]] = None) -> FileList:
    """The file list torchvision.datasets.ImageFolder(root) would build, unchecked, same order -- except that
    every real file is listed once: symlinked directories are followed but never twice (a symlink loop ends),
    a symlink to a file or folder elsewhere inside ROOT is not listed (the file is listed at its own path, with
    its own class), and a second link to the same outside file is dropped; hidden folders and files are
    skipped, and so is anything that is not a regular file (a FIFO, a dangling link). What was left out goes
    to `skipped` (a list of (path, reason)) when given."""
    root = Path(root)
    skipped = [] if skipped is None else skipped
    classes = find_classes(root, skipped)
    real_root = os.path.realpath(root)
    paths, labels, seen_files, seen_dirs = [], [], set(), set()

    def inside_root(real):
        return real == real_root or real.startswith(real_root + os.sep)

    for label, name in enumerate(classes):
        top = os.path.join(root, name)
        if os.path.islink(top) and inside_root(os.path.realpath(top)):
            skipped.append((name, "link to a folder inside the dataset"))
            continue
        for dirpath, dirnames, fnames in os.walk(top, followlinks=True):
            real_dir = os.path.realpath(dirpath)
            if real_dir in seen_dirs:
                dirnames[:] = []
                continue
            seen_dirs.add(real_dir)
            keep = []
            for d in sorted(dirnames):
                full = os.path.join(dirpath, d)
                real = os.path.realpath(full)
                rel = os.path.relpath(full, root)
                if d.startswith("."):
                    skipped.append((rel, HIDDEN_SUBFOLDER))
                elif real in seen_dirs or real_dir.startswith(real + os.sep) or real == real_dir:
                    skipped.append((rel, "symlink loop or a folder already listed"))
                elif os.path.islink(full) and inside_root(real):
                    skipped.append((rel, "link to a folder inside the dataset (listed at its own path)"))
                else:
                    keep.append(d)
            dirnames[:] = keep  # os.walk descends into these, in sorted order
            for fname in sorted(fnames):
                if not fname.lower().endswith(IMG_EXTENSIONS):
                    continue
                full = os.path.join(dirpath, fname)
                rel = os.path.relpath(full, root)
                if fname.startswith("."):
                    skipped.append((rel, HIDDEN_FILE))
                    continue
                odd = describe_path(full)  # a FIFO named x.jpg would block the scan: never opened
                if odd is not None:
                    skipped.append((rel, odd.removeprefix("is ")))
                    continue
                real = os.path.realpath(full)
                if os.path.islink(full) and inside_root(real):
                    skipped.append((rel, "link to a file inside the dataset (listed at its own path)"))
                elif real in seen_files:
                    skipped.append((rel, "the same file is already listed"))
                else:
                    seen_files.add(real)
                    paths.append(rel)
                    labels.append(label)
    if skipped:
        log.warning("%s: %d entries not listed (hidden, not regular files, symlink loops, duplicate links), e.g. "
                    "%s: %s", root, len(skipped), *skipped[0])
    return FileList(root, paths, labels, classes)


def load_file_list(data: Union[str, Path]) -> FileList:
    """A scan folder (has files.tsv) or an image root (walked like ImageFolder, unchecked)."""
    data = Path(data)
    if (data / "files.tsv").is_file():
        return FileList.read(data)
    log.warning("%s has no files.tsv: using the unchecked ImageFolder listing (run `python -m train.data scan`)",
                data)
    return image_folder(data)


# ---------------------------------------------------------------------------------------------- the scan

_JPEG_EXT = (".jpg", ".jpeg")


def check_image(path: str, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> tuple[str, str]:
    """Decode one file fully. Returns (status, note): status 'ok' or 'bad'; note says what is odd. An image
    outside the size bounds is 'bad' without being decoded (its header is enough)."""
    from PIL import Image

    try:
        require_regular_file(path)  # (replaced by a FIFO since the listing: never opened)
        with Image.open(path) as im:
            fmt, mode = im.format, im.mode
            reason = check_size(im.size, max_pixels, max_aspect)
            if reason:
                return "bad", f"too large or elongated: {reason}"
            im.load()  # full decode: a truncated file raises here (PIL's LOAD_TRUNCATED_IMAGES is off)
            to_rgb(im, path)  # 16-bit / float scaled as the loaders scale them; unknown ranges refused
    except ImageRejected as e:
        return "bad", str(e).removeprefix(f"{path}: ").replace("\t", " ").replace("\n", " ")[:300]
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


_UNSTAMPED = "unstamped"  # a verdict from a scan before stamps (its file's size and time unknown)


def _stamp(path: str) -> Optional[list[int]]:
    """[size, mtime_ns] of a file as the scan checked it (None: gone): a rerun checks again what changed since."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _check(args):
    rel, path, max_pixels, max_aspect = args
    stamp = _stamp(path)  # before the decode: a file rewritten during it is checked again next time
    status, note = check_image(path, max_pixels, max_aspect)
    return rel, status, note, stamp


def scan(root: Union[str, Path], out_dir: Optional[Union[str, Path]] = None, workers: Optional[int] = None,
         chunksize: int = 16, progress: bool = True, max_pixels: int = MAX_PIXELS,
         max_aspect: float = MAX_ASPECT) -> dict[str, Any]:
    """Check every image under root once; write the clean list to out_dir (default: ROOT.scan beside root).

    Images with more than `max_pixels` pixels or a long side above `max_aspect` short sides are bad (listed in
    bad.tsv with the reason, never decoded). Symlink loops and duplicate links are not followed twice
    (skipped.tsv). Resumable: results are appended to out_dir/scan.partial.jsonl as they come, with each file's
    size and modification time; a rerun checks only the files not in it or changed since (a torn last line is
    ignored; changed limits start over). Returns a dict of counts.
    """
    from modeling.config import ConfigError
    for name, value, low in (("workers", workers, 1), ("max_pixels", max_pixels, 1), ("max_aspect", max_aspect, 1),
                             ("chunksize", chunksize, 1)):
        if value is not None and not value >= low:
            raise ConfigError(f"scan: {name} {value} must be at least {low}")
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    out_dir = Path(out_dir) if out_dir else root.with_name(root.name + ".scan")
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped = []
    listing = image_folder(root, skipped)
    partial = out_dir / "scan.partial.jsonl"
    settings = {"max_pixels": max_pixels, "max_aspect": max_aspect}
    settings_file = out_dir / "scan.settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != settings and partial.is_file():
        log.warning("scan %s: limits changed since the partial results (%s -> %s); checking every file again",
                    root, settings_file.read_text().strip(), settings)
        partial.unlink()
    _atomic_write(settings_file, json.dumps(settings))
    done = _read_partial(partial)
    # a verdict stands while its file has the size and modification time it was checked at (a file gone at its
    # check has no stamp: checked again); lines of an older scan have none recorded: trusted, and said so
    legacy = [p for p in listing.paths if p in done and done[p][2] == _UNSTAMPED]
    changed = [p for p in listing.paths if p in done and done[p][2] != _UNSTAMPED
               and (done[p][2] is None or done[p][2] != _stamp(os.path.join(root, p)))]
    for p in changed:  # rewritten, truncated or replaced since its verdict
        del done[p]
    if changed:
        log.info("scan %s: %d files changed since they were checked (size or modification time), e.g. %s",
                 root, len(changed), changed[0])
    if legacy:
        log.info("scan %s: %d verdicts from a scan that recorded no file sizes or times are kept; delete %s to check "
                 "those files again", root, len(legacy), partial)
    todo = [(p, os.path.join(root, p), max_pixels, max_aspect) for p in listing.paths if p not in done]
    log.info("scan %s: %d files, %d already checked, %d to check", root, len(listing), len(done), len(todo))
    if todo:
        workers = workers or os.cpu_count() or 1
        bar = _progress(len(todo), "scan") if progress else None
        _end_with_newline(partial)
        with open(partial, "a") as f, get_context("fork").Pool(workers) as pool:
            for i, (rel, status, note, stamp) in enumerate(pool.imap_unordered(_check, todo, chunksize=chunksize)):
                done[rel] = (status, note, stamp)
                f.write(json.dumps({"path": rel, "status": status, "note": note, "stamp": stamp}) + "\n")
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
    _atomic_write(out_dir / "bad.tsv", "".join(f"{encode_path(p)}\t{r}\n" for p, r in bad))
    _atomic_write(out_dir / "notes.tsv", "".join(f"{encode_path(p)}\t{r}\n" for p, r in notes))
    _atomic_write(out_dir / "skipped.tsv", "".join(f"{encode_path(p)}\t{r}\n" for p, r in skipped))
    counts = {"files": len(listing), "ok": len(clean), "bad": len(bad), "noted": len(notes), "skipped": len(skipped),
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
            done[r["path"]] = (r["status"], r["note"], r.get("stamp", _UNSTAMPED))
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
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:  # a full disk: no .tmp left behind
        tmp.unlink(missing_ok=True)
        raise


def _progress(total, desc):
    from modeling.progress import progress

    return progress(total, desc, "img", dynamic_ncols=True)
