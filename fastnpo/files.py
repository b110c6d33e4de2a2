"""Files and folders: files that readers see whole or not at all (atomic_write), output folders
checked before any work (folder_problem, check_new_folder), lock files (LockFile: one holder at a
time), and model names checked before the hub client retries for a minute (check_model_source).
Imports nothing heavy: the CLI calls these before it imports torch."""

import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory + fsync + os.replace: a reader (or a
    concurrent writer of the same content) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the folder may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# ----------------------------------------------------------------------------- output folders


def folder_problem(path: str | Path) -> str | None:
    """Why a command could not make or write the folder `path`, or None; said of the path, so
    that f"{path} {problem}" reads: "is a file, not a folder", "cannot be created: /a is a file,
    not a folder" (a file where a parent folder should be), "is not writable", "cannot be
    created: /a is not writable" (the nearest existing parent; os.access, so a read-only mount
    counts). Reads only."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        return "is a file, not a folder"
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot be created: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return "is not writable" if existing == path.absolute() else f"cannot be created: {existing} is not writable"
    return None


# how_to_overwrite of the commands with an --overwrite option (and their functions' overwrite=True)
OVERWRITE_OPTION = "set --overwrite (overwrite=True)"


def check_new_folder(path: str | Path, *, name: str, overwrite: bool, how_to_overwrite: str) -> None:
    """The rule of a command that writes a folder (`fastnpo demo --out`, `fastnpo prepare-tiny
    --out`, `fastnpo u2a run.output_dir=`): refuse, before any work, a folder that cannot be
    written (folder_problem) and a non-empty one unless overwrite. Raises ValueError
    "<name> <path> ..."; name: how the user gave the path (e.g. "--out")."""
    path = Path(path)
    problem = folder_problem(path)
    if problem is not None:
        raise ValueError(f"{name} {path} {problem}")
    if not overwrite and path.is_dir() and any(path.iterdir()):
        raise ValueError(f"{name} {path} already holds a run; {how_to_overwrite} to replace it")


# ----------------------------------------------------------------------------- model sources

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def offline_env(environ=os.environ) -> str | None:
    """The setting that turns the hub off ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=true"), else None."""
    for variable in OFFLINE_VARIABLES:
        value = environ.get(variable, "")
        if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{variable}={value}"
    return None


def hub_reachable(timeout: float = 1.0) -> bool:
    """Whether the Hugging Face hub answers a HEAD request within `timeout` seconds (through
    huggingface_hub's session: its endpoint, proxies and certificates). The request runs in a
    daemon thread, so a name lookup that ignores the timeout cannot hold the caller either."""
    from huggingface_hub import constants, get_session

    answered = []

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
            answered.append(True)
        except Exception:  # any failure to get an answer: unreachable
            pass

    thread = threading.Thread(target=probe, name="fastnpo-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered)


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import constants, try_to_load_from_cache

    for filename in ("config.json", "tokenizer_config.json"):
        try:
            if isinstance(try_to_load_from_cache(name, filename, cache_dir=constants.HF_HUB_CACHE), str):
                return True
        except Exception:  # not a valid repo id, an unreadable cache: not cached
            return False
    return False


def check_model_source(name: str, what: str) -> None:
    """Refuse at once (well under 2 s) a model or tokenizer that cannot load, rather than after
    the hub client's minute of retries: `name` is not an existing path, and either looks like no
    hub name (a missing folder), or is not in the local hub cache while the hub is off
    (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) or unreachable. Raises FileNotFoundError naming
    `what`, the argument the user gave (e.g. "--model", "model.name_or_path")."""
    if Path(name).expanduser().exists():
        return
    if name.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(name):
        raise FileNotFoundError(f"{what} {name!r}: no such folder")
    if _in_hub_cache(name):  # transformers loads it from the cache, offline too
        return
    offline = offline_env()
    if offline is not None:
        reason = f"{offline} is set and it is not in the local hub cache"
    elif not hub_reachable():
        from huggingface_hub import constants

        reason = f"{constants.ENDPOINT} cannot be reached (no network?)"
    else:
        return
    raise FileNotFoundError(
        f"{what} {name!r} is neither a local folder nor reachable on the hub ({reason}); "
        "give the folder of a saved model, or go online"
    )


# ----------------------------------------------------------------------------- lock files


class LockHeld(Exception):
    """The lock file `path` is held by a live process (or one on another host): `holder` is
    what it recorded ({"host", "pid", "started", "command"}; {} when unreadable)."""

    def __init__(self, path: Path, holder: dict):
        super().__init__(path, holder)
        self.path, self.holder = Path(path), holder


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux /proc), else None: with
    the pid it names one process, so a pid reused after a crash does not pass for the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def lock_holder_alive(holder: dict) -> bool | None:
    """Whether the process a lock file names runs: True, False (on this host and gone, or its
    pid now names a later process), None (another host: cannot be told from here)."""
    import socket

    if holder.get("host") != socket.gethostname():
        return None
    try:
        pid = int(holder["pid"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    except (KeyError, TypeError, ValueError, OverflowError):
        return False
    started = holder.get("pid_start")
    return not (started is not None and _process_start(pid) not in (None, started))


class LockFile:
    """An exclusive lock held as a file: acquire() creates `path` with O_CREAT|O_EXCL (atomic on a
    local disk and on NFSv3 or later; not on NFSv2 or on object-store mounts) holding this
    process's host, pid, start time and command; release() deletes it if it is still ours. A
    lock whose holder is on this host and no longer runs is stale: acquire() removes it and
    takes the lock (on_stale(holder) is told). A live holder, or one on another host (whose
    liveness cannot be seen from here), raises LockHeld. Not re-entrant."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mine: bytes | None = None

    def acquire(self, on_stale: Callable[[dict], None] | None = None) -> None:
        import json
        import socket
        import sys
        import time

        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
            "token": os.urandom(8).hex(),  # this acquisition's: release() deletes only its own file
        }
        data = (json.dumps(record) + "\n").encode()
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raw, holder = self._read_holder()
                if raw is None:  # released meanwhile: try again
                    continue
                if holder is None:  # being written this instant, or its writer died mid-write
                    time.sleep(0.2)
                    again, holder = self._read_holder()
                    if again != raw:
                        continue
                    try:
                        age = time.time() - self.path.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if age < 5:
                        raise LockHeld(self.path, {}) from None
                    holder = {}
                elif lock_holder_alive(holder) is not False:
                    raise LockHeld(self.path, holder) from None
                if self._break(raw) and on_stale is not None:
                    on_stale(holder)
                continue
            try:
                os.write(fd, data)
                os.fsync(fd)
            except BaseException:  # Ctrl-C or a full disk mid-write: leave no half-written lock
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            os.close(fd)
            self._mine = data
            return
        raise LockHeld(self.path, {})  # contended without end: refuse rather than spin

    def release(self) -> None:
        """Delete the lock if it is still the one this process wrote."""
        if self._mine is not None:
            try:
                if self.path.read_bytes() == self._mine:
                    self.path.unlink()
            except FileNotFoundError:
                pass
            self._mine = None

    def _read_holder(self) -> tuple[bytes | None, dict | None]:
        import json

        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(raw)
        except ValueError:
            return raw, None
        return raw, holder if isinstance(holder, dict) else None

    def _break(self, stale: bytes) -> bool:
        """Remove the stale lock `stale`: moved to a name of this process's own first, so that
        of two processes breaking it at once only one does, and a fresh lock taken meanwhile by
        a third is put back, not deleted."""
        moved = self.path.with_name(f"{self.path.name}.{os.getpid()}.stale")
        try:
            os.replace(self.path, moved)
        except FileNotFoundError:
            return False
        try:
            if moved.read_bytes() == stale:
                return True
            try:  # not the stale lock: someone's fresh one; put it back unless taken again
                os.link(moved, self.path)
            except FileExistsError:
                pass
            return False
        finally:
            moved.unlink(missing_ok=True)
