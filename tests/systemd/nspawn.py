"""A Debian bookworm systemd-nspawn container to run base-worker under a real systemd.

The root file system is built once with debootstrap and cached outside the clone (``CACHE_DIR``);
every boot runs on a throw-away copy of it (``--ephemeral``), so the cache stays clean.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CACHE_DIR = Path(os.environ.get("BASE_WORKER_NSPAWN_CACHE", "/var/tmp/base-worker-nspawn"))
APT_SOURCES = Path("/etc/apt")
SUITE = "bookworm"
# procps: /bin/kill for the unit's ExecReload= (on every normal Debian install, not in minbase).
PACKAGES = ("systemd", "systemd-sysv", "dbus", "procps", "python3", "python3-venv")
RECIPE_FILE = ".base-worker-recipe"
CONTAINER_ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
)


class ContainerError(RuntimeError):
    """The container could not be built, booted or driven."""


def _source_entries(apt: Path) -> Iterator[tuple[str, list[str]]]:
    """(URI, suites) of every enabled `deb` source, one-line .list and deb822 .sources alike."""
    lists = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in lists:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = line.split("#", 1)[0].split()
                if words[:1] == ["deb"]:
                    if len(words) > 1 and words[1].startswith("["):  # [arch=amd64 signed-by=...]
                        while words and not words[1].endswith("]"):
                            del words[1]
                        del words[1]
                    if len(words) >= 3:
                        yield words[1], [words[2]]
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[0].isspace():
                        continue
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.strip()
                if "deb" in fields.get("types", "").split() and fields.get("enabled") != "no":
                    for uri in fields.get("uris", "").split():
                        yield uri, fields.get("suites", "").split()


def debian_mirror(apt: Path = APT_SOURCES) -> str | None:
    """This machine's Debian mirror for SUITE, from its apt sources; None if it has none."""
    for uri, suites in _source_entries(apt):
        if SUITE in suites:
            return uri.rstrip("/")
    return None


def recipe(mirror: str) -> str:
    """Stored inside the cached root; a root built from another recipe is rebuilt."""
    return f"debootstrap --variant=minbase --include={','.join(PACKAGES)} {SUITE} ROOT {mirror}\n"


def unavailable_reason() -> str | None:
    """Why a container cannot be started on this machine, or None if it can."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run .ci/system-deps as root)"
    if _root_is_current(CACHE_DIR / f"{SUITE}-root"):
        return None
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed and no cached root exists (run .ci/system-deps)"
    if debian_mirror() is None:
        return f"no cached root, and no Debian {SUITE} source in {APT_SOURCES} to build one from"
    return None


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Call ``probe`` until it returns a value other than None/False; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = probe()
        except Exception as exc:  # probes may fail while things come up
            last_error = exc
            result = None
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise ContainerError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def _root_is_current(root: Path) -> bool:
    """A cached root counts as current when it was built from this recipe, from any mirror."""
    try:
        built = (root / RECIPE_FILE).read_text()
    except OSError:
        return False
    return built.rsplit(" ", 1)[0] == recipe("").rsplit(" ", 1)[0]


def sweep_stale_copies() -> None:
    """Remove ephemeral root copies left by a systemd-nspawn that was killed.

    systemd-nspawn --ephemeral copies the root to ``.#machine.<name><random>`` beside it and holds a
    POSIX lock on ``.#.#machine.<name><random>.lck`` while the container runs: a copy whose lock can
    be taken belongs to no running container.
    """
    for copy in CACHE_DIR.glob(".#machine.*"):
        lock_path = CACHE_DIR / f".#{copy.name}.lck"
        try:
            with open(lock_path, "a") as lock:
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(copy, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
        except OSError:
            continue  # in use by a running container


def ensure_root(log: Callable[[str], None] = print) -> Path:
    """The cached bookworm root, built with debootstrap if missing or from an older recipe.

    Built into a temporary directory next to the cache and renamed into place only when complete,
    so an interrupted build is never reused. A lock serialises concurrent test runs.
    """
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    root = CACHE_DIR / f"{SUITE}-root"
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sweep_stale_copies()
        if _root_is_current(root):
            return root
        for stale in CACHE_DIR.glob("build.*"):
            shutil.rmtree(stale, ignore_errors=True)
        mirror = debian_mirror()
        if mirror is None:
            raise ContainerError(f"no Debian {SUITE} source in {APT_SOURCES} to debootstrap from")
        build = Path(tempfile.mkdtemp(prefix="build.", dir=CACHE_DIR))
        target = build / "root"
        log(
            f"building {root} with debootstrap from {mirror} (a few minutes, cached for later runs)"
        )
        started = time.monotonic()
        cmd = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(target),
            mirror,
        ]
        returncode, tail = _run_with_progress(cmd, log, started)
        if returncode != 0:
            shutil.rmtree(build, ignore_errors=True)
            raise ContainerError(f"debootstrap failed ({returncode}):\n{tail}")
        (target / RECIPE_FILE).write_text(recipe(mirror))
        if root.exists():
            old = build / "old"
            root.rename(old)
        target.rename(root)
        shutil.rmtree(build, ignore_errors=True)
        log(f"built {root} in {time.monotonic() - started:.0f}s")
        return root


def _run_with_progress(
    cmd: Sequence[str], log: Callable[[str], None], started: float
) -> tuple[int, str]:
    """Run debootstrap, logging its first line of each kind (Retrieving, Extracting, ...) and one
    line every 10 s; return its exit code and the tail of its output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    seen: set[str] = set()
    last_logged = 0.0
    for line in proc.stdout:
        line = line.rstrip()
        tail = [*tail[-40:], line]
        kind = line.split()[1] if line.startswith("I: ") and len(line.split()) > 1 else ""
        now = time.monotonic()
        if kind and (kind not in seen or now - last_logged > 10):
            seen.add(kind)
            last_logged = now
            log(f"  debootstrap {now - started:4.0f}s  {line[3:]}")
    return proc.wait(), "\n".join(tail)


class Container:
    """A booted container: ``run`` executes commands inside it through nsenter."""

    def __init__(
        self, root: Path, binds: Sequence[tuple[Path, str]] = (), private_network: bool = False
    ):
        self.root = root
        self.binds = list(binds)
        self.private_network = private_network
        self._log_dir = Path(tempfile.mkdtemp(prefix="base-worker-nspawn-log."))
        self.log_path = self._log_dir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def start(self, timeout: float = 90.0) -> None:
        """Boot the container and wait until systemd finished booting."""
        cmd = [
            "systemd-nspawn",
            "--quiet",
            "-D",
            str(self.root),
            "--ephemeral",
            "--register=no",
            "--keep-unit",
            "--console=read-only",
            f"--machine=base-worker-test-{os.getpid()}",
        ]
        cmd += [f"--bind-ro={host}:{inside}" for host, inside in self.binds]
        if self.private_network:  # only its own loopback: fixed ports cannot clash with the host
            cmd.append("--private-network")
        cmd.append("-b")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.pid = wait_for(self._find_init, timeout, "the container's systemd to start")
        state = wait_for(self._booted, timeout, "the container to finish booting")
        if state not in ("running", "degraded"):
            raise ContainerError(f"container booted into state {state!r}\n{self.console_tail()}")

    def _find_init(self) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise ContainerError(
                f"systemd-nspawn exited with {self.proc.returncode}\n{self.console_tail()}"
            )
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == self.proc.pid and (entry / "comm").read_text().strip() == "systemd":
                    return int(entry.name)
        return None

    def _booted(self) -> str | None:
        proc = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=30)
        state = proc.stdout.strip()
        return state if state not in ("", "initializing", "starting", "offline") else None

    def run(
        self,
        *cmd: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the container (all of its namespaces) and capture its output."""
        # A clean environment: nothing of the host's (PIP_*, NOTIFY_SOCKET, PATH) leaks inside.
        full = ["nsenter", "-t", str(self.pid), "-a", "env", "-i", *CONTAINER_ENV, *cmd]
        proc = subprocess.run(
            full, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise ContainerError(
                f"{' '.join(cmd)} exited with {proc.returncode}\n"
                f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
            )
        return proc

    def write(self, path: str, content: str, mode: str = "0644", owner: str = "root:root") -> None:
        """Create ``path`` inside the container with ``content``."""
        self.run(
            "sh",
            "-c",
            'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1" && chown "$3" "$1"',
            "sh",
            path,
            mode,
            owner,
            input=content,
        )

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` properties of ``unit``."""
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def console_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """Power the container off; kill systemd-nspawn if it does not go in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None and self.pid:
            with contextlib.suppress(Exception):
                self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Killing the container's PID 1 ends its PID namespace; nspawn then cleans up itself.
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        sweep_stale_copies()
        shutil.rmtree(self._log_dir, ignore_errors=True)


@contextlib.contextmanager
def booted(
    root: Path, binds: Sequence[tuple[Path, str]] = (), private_network: bool = False
) -> Iterator[Container]:
    """A booted container on a throw-away copy of ``root``, powered off on exit."""
    container = Container(root, binds, private_network)
    try:
        container.start()
        yield container
    finally:
        container.stop()


def main() -> None:
    """`python -m tests.systemd.nspawn` (make test): build the cached root now, with progress,
    rather than silently inside the first system test."""
    reason = unavailable_reason()
    if reason:
        print(f"nspawn: no container root, the systemd tests will skip: {reason}")
        return
    print(f"nspawn: container root {ensure_root(log=print)} ready")


if __name__ == "__main__":
    main()
