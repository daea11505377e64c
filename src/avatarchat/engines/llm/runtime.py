"""The llama.cpp runtime: load the CPU backend variant that suits the CPU we run on.

scripts/setup.sh builds llama-cpp-python with ``GGML_NATIVE=OFF``, ``GGML_BACKEND_DL=ON`` and
``GGML_CPU_ALL_VARIANTS=ON``: the CPU code is compiled once per instruction-set level (x64, SSE4.2,
AVX, AVX2, AVX-512, VNNI, BF16, AMX, …) into ``llama_cpp/lib/libggml-cpu-<variant>.so``, and ggml
scores each file against the running CPU and loads the best one. Nothing is built for the build
machine's CPU alone, so a wheel made on one machine runs on any other x86-64 (issue 12).
A wheel without loadable backends (an older set-up) has its CPU code built in and needs no loading.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

VARIANT_ENV = "AVATARCHAT_LLAMA_CPU_VARIANT"  # load this CPU variant instead of the best one
_lock = threading.Lock()
_info: RuntimeInfo | None = None


@dataclass(frozen=True)
class RuntimeInfo:
    variants: tuple[str, ...]  # the CPU variants shipped, e.g. ("haswell", "icelake", "x64"); none: built in
    loaded: str | None  # the variant loaded for this CPU ("icelake"), or None when built in
    features: str  # llama.cpp's system info: the instruction sets its CPU code uses

    def describe(self) -> str:
        if not self.variants:
            return f"built-in CPU backend ({self.features})"
        return f"CPU variant {self.loaded} of {len(self.variants)} ({self.features})"


def lib_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llama-cpp-python is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def cpu_variants(directory: Path) -> tuple[str, ...]:
    names = (re.fullmatch(r"libggml-cpu-(.+)\.so", p.name) for p in directory.glob("libggml-cpu-*.so"))
    return tuple(sorted(m.group(1) for m in names if m))


def _loaded_variant() -> str | None:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = re.search(r"libggml-cpu-([\w.]+)\.so", maps)
    return found.group(1) if found else None


def ensure_backends() -> RuntimeInfo:
    """Load llama.cpp's best CPU backend for this machine, once per process; returns what was loaded.

    Must run before a model is loaded. Raises RuntimeError when no variant suits the CPU.
    """
    global _info
    # The CPU variants are built with OpenMP, whose idle threads spin at each barrier by default. With
    # another process on a core, a decode step then waits for a descheduled spinner: 40 tokens took
    # 26-58 s instead of 0.9 s (SmolLM2, 2 threads, one core busy elsewhere). Passive waiting sleeps.
    # Read by libgomp when it loads, i.e. with the first variant below; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with _lock:
        if _info is not None:
            return _info
        import llama_cpp

        directory = lib_dir()
        libggml = _libggml(directory)
        variants = cpu_variants(directory)
        _quiet(llama_cpp)
        forced = os.environ.get(VARIANT_ENV)
        if forced:  # one named variant, as on a CPU that has only its instruction sets (tests, benches)
            if forced not in variants:
                raise RuntimeError(f"{VARIANT_ENV}={forced}: no such CPU variant (have: {', '.join(variants)})")
            load = libggml.ggml_backend_load
            load.argtypes, load.restype = [ctypes.c_char_p], ctypes.c_void_p
            if not load(str(directory / f"libggml-cpu-{forced}.so").encode()):
                raise RuntimeError(f"the {forced} CPU variant does not load on this CPU")
        elif variants:
            fn = libggml.ggml_backend_load_all_from_path
            fn.argtypes, fn.restype = [ctypes.c_char_p], None
            fn(str(directory).encode())
            count = libggml.ggml_backend_reg_count
            count.argtypes, count.restype = [], ctypes.c_size_t
            if count() == 0:
                raise RuntimeError(
                    f"no llama.cpp CPU backend in {directory} suits this CPU (variants: {', '.join(variants)})"
                )
        llama_cpp.llama_backend_init()
        _info = RuntimeInfo(variants, _loaded_variant() if variants else None,
                            " ".join(cpu_features(libggml)))
        return _info


def _libggml(directory: Path) -> ctypes.CDLL:
    """The libggml that libllama uses. The wheel holds copies (no symlinks in wheels), and dlopen by another
    file name would load a second copy with its own, empty, backend registry; by its SONAME, glibc returns
    the copy already loaded for libllama."""
    try:
        return ctypes.CDLL("libggml.so.0", mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
    except OSError:
        return ctypes.CDLL(str(directory / "libggml.so.0"))


class _Feature(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


def cpu_features(libggml: ctypes.CDLL) -> list[str]:
    """The instruction sets the loaded CPU backend was compiled for (ggml_backend_get_features)."""
    by_name = libggml.ggml_backend_reg_by_name
    by_name.argtypes, by_name.restype = [ctypes.c_char_p], ctypes.c_void_p
    proc = libggml.ggml_backend_reg_get_proc_address
    proc.argtypes, proc.restype = [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p
    reg = by_name(b"CPU")
    address = proc(reg, b"ggml_backend_get_features") if reg else None
    if not address:
        return []
    features = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)(address)(reg)
    out, i = [], 0
    while features[i].name:
        name, value = features[i].name.decode(), (features[i].value or b"").decode()
        if value == "1" and name not in ("REPACK", "LLAMAFILE", "OPENMP", "KLEIDIAI"):
            out.append(name)
        i += 1
    return out


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _drop_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp's and ggml's log lines: only errors reach our log (the backend search logs every path it tries)."""
    if level == 4:  # GGML_LOG_LEVEL_ERROR
        logging.getLogger("avatarchat.llama_cpp").warning("llama.cpp: %s", text.decode(errors="replace").strip())


def _quiet(llama_cpp: object) -> None:
    llama_cpp.llama_log_set(_drop_log, ctypes.c_void_p(0))  # type: ignore[attr-defined]
