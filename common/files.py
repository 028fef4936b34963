"""Files on disk: atomic writes (file and folder), tolerant JSONL reading, torn-tail repair, output-folder checks.

A writer fills a temp path next to its target, `<target>.tmp-<pid>`, and renames it over the target. On POSIX a
rename within one filesystem is atomic, so a kill -9 at any moment leaves the old file or folder or the new one,
never half of one. A kill can leave a `.tmp-<pid>` behind; no reader looks at those names.
"""

import contextlib
import json
import os
import socket
import shutil


def tmp_path(final: str) -> str:
    """The temp name next to `final` that this process writes before renaming."""
    return f"{final.rstrip('/')}.tmp-{os.getpid()}"


def publish(tmp: str, final: str) -> None:
    """Rename `tmp` over `final`, a file or a folder. A folder in the way is first renamed aside and then removed,
    so a reader sees the old folder or the new one."""
    final = final.rstrip("/")
    if os.path.isdir(final) and not os.path.islink(final):
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temp file path next to `path`; on success it replaces `path`, on error it is removed.

    The temp name does not end in the target's extension: pass the format explicitly (`savefig(tmp, format="png")`)."""
    tmp = tmp_path(path)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    publish(tmp, path)


@contextlib.contextmanager
def atomic_dir(final: str):
    """Yield an empty temp folder next to `final`; on success it replaces `final`, on error it is removed.
    Raises SystemExit (with the reason) when the temp folder cannot be created."""
    tmp = tmp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise SystemExit(f"cannot write next to {final}: {e.strerror or e}") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, final)


def write_json(path: str, obj) -> None:
    """Write `obj` as indented UTF-8 JSON (non-JSON values through str), atomically."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")


def write_jsonl(path: str, records, ensure_ascii: bool = False) -> None:
    """Write one JSON object per line (UTF-8, non-JSON values through str), atomically. `ensure_ascii` escapes
    everything outside ASCII, for records that may carry unvalidated text (a lone surrogate cannot be UTF-8)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=ensure_ascii, default=str) + "\n" for r in records)


def iter_jsonl(path: str):
    """(line number from 1, object, None) per readable line or (line number, None, reason) per line that is not
    UTF-8, not JSON or not a JSON object. Empty lines are passed over; one bad line never fails the file."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield n, None, f"line {n} is not UTF-8 (byte {e.start})"
                continue
            except json.JSONDecodeError as e:
                yield n, None, f"line {n} is not JSON ({e.msg})"
                continue
            yield (n, obj, None) if isinstance(obj, dict) else (n, None, f"line {n} is not a JSON object")


def read_jsonl(path: str) -> tuple[list[dict], list[str]]:
    """(objects, reasons): the readable lines of a JSONL file, and one reason per line that could not be read (a
    line torn by a kill, damage). The caller decides whether bad lines are skipped and counted or stop it."""
    records, bad = [], []
    for _, obj, reason in iter_jsonl(path):
        if reason is None:
            records.append(obj)
        else:
            bad.append(reason)
    return records, bad


def repair_tail(path: str) -> None:
    """Cut a last line left half-written by a kill, so records appended later start on a line of their own."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:  # read backwards from the end only: result files can be large
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - (1 << 16))
            f.seek(start)
            block = f.read(pos - start)
            if pos == end and block.endswith(b"\n"):
                return
            cut = block.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            pos = start
        if end:
            f.truncate(0)  # no complete line at all


def check_output(out: str, need_bytes: int = 0) -> None:
    """Fail before any work (SystemExit with the reason) when the output folder cannot be created or written, or
    has fewer than `need_bytes` free."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{socket.gethostname()}-{os.environ.get('RANK', '0')}-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"output folder {out} is not writable: {e.strerror or e}") from None
    free = shutil.disk_usage(out).free
    if need_bytes and free < need_bytes:
        size = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"  # noqa: E731
        raise SystemExit(f"output folder {out} has {size(free)} free, a checkpoint needs about {size(need_bytes)} "
                         "(set --min_free_gb if you know better)")
