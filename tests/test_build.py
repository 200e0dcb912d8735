"""The first-use build (patchblend/_build.py) and the fallback when it cannot run.

The real compilation is exercised by CI (.ci/check_install.sh: a pure wheel and an sdist installed with plain
pip, then imported); here the cache logic runs with a stand-in compiler, and the fallback in subprocesses
importing a copy of the package that has no compiled library.
"""
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import patchblend
from patchblend import _build

ROOT = Path(patchblend.__file__).resolve().parent.parent


@pytest.fixture
def fake_compile(monkeypatch, tmp_path):
    """_build._compile replaced by a stand-in that takes a while and writes the library file; returns the list
    of its calls. The cache goes to a temporary folder."""
    monkeypatch.setenv("PATCHBLEND_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def compile_(kind, csrc, target, name):
        calls.append(kind)
        time.sleep(0.3)
        (target / f"{name}.so").write_bytes(b"stand-in")

    monkeypatch.setattr(_build, "_compile", compile_)
    monkeypatch.setattr(_build, "compiler", lambda: "/usr/bin/c++")
    return calls


def test_build_once_for_concurrent_callers_then_cached(fake_compile, capsys, caplog):
    """Four callers at once (DDP ranks, workers): one compiles under the file lock, the others wait and get
    its result; one log line; a later call compiles nothing."""
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(_build.build("cpu"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake_compile == ["cpu"]
    assert len(set(paths)) == 1 and paths[0].read_bytes() == b"stand-in"
    # the line goes to the `patchblend` logger when logging is set up (pytest does), else to stderr
    lines = capsys.readouterr().err.strip().splitlines() + [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "compiled the CPU kernels" in lines[0] and str(paths[0].parent) in lines[0]
    assert _build.build("cpu") == paths[0] and fake_compile == ["cpu"]
    assert _build.library_path("cpu") == paths[0]


def test_unfinished_build_is_redone(fake_compile):
    """A folder without its `done` mark (a build killed halfway) is never loaded: it is built again."""
    folder = _build.build_dir() / _build.CPU_LIBRARY
    folder.mkdir(parents=True)
    (folder / f"{_build.CPU_LIBRARY}.so").write_bytes(b"half-written")
    assert _build.library_path("cpu") is None
    assert _build.build("cpu").read_bytes() == b"stand-in" and fake_compile == ["cpu"]


def test_cache_key_follows_versions_and_sources(monkeypatch, tmp_path):
    """An upgrade of torch (or CUDA, patchblend, Python) or a changed source builds afresh."""
    monkeypatch.setenv("PATCHBLEND_CACHE_DIR", str(tmp_path / "c"))
    csrc = tmp_path / "csrc"
    shutil.copytree(_build.source_dir(), csrc)
    key = _build.build_key(csrc)
    assert torch.__version__.replace("+", "_") in key and _build.VERSION in key
    assert _build.build_dir(csrc) == tmp_path / "c" / key
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert _build.build_key(csrc) != key
    monkeypatch.undo()
    monkeypatch.setenv("PATCHBLEND_CACHE_DIR", str(tmp_path / "c"))
    (csrc / "blend_ops.cpp").write_text((csrc / "blend_ops.cpp").read_text() + "\n// changed\n")
    assert _build.build_key(csrc) != key


def test_every_source_file_is_in_the_cache_key_and_the_sdist(tmp_path):
    """A change to any file under csrc/ builds afresh (the kernel body blend_cpu_kernels.inc was not hashed, so
    a changed .inc loaded the stale build), and MANIFEST.in ships every such file (op_schemas.h included: the
    reference backend reads the schemas from it)."""
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))
    files = sorted(p for p in csrc.rglob("*") if p.is_file())
    assert {p.suffix for p in files} <= set(_build.SOURCE_SUFFIXES), "a file kind the cache key does not hash"
    assert csrc / "op_schemas.h" in files and csrc / "cpu" / "blend_cpu_kernels.inc" in files
    key = _build.build_key(csrc)
    for path in files:
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        assert _build.build_key(csrc) != key, path.name
        path.write_bytes(original)
    assert _build.build_key(csrc) == key
    manifest = (ROOT / "MANIFEST.in").read_text()
    line = next(line for line in manifest.splitlines() if line.startswith("recursive-include csrc"))
    assert set(line.split()[2:]) == {f"*{suffix}" for suffix in _build.SOURCE_SUFFIXES}


def test_cache_root_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PATCHBLEND_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _build.cache_root() == tmp_path / "patchblend"
    monkeypatch.setenv("PATCHBLEND_CACHE_DIR", str(tmp_path / "x"))
    assert _build.cache_root() == tmp_path / "x"


@pytest.fixture
def package_without_binary(tmp_path):
    """A source checkout's layout (patchblend/ and csrc/) with no compiled library in it."""
    shutil.copytree(ROOT / "patchblend", tmp_path / "patchblend",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_csrc"))
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc", ignore=shutil.ignore_patterns("*.o", "*.so"))
    return tmp_path


_SMOKE = (
    "import torch, patchblend, json\n"
    "p = torch.arange(16.).reshape(2, 1, 2, 2, 2)\n"
    "o = patchblend.calibrated_blend(p, torch.tensor([1., 2.]), [[0, 0, 0], [1, 1, 1]])\n"
    "e = patchblend._reference.blend_reference(p, torch.tensor([1., 2.]).view(2, 1, 1, 1),"
    " torch.tensor([[0, 0, 0], [1, 1, 1]]), None, (3, 3, 3), 'count')\n"
    "print(json.dumps([patchblend.backend_info(), bool(torch.equal(o, e))]))\n"
)


@pytest.mark.parametrize("cause", ["no compiler", "PATCHBLEND_BUILD=0"])
def test_without_kernels_and_no_way_to_build_the_reference_serves_with_one_warning(package_without_binary, cause):
    env = dict(os.environ, PATCHBLEND_CACHE_DIR=str(package_without_binary / "cache"), PATCHBLEND_BACKEND="auto")
    if cause == "no compiler":
        env["CXX"] = str(package_without_binary / "no-such-compiler")
    else:
        env["PATCHBLEND_BUILD"] = "0"
    res = subprocess.run([sys.executable, "-c", _SMOKE], cwd=package_without_binary, env=env, capture_output=True,
                         text=True, check=True)
    info, equal = __import__("json").loads(res.stdout.strip().splitlines()[-1])
    assert info["backend"] == "reference" and info["kernels"]["CPU"] == "reference" and equal
    assert res.stderr.count("RuntimeWarning") == 1, res.stderr
    assert "pure-PyTorch reference" in res.stderr and "python -m patchblend build" in res.stderr
    assert ("no C++ compiler" if cause == "no compiler" else "PATCHBLEND_BUILD=0") in res.stderr
    assert not (package_without_binary / "cache").exists() or not any((package_without_binary / "cache").rglob("*.so"))
    # `build` says what is missing and fails
    res = subprocess.run([sys.executable, "-m", "patchblend", "build"], cwd=package_without_binary, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 1 and "not built: CPU" in res.stderr


def test_torch_older_than_the_stable_abi_target_is_not_built(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.10.1")
    reason = _build.missing_tools("cpu")
    assert reason is not None and "torch >= 2.11" in reason and "2.10.1" in reason
    with pytest.raises(RuntimeError, match="torch >= 2.11"):
        _build.build("cpu")


def test_cache_key_follows_the_python_version(monkeypatch):
    """A library built for one Python must not be loaded by another (the first-use build is not abi3)."""
    key = _build.build_key(_build.source_dir())
    monkeypatch.setattr(sys, "version_info", (sys.version_info[0], sys.version_info[1] + 1, 0, "final", 0))
    assert _build.build_key(_build.source_dir()) != key


def test_compile_that_writes_the_library_then_fails_is_never_loaded(fake_compile, monkeypatch):
    """The `done` marker is written only after the compiler succeeded: a compile that leaves a library behind
    and then fails (a link step, a killed ninja) is reported, never loaded, and built again next time."""
    def failing(kind, csrc, target, name):
        (target / f"{name}.so").write_bytes(b"written, then the build failed")
        raise OSError("ninja: build stopped")

    monkeypatch.setattr(_build, "_compile", failing)
    with pytest.raises(RuntimeError, match="building the CPU kernels failed .*ninja: build stopped"):
        _build.build("cpu")
    folder = _build.build_dir() / _build.CPU_LIBRARY
    assert (folder / f"{_build.CPU_LIBRARY}.so").is_file() and not (folder / "done").exists()
    assert _build.library_path("cpu") is None and _build.damaged("cpu") is None
    monkeypatch.undo()
    monkeypatch.setenv("PATCHBLEND_CACHE_DIR", str(folder.parent.parent))
    monkeypatch.setattr(_build, "_compile", lambda kind, csrc, target, name: (
        fake_compile.append(kind), (target / f"{name}.so").write_bytes(b"stand-in")))
    monkeypatch.setattr(_build, "compiler", lambda: "/usr/bin/c++")
    assert _build.build("cpu").read_bytes() == b"stand-in" and fake_compile == ["cpu"]


@pytest.mark.parametrize("damage", ["empty", "zeroed", "truncated", "missing", "old marker"])
def test_damaged_cached_library_is_detected_and_rebuilt(fake_compile, damage):
    """The `done` marker holds the library's SHA-256: an empty, zeroed or truncated library (OSError or SIGBUS when
    loaded), a missing one, or a marker without a checksum is never loaded; build() builds it again."""
    lib = _build.build("cpu")
    assert (lib.parent / "done").read_text().split()[0] == "sha256" and _build.damaged("cpu") is None
    size = len(lib.read_bytes())
    if damage == "empty":
        lib.write_bytes(b"")
    elif damage == "zeroed":
        lib.write_bytes(bytes(size))
    elif damage == "truncated":
        lib.write_bytes(lib.read_bytes()[: size // 2])
    elif damage == "missing":
        lib.unlink()
    else:
        (lib.parent / "done").write_text("1733300000.0\n")
    assert _build.library_path("cpu") is None
    assert _build.damaged("cpu") is not None
    assert _build.build("cpu").read_bytes() == b"stand-in" and fake_compile == ["cpu", "cpu"]
    assert _build.damaged("cpu") is None and _build.library_path("cpu") == lib


def test_damaged_cache_rebuilt_on_load_with_one_warning(fake_compile, monkeypatch):
    """_backend._load_cached rebuilds a damaged cached library (saying so in one warning) and loads the new one."""
    from patchblend import _backend

    lib = _build.build("cpu")
    lib.write_bytes(b"")
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", lambda path: loaded.append(path))
    with pytest.warns(RuntimeWarning, match=r"is damaged \(.*SHA-256 differs\); rebuilt it") as record:
        assert _backend._load_cached("cpu") == f"compiled ({lib})"
    assert len(record) == 1 and loaded == [str(lib)] and fake_compile == ["cpu", "cpu"]


def test_unwritable_cache_folder_is_reported(fake_compile, monkeypatch, tmp_path):
    """PATCHBLEND_CACHE_DIR naming a file (or a read-only folder): a RuntimeError naming the folder and the fix,
    which the loader turns into the reference plus one warning, instead of an OSError at mkdir."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("PATCHBLEND_CACHE_DIR", str(tmp_path / "a-file"))
    with pytest.raises(RuntimeError, match=r"cannot be written .*set PATCHBLEND_CACHE_DIR to a writable folder"):
        _build.build("cpu")
    assert fake_compile == []


def _damage_cache(package: Path, how: str) -> dict:
    """An environment whose cache (in the package copy) holds a finished build of the CPU library that is damaged
    (``how``: "zeroed", "empty"), or is a file rather than a folder ("file")."""
    cache = package / "cache"
    env = dict(os.environ, PATCHBLEND_CACHE_DIR=str(cache), PATCHBLEND_BACKEND="auto")
    if how == "file":
        cache.write_text("not a folder")
        return env
    folder = cache / _build.build_key(package / "csrc") / _build.CPU_LIBRARY
    folder.mkdir(parents=True)
    (folder / f"{_build.CPU_LIBRARY}.so").write_bytes(bytes(4096) if how == "zeroed" else b"")
    (folder / "done").write_text("sha256 " + "0" * 64 + "\n")
    env["PATCHBLEND_BUILD"] = "0"  # (the rebuild itself is tested above with a stand-in compiler)
    return env


@pytest.mark.parametrize("how", ["zeroed", "empty", "file"])
def test_bad_cache_gives_the_reference_with_one_warning(package_without_binary, how):
    """`import patchblend` with a zeroed or empty cached library (OSError before, a truncated one SIGBUS) or a cache
    folder that cannot be made: the reference serves, with one warning that says why; `python -m patchblend build`
    says what is missing and exits 1, without a traceback."""
    env = _damage_cache(package_without_binary, how)
    res = subprocess.run([sys.executable, "-c", _SMOKE], cwd=package_without_binary, env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    info, equal = __import__("json").loads(res.stdout.strip().splitlines()[-1])
    assert info["backend"] == "reference" and equal
    assert res.stderr.count("RuntimeWarning") == 1, res.stderr
    assert ("cannot be written" if how == "file" else "is damaged") in res.stderr
    res = subprocess.run([sys.executable, "-m", "patchblend", "build"], cwd=package_without_binary, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 1 and "not built: CPU" in res.stderr and "Traceback" not in res.stderr, res.stderr
