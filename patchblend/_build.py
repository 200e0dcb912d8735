"""Compiles patchblend's kernels: the source lists and flags (one place, also read by setup.py) and the
first-use build into a per-user cache.

Where the installed package has no compiled kernels for a device type (a pure-Python wheel or sdist built
without torch; a CPU-only binary under a CUDA torch), :mod:`patchblend._backend` calls :func:`build` once:

- the sources ship inside the package (``patchblend/_csrc``, copied there by setup.py) or, in a source
  checkout, are the repository's ``csrc/``;
- they are compiled with :func:`torch.utils.cpp_extension.load` (ninja) into
  ``$PATCHBLEND_CACHE_DIR`` (default ``$XDG_CACHE_HOME/patchblend``, i.e. ``~/.cache/patchblend``), in a
  folder named by the patchblend, torch, CUDA and Python versions and a hash of the sources, so that an
  upgrade of any of them builds afresh and an unchanged set-up loads the earlier build at once;
- a file lock (``fcntl.flock``) serialises processes that start together (DDP ranks, dataloader workers):
  the first builds, the others wait and load its result; a finished build is marked by a ``done`` file
  written last, holding the library's SHA-256, so a build killed halfway is never loaded, and neither is a
  library damaged since (empty, zeroed, truncated: :func:`damaged`); such a build is built again;
- one log line (logger ``patchblend``, printed to stderr when nothing else handles it) says what is built
  and how long it took.

This module imports torch only inside its functions: setup.py loads it by path, in a build environment
that may have no torch.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import Dict, List, Optional

VERSION = "0.1.0"

# The torch-facing sources of the two libraries (relative to csrc/). The CPU library defines the op schemas
# and the CPU kernels; the CUDA library only adds CUDA kernels to them. An ahead-of-time build with nvcc
# links both into one library.
CPU_SOURCES = ["blend_ops.cpp", "cpu/blend_cpu.cpp", "cpu/large_alloc.cpp", "cpu/kernels_baseline.cpp",
               "cpu/kernels_avx2.cpp"]
CUDA_SOURCES = ["cuda/blend_cuda.cu", "cuda/blend_cuda_binding.cpp"]
# Every file the builds read under csrc/ ends in one of these (the cache key hashes them all; MANIFEST.in ships
# them in the sdist): sources, headers (op_schemas.h: the op schemas, also read by patchblend/_op_schemas.py), the
# per-instruction-set kernel body (.inc) and the nvcc flags.
SOURCE_SUFFIXES = (".h", ".cpp", ".cu", ".inc", ".flags")
# The sources use only torch's stable ABI (torch/csrc/stable, torch/headeronly; other torch headers refuse to
# compile under TORCH_TARGET_VERSION), so a library built against one torch loads under every later one.
# 2.11: the lowest version whose stable ABI has everything used here (from_blob with a deleter, for the
# huge-page outputs of cpu/large_alloc.cpp, came in 2.11; the rest in 2.10).
TORCH_TARGET_VERSION = "0x020b000000000000"
# -fno-trapping-math: lets the compiler vectorise the branch-free normalisation loops (it may then compute a
# quotient that a select discards); results are unchanged, FP exceptions are never enabled here.
# -fvisibility=hidden: the library exports nothing but its module init (torch's stable types are hidden).
CXX_FLAGS = ["-O3", "-std=c++20", "-fno-trapping-math", "-fvisibility=hidden",
             f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"]
LINK_FLAGS: List[str] = []
MIN_TORCH = (2, 11)

CPU_LIBRARY = "patchblend_cpu"
CUDA_LIBRARY = "patchblend_cuda"

log = logging.getLogger("patchblend")


def package_dir() -> Path:
    return Path(__file__).resolve().parent


def source_dir() -> Optional[Path]:
    """The C++/CUDA sources: ``patchblend/_csrc`` in an installed package, ``csrc/`` in a source checkout."""
    for candidate in (package_dir() / "_csrc", package_dir().parent / "csrc"):
        if (candidate / "blend_ops.cpp").is_file():
            return candidate
    return None


def nvcc_flags(csrc: Path) -> List[str]:
    """csrc/cuda/nvcc.flags, one per line (also read by .ci/check_cuda.sh): torch's
    -D__CUDA_NO_HALF_CONVERSIONS__ (and bf16) undone, since the shared arithmetic converts half to float with
    casts; --fmad=false so that the GPU rounds multiply-adds as the CPU kernel does."""
    lines = (csrc / "cuda" / "nvcc.flags").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def cache_root() -> Path:
    """``$PATCHBLEND_CACHE_DIR``, else ``$XDG_CACHE_HOME/patchblend``, else ``~/.cache/patchblend``."""
    if os.environ.get("PATCHBLEND_CACHE_DIR"):
        return Path(os.environ["PATCHBLEND_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "patchblend"


def _sources_hash(csrc: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in csrc.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES):
        digest.update(str(path.relative_to(csrc)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def build_key(csrc: Path) -> str:
    """Names one build: patchblend, torch, CUDA and Python versions, the machine, a hash of the sources."""
    import torch

    cuda = torch.version.cuda or "none"
    parts = [f"patchblend{VERSION}", f"torch{torch.__version__}", f"cuda{cuda}",
             f"py{sys.version_info[0]}{sys.version_info[1]}", platform.machine(), _sources_hash(csrc)]
    return "-".join(p.replace("+", "_").replace("/", "_") for p in parts)


def build_dir(csrc: Optional[Path] = None) -> Optional[Path]:
    csrc = csrc or source_dir()
    return None if csrc is None else cache_root() / build_key(csrc)


def compiler() -> Optional[str]:
    """The C++ compiler torch's extension builder would run (``$CXX``, else ``c++``), if it is found."""
    return shutil.which(os.environ.get("CXX", "c++"))


def nvcc() -> Optional[str]:
    """nvcc of torch's CUDA_HOME (``$CUDA_HOME``, else found from PATH), else the one on PATH, if any."""
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # pragma: no cover - a broken torch install
        CUDA_HOME = None
    path = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    return path if path and os.path.exists(path) else shutil.which("nvcc")


def _library_files(kind: str, csrc: Optional[Path] = None):
    """(the library file, its ``done`` marker) of ``kind`` in this set-up's cache folder, or None."""
    folder = build_dir(csrc)
    if folder is None:
        return None
    name = CPU_LIBRARY if kind == "cpu" else CUDA_LIBRARY
    return folder / name / f"{name}.so", folder / name / "done"


def _checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _done_text(lib: Path) -> str:
    """The ``done`` marker of a finished build: the library's SHA-256, checked before every load."""
    return f"sha256 {_checksum(lib)}\n"


def damaged(kind: str, csrc: Optional[Path] = None) -> Optional[str]:
    """Why the finished cached build of ``kind`` must not be loaded (its library missing, unreadable, or not the
    file that was built: an empty, zeroed or truncated ``.so`` would raise OSError or SIGBUS when loaded), or None
    when it is intact or there is no finished build (no ``done`` marker: never built, or killed halfway)."""
    files = _library_files(kind, csrc)
    if files is None or not files[1].is_file():
        return None
    lib, done = files
    try:
        recorded = done.read_text().split()
        if not lib.is_file():
            return f"{lib.name} is missing"
        if len(recorded) != 2 or recorded[0] != "sha256":
            return "its done marker records no checksum"
        if _checksum(lib) != recorded[1]:
            return f"{lib.name} is not the file that was built: its SHA-256 differs"
    except OSError as exc:
        return f"it cannot be read ({exc})"
    return None


def library_path(kind: str, csrc: Optional[Path] = None) -> Optional[Path]:
    """The finished, intact cached library of ``kind`` (``"cpu"`` or ``"cuda"``) for this set-up, or None."""
    files = _library_files(kind, csrc)
    if files is None or not files[1].is_file() or damaged(kind, csrc) is not None:
        return None
    return files[0]


def missing_tools(kind: str) -> Optional[str]:
    """Why ``kind`` cannot be built here (the cause and the fix), or None when it can."""
    import torch

    if tuple(int(part) for part in torch.__version__.split(".")[:2]) < MIN_TORCH:
        return (f"the kernels need torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (its stable ABI), this is torch "
                f"{torch.__version__}; upgrade torch")
    if source_dir() is None:
        return "the C++ sources are not in this installation (reinstall patchblend from its sdist or wheel)"
    if compiler() is None:
        return (f"no C++ compiler was found ({os.environ.get('CXX', 'c++')!r} is not on PATH); install one (e.g. "
                "g++) or set CXX, then run `python -m patchblend build`")
    if kind == "cuda" and nvcc() is None:
        return ("nvcc was not found (set CUDA_HOME to a CUDA toolkit matching torch's CUDA), then run "
                "`python -m patchblend build`")
    return None


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock (one process at a time is assumed)
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _announce(message: str) -> None:
    """One line on the ``patchblend`` logger; to stderr when the application configured no logging."""
    if log.hasHandlers():
        log.warning(message)
    else:
        print(f"patchblend: {message}", file=sys.stderr, flush=True)


def build(kind: str) -> Path:
    """Builds the ``"cpu"`` or ``"cuda"`` library into the cache (unless a finished build is there) and returns
    its path; does not load it. Raises RuntimeError with the cause when it cannot be built."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    reason = missing_tools(kind)
    if reason is not None:
        raise RuntimeError(reason)
    csrc = source_dir()
    done = library_path(kind, csrc)
    if done is not None:
        return done
    folder = build_dir(csrc)
    name = CPU_LIBRARY if kind == "cpu" else CUDA_LIBRARY
    target = folder / name
    what = "CPU kernels" if kind == "cpu" else "CUDA kernels"
    try:
        with _file_lock(folder / f"{name}.lock"):
            done = library_path(kind, csrc)  # another process may have built it while this one waited
            if done is not None:
                return done
            if target.exists():
                shutil.rmtree(target)  # a build that did not finish, or a damaged one
            target.mkdir(parents=True)
            start = time.perf_counter()
            try:
                _compile(kind, csrc, target, name)
                lib = target / f"{name}.so"
                marker = _done_text(lib)  # (raises OSError when the compiler left no library)
            except Exception as exc:
                log_file = target / "build.log"
                log_file.write_text(f"{type(exc).__name__}: {exc}\n")
                raise RuntimeError(f"building the {what} failed (details in {log_file}): "
                                   f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}") from exc
            # written last, once the library is complete: a build that fails or is killed is never loaded
            (target / "done").write_text(marker)
    except OSError as exc:  # an unwritable cache: a read-only mount, a file where a folder should be
        raise RuntimeError(f"the cache folder {folder} cannot be written ({exc}); set PATCHBLEND_CACHE_DIR to a "
                           "writable folder") from exc
    _announce(f"compiled the {what} for torch {_torch_version()} in {time.perf_counter() - start:.0f} s "
              f"(cached in {target})")
    return lib


def _torch_version() -> str:
    import torch

    return torch.__version__


def _compile(kind: str, csrc: Path, target: Path, name: str) -> None:
    from torch.utils import cpp_extension

    sources = [str(csrc / s) for s in (CPU_SOURCES if kind == "cpu" else CUDA_SOURCES)]
    # ninja from the `ninja` package lives next to this interpreter, which need not be on PATH (a venv that
    # is not activated)
    scripts = sysconfig.get_path("scripts")
    env_path = os.environ.get("PATH", "")
    os.environ["PATH"] = scripts + os.pathsep + env_path if scripts else env_path
    try:
        cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=nvcc_flags(csrc) if kind == "cuda" else None,
            extra_ldflags=LINK_FLAGS,
            build_directory=str(target),
            is_python_module=False,
            is_standalone=False,
            verbose=False,
        )
    finally:
        os.environ["PATH"] = env_path


def info_lines(state: Dict) -> List[str]:
    """The lines ``python -m patchblend info`` prints, from :func:`patchblend._backend.backend_info`."""
    import torch

    lines = [
        f"patchblend {VERSION} ({package_dir()})",
        f"backend: {state['backend']}",
        f"torch: {torch.__version__}  CUDA: {torch.version.cuda or 'none'}  "
        f"CUDA available: {torch.cuda.is_available()}",
        f"compiler: {compiler() or 'not found'}",
        f"nvcc: {nvcc() or 'not found'}",
        f"sources: {source_dir() or 'not found'}",
        f"cache: {build_dir() or cache_root()}",
        f"CPU instruction set: {state.get('cpu_isa', '?')}",
    ]
    for device, where in state["kernels"].items():
        lines.append(f"{device} kernels: {where}")
    if state["reason"]:
        lines.append(f"why: {state['reason']}")
    return lines
