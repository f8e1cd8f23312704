"""Builds and loads fastpar's native extension (the C++/CUDA sources in `csrc/`).

The extension is compiled with `torch.utils.cpp_extension` and ninja the first time it is used
and cached under `$FASTPAR_CACHE_DIR` (default `~/.cache/fastpar`), in a folder keyed by the
sources, the torch version, Python, the compiler flags and whether CUDA is compiled in. When
several ranks start at once, one compiles while the others wait on a file lock, then all load
the same build. CUDA sources (`*.cu`) are compiled only where torch has CUDA and nvcc exists;
their torch glue (`*_glue.cpp`, all inside `#ifdef FASTPAR_WITH_CUDA`) compiles to nothing
elsewhere.

A finished build leaves a record of the library's name, size and SHA-256; a cached library is
loaded only when it still matches them. Loading a library truncated after its build (a full
disk, a copy cut short) is a bus error that kills the process, which Python cannot catch, so a
cached library that no longer matches its record is rebuilt, saying why.

`python -m fastpar build` prebuilds; `load()` returns the module.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import cast

import torch

from fastpar._logging import get_logger
from fastpar._machine import file_sha256
from fastpar._native_types import NativeModule

logger = get_logger(__name__)

_EXTENSION_PREFIX = "fastpar_native"
# A finished build's markers, in its folder: the library's name alone (all an older fastpar
# reads: kept, so one sharing the cache keeps using the build instead of rebuilding it), and
# the record load() trusts: {"library": name, "size": bytes, "sha256": hex}.
_MARKER = "complete"
_RECORD = "complete.json"
_SOURCE_SUFFIXES = (".cpp", ".cu")
_HEADER_SUFFIXES = (".h", ".cuh")
_CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-fno-math-errno")
# No --use_fast_math: it flushes float32 denormals to zero, and GPU reductions must give the
# numbers the CPU ones give.
_CUDA_FLAGS = ("-O3", "-std=c++17", "-lineinfo")
# Compute capability compiled for when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (a
# build machine): torch would otherwise derive it from the visible GPUs and fail on none.
DEFAULT_CUDA_ARCH = "9.0"

_loaded: NativeModule | None = None
_load_lock = threading.Lock()


class NativeBuildError(RuntimeError):
    """The native extension cannot be built or loaded here; the message says what is missing."""


def source_dir() -> Path:
    """Where the C++/CUDA sources are: `fastpar/_csrc` in a wheel, `csrc/` in a checkout."""
    packaged = Path(__file__).resolve().parent / "_csrc"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "csrc"
    if checkout.is_dir():
        return checkout
    raise NativeBuildError(
        f"fastpar's C++ sources are missing (looked in {packaged} and {checkout}); "
        "reinstall fastpar"
    )


def cache_root() -> Path:
    configured = os.environ.get("FASTPAR_CACHE_DIR")
    # An empty FASTPAR_CACHE_DIR (`FASTPAR_CACHE_DIR= cmd`) means unset, not the current folder.
    if not configured:
        return Path.home() / ".cache" / "fastpar"
    # A `~` that no shell expanded (quoted, or from a job file or a container's environment)
    # means the home folder, as torch.hub reads TORCH_HOME; not a folder named `~`.
    return Path(configured).expanduser()


def cuda_build_possible() -> tuple[bool, str]:
    """Whether CUDA sources can be compiled here, and why not when they cannot."""
    if torch.version.cuda is None:
        return False, "this torch build has no CUDA"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return False, "nvcc was not found (set CUDA_HOME)"
    return True, ""


def _nvcc_dry_run_words(nvcc: str, variables: tuple[str, ...]) -> list[str]:
    """The words of the variables of `nvcc`'s dry run (INCLUDES, LIBRARIES, ...); [] when it
    cannot say."""
    try:
        dry_run = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    words: list[str] = []
    for line in dry_run.stderr.splitlines():
        # e.g. `#$ INCLUDES="-I/usr/local/cuda/bin/../targets/x86_64-linux/include"  `
        name, _, value = line.removeprefix("#$ ").partition("=")
        if name not in variables:
            continue
        try:
            words += shlex.split(value)
        except ValueError:
            continue
    return words


def _flag_values(words: list[str], flags: tuple[str, ...]) -> list[str]:
    """The folders after the given flags, joined (`-I/x`) or separate (`-isystem /x`), that
    exist, normalised."""
    folders: list[str] = []
    for i, word in enumerate(words):
        joined = next((f for f in flags if word.startswith(f) and len(word) > len(f)), None)
        if joined is not None:
            folders.append(word[len(joined) :])
        elif word in flags and i + 1 < len(words):
            folders.append(words[i + 1])
    return [os.path.normpath(folder) for folder in folders if Path(folder).is_dir()]


def nvcc_include_dirs(nvcc: str) -> list[str]:
    """The folders `nvcc` takes CUDA's own headers from (cuda_runtime.h, CCCL), as its dry run
    lists them; [] when it cannot say.

    The C++ compiles of the CUDA code's torch glue include them too. torch gives every compile
    CUDA_HOME/include, which lacks them where CUDA_HOME was guessed from an nvcc outside the
    toolkit (a wrapper script on PATH: CUDA_HOME is then the script's grandparent folder)."""
    words = _nvcc_dry_run_words(nvcc, ("INCLUDES", "SYSTEM_INCLUDES"))
    return _flag_values(words, ("-I", "-isystem"))


def nvcc_library_dirs(nvcc: str) -> list[str]:
    """The folders `nvcc` links CUDA's runtime from (libcudart), as its dry run lists them,
    without the driver stubs; [] when it cannot say.

    The link of a CUDA build searches them too: torch links `-lcudart` from CUDA_HOME/lib64 or
    CUDA_HOME/lib, which lack it where CUDA_HOME was guessed from a wrapper script on PATH."""
    folders = _flag_values(_nvcc_dry_run_words(nvcc, ("LIBRARIES",)), ("-L",))
    return [folder for folder in folders if Path(folder).name != "stubs"]


@dataclass(frozen=True)
class BuildPlan:
    name: str  # the Python module name, unique per key so two builds never collide
    directory: Path
    sources: tuple[Path, ...]
    with_cuda: bool


def _cpu_signature() -> str:
    # -march=native ties a build to the processor it was compiled on.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def cuda_arch_list() -> str:
    """The compute capabilities CUDA sources are compiled for: TORCH_CUDA_ARCH_LIST when set,
    else those of the visible GPUs, else DEFAULT_CUDA_ARCH."""
    configured = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if configured:
        return configured
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        capabilities = {
            torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())
        }
        return ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities))
    return DEFAULT_CUDA_ARCH


def plan_build() -> BuildPlan:
    src = source_dir()
    with_cuda, _ = cuda_build_possible()
    suffixes = _SOURCE_SUFFIXES if with_cuda else (".cpp",)
    sources = tuple(sorted(p for p in src.iterdir() if p.suffix in suffixes))
    headers = tuple(sorted(p for p in src.iterdir() if p.suffix in _HEADER_SUFFIXES))
    digest = hashlib.sha256()
    for path in sources + headers:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for part in (
        torch.__version__,
        str(torch.version.cuda),
        sys.version,
        platform.machine(),
        _cpu_signature(),
        repr(_CXX_FLAGS),
        repr(_CUDA_FLAGS),
        str(with_cuda),
        cuda_arch_list() if with_cuda else "",
    ):
        digest.update(part.encode())
    key = digest.hexdigest()[:16]
    name = f"{_EXTENSION_PREFIX}_{key}"
    return BuildPlan(name=name, directory=cache_root() / name, sources=sources, with_cuda=with_cuda)


def _check_toolchain() -> None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise NativeBuildError(
            f"fastpar's native extension needs a C++ compiler, and '{compiler}' was not found: "
            "install g++ (Debian/Ubuntu: apt-get install g++) or set CXX"
        )
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
    except RuntimeError as error:
        raise NativeBuildError(
            "fastpar's native extension is built with ninja, which was not found: pip install ninja"
        ) from error


def _write_marker(plan: BuildPlan, library: Path) -> None:
    """Vouch for the built `library`: its name, size and SHA-256, each marker written whole (a
    rename) so a rank reading it without the lock never sees half of it."""
    record = {
        "library": library.name,
        "size": library.stat().st_size,
        "sha256": file_sha256(library),
    }
    for name, text in ((_RECORD, json.dumps(record) + "\n"), (_MARKER, library.name)):
        partial = plan.directory / f"{name}.partial"
        partial.write_text(text)
        os.replace(partial, plan.directory / name)


def _built_library(plan: BuildPlan) -> tuple[Path | None, str]:
    """The cached library when its record vouches for it; else None, and why not ("" when
    nothing was built)."""
    marker = plan.directory / _RECORD
    try:
        text = marker.read_text()
    except (FileNotFoundError, NotADirectoryError):  # (a file in the way: build() says so)
        if (plan.directory / _MARKER).exists():
            return None, (
                f"{plan.directory} was built by an older fastpar, which recorded no size and "
                "SHA-256 of the library to check it against"
            )
        return None, ""
    try:
        record = json.loads(text)
        name, size, sha256 = record["library"], record["size"], record["sha256"]
        if not (isinstance(name, str) and Path(name).name == name and type(size) is int
                and isinstance(sha256, str)):  # fmt: skip
            raise TypeError(record)
    except (ValueError, KeyError, TypeError):
        return None, (
            f"its build record {marker} holds no name, size and SHA-256 of the library (damaged)"
        )
    library = plan.directory / name
    try:
        actual = library.stat().st_size
    except FileNotFoundError:
        return None, f"{library} is missing"
    if actual != size:
        return None, f"{library} has {actual} bytes, its build wrote {size} (truncated or altered)"
    if file_sha256(library) != sha256:
        return None, f"{library}'s SHA-256 is not its build's (altered)"
    return library, ""


def _import_library(name: str, library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise NativeBuildError(f"cannot load the native extension from {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def _compile(plan: BuildPlan, verbose: bool) -> Path:
    _check_toolchain()
    logger.info("building fastpar's native extension in %s", plan.directory)
    extra_cflags = list(_CXX_FLAGS)
    if plan.with_cuda:
        extra_cflags.append("-DFASTPAR_WITH_CUDA")
    previous_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if plan.with_cuda:  # torch's build reads the architectures from the environment
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    try:
        module = _load_extension(plan, extra_cflags, verbose)
    finally:
        if previous_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous_arch
    # torch's load() imported the library without registering it; a second import of the same
    # library would run its module init again, and pybind11 refuses to register a class twice.
    sys.modules[plan.name] = module
    library = Path(module.__file__).resolve()
    _write_marker(plan, library)
    return library


def _load_extension(plan: BuildPlan, extra_cflags: list[str], verbose: bool) -> ModuleType:
    from torch.utils.cpp_extension import CUDA_HOME, load

    include_paths = [str(plan.sources[0].parent)]
    library_flags: list[str] = []
    if plan.with_cuda and CUDA_HOME is not None:  # (with_cuda: CUDA_HOME/bin/nvcc exists)
        nvcc = str(Path(CUDA_HOME) / "bin" / "nvcc")
        include_paths += nvcc_include_dirs(nvcc)
        library_flags += [f"-L{folder}" for folder in nvcc_library_dirs(nvcc)]
    return load(
        name=plan.name,
        sources=[str(p) for p in plan.sources],
        build_directory=str(plan.directory),
        extra_cflags=extra_cflags,
        extra_cuda_cflags=[*_CUDA_FLAGS, "-DFASTPAR_WITH_CUDA"],
        extra_include_paths=include_paths,
        extra_ldflags=library_flags,
        with_cuda=plan.with_cuda,
        verbose=verbose,
    )


def build(verbose: bool = False, plan: BuildPlan | None = None) -> Path:
    """Compile the extension now if it is not cached yet; returns the library's path.

    Safe to call from many processes at once: they serialise on a file lock next to the build.
    """
    plan = plan or plan_build()
    library, _ = _built_library(plan)
    if library is not None:
        return library
    lock_path = plan.directory.parent / f"{plan.name}.lock"
    try:
        plan.directory.mkdir(parents=True, exist_ok=True)
        lock_file = open(lock_path, "w")  # noqa: SIM115 (closed by the with below)
    except OSError as error:
        raise NativeBuildError(
            f"fastpar's native extension cannot be built in {plan.directory.parent} "
            f"({error.strerror}): set FASTPAR_CACHE_DIR to a writable folder"
        ) from error
    with lock_file:
        # An flock dies with its process, so a rank killed mid-build never leaves a stale lock.
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            library, why = _built_library(plan)
            if library is None:
                if why:
                    # ninja would keep a truncated library (it is newer than its sources) and
                    # objects damaged alike: build from nothing. Holding the flock, nobody else
                    # reads the folder past its markers, which go first.
                    logger.warning("rebuilding fastpar's native extension: %s", why)
                    for marker in (_RECORD, _MARKER):
                        (plan.directory / marker).unlink(missing_ok=True)
                    shutil.rmtree(plan.directory)
                    plan.directory.mkdir()
                # torch's own lock file in the build folder outlives a build that was killed,
                # and would make this one wait forever; holding our flock, nobody else builds.
                (plan.directory / "lock").unlink(missing_ok=True)
                library = _compile(plan, verbose)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return library


def load(verbose: bool = False) -> NativeModule:
    """The native extension module, built on first use and loaded once per process; its typed
    surface is `fastpar._native_types.NativeModule`."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _load_lock:
        if _loaded is None:
            plan = plan_build()
            try:
                library = build(verbose=verbose, plan=plan)  # hash the sources once
            except NativeBuildError:
                raise
            except Exception as error:  # compiler errors: keep the log, name the cause
                raise NativeBuildError(
                    f"building fastpar's native extension failed: {error}"
                ) from error
            module = sys.modules.get(plan.name)
            if module is None:
                try:
                    module = _import_library(plan.name, library)
                except ImportError as error:  # corrupted, or a cache shared with another system
                    raise NativeBuildError(
                        f"the cached native extension does not load ({error}): delete "
                        f"{plan.directory} and run `python -m fastpar build`"
                    ) from error
            _loaded = cast(NativeModule, module)
    return _loaded


def is_available() -> tuple[bool, str]:
    """Whether the native extension loads here; the reason when it does not."""
    try:
        load()
    except NativeBuildError as error:
        return False, str(error)
    return True, ""
