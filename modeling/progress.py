"""Progress of a long command (generate, extract, the FID's Inception pass, the scan): a tqdm bar on a terminal,
else one line on stderr at most every `every_s` seconds and one at the end. In a SLURM log (stderr a file) a bar
is a single line of carriage returns that `less` and most log viewers show as one garbled line."""
import sys
import time
from typing import Any, Iterable, Iterator, Optional, Sized, TypeVar

T = TypeVar("T")


def format_duration(seconds: float) -> str:
    """"42m07s" under an hour, "11h02m" from one."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class LogProgress:
    """tqdm's update / write / set_postfix / close (what our commands call) as lines:
    "sampling (rank 0): 2560/6250 img (41%), 5.2 img/s, eta 11m50s"."""

    def __init__(self, total: Optional[int], desc: str, unit: str, every_s: float = 30.0, stream: Any = None,
                 initial: int = 0) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream or sys.stderr
        self.n = self.start_n = initial
        self.t0 = self.last = time.monotonic()
        self.postfix = ""
        self.closed = False

    def _line(self, now: float, end: bool = False) -> str:
        dt = now - self.t0
        rate = (self.n - self.start_n) / dt if dt > 0 else 0.0
        head = f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
        if self.total:
            head += f" ({100 * self.n / self.total:.0f}%)"
        tail = f", {rate:.1f} {self.unit}/s"
        if end:
            tail += (f", done in {format_duration(dt)}" if not self.total or self.n >= self.total else
                     f", stopped after {format_duration(dt)}")
        elif self.total and rate > 0:
            tail += f", eta {format_duration((self.total - self.n) / rate)}"
        return head + tail + (f", {self.postfix}" if self.postfix else "")

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s and not (self.total and self.n >= self.total):
            self.last = now
            print(self._line(now), file=self.stream, flush=True)

    def set_postfix(self, refresh: bool = False, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in kw.items())

    def write(self, s: str) -> None:
        print(s, flush=True)  # stdout, as tqdm.write

    def close(self) -> None:
        if not self.closed and self.n > self.start_n:
            print(self._line(time.monotonic(), end=True), file=self.stream, flush=True)
        self.closed = True

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Off(LogProgress):
    """A disabled bar: counts, prints nothing (write still prints, as tqdm's does)."""

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True


def progress(total: Optional[int], desc: str, unit: str = "it", enabled: bool = True, **tqdm_kw: Any) -> Any:
    """A tqdm bar where stderr is a terminal, a LogProgress where it is not, nothing shown where `enabled` is
    false; each takes update(n), write(s), set_postfix(**kw) and close(), and is a context manager."""
    if not enabled:
        return _Off(total, desc, unit)
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit, **tqdm_kw)
    return LogProgress(total, desc, unit, initial=tqdm_kw.get("initial", 0))


def tracked(items: Iterable[T], desc: str, unit: str = "it", enabled: bool = True) -> Iterator[T]:
    """`items` (a sized iterable), counted by `progress` as they are taken: a bar on a terminal, lines in a log."""
    total = len(items) if isinstance(items, Sized) else None
    with progress(total, desc, unit, enabled=enabled, leave=False) as bar:
        for item in items:
            yield item
            bar.update(1)
