"""Issue 12: the installed llama.cpp runtime runs on any x86-64 CPU, and doctor proves each engine works."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from avatarchat.cli import main
from avatarchat.config import load_settings
from avatarchat.engines.llm.runtime import cpu_variants, lib_dir
from avatarchat.probe import PROBES, run_probes

x86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 CPU variants")


def _vector_registers(lib: Path) -> set[str]:
    """Which of xmm/ymm/zmm the machine code in ``lib`` uses (objdump's disassembly)."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    return {reg for reg in ("ymm", "zmm") if f"%{reg}" in out}


@x86
def test_every_cpu_variant_is_shipped() -> None:
    variants = cpu_variants(lib_dir())
    # From plain x86-64 up to AMX: any CPU finds one that it can run, and a modern one its best.
    for v in ("x64", "sse42", "haswell", "skylakex", "icelake", "zen4", "sapphirerapids"):
        assert v in variants, variants


@x86
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_nothing_is_built_for_the_build_machines_cpu() -> None:
    """A native build (-march=native, GGML_NATIVE=ON) vectorises the common code with AVX: the wheel it makes
    crashes on other CPUs (issue 12). Here only the CPU variants may use AVX registers, each its own level."""
    lib = lib_dir()
    for common in ("libllama.so", "libggml-base.so", "libggml.so"):
        assert _vector_registers(lib / common) == set(), common
    assert _vector_registers(lib / "libggml-cpu-x64.so") == set()
    assert _vector_registers(lib / "libggml-cpu-haswell.so") == {"ymm"}
    assert "zmm" in _vector_registers(lib / "libggml-cpu-skylakex.so")


_COUNT = (
    "from avatarchat.engines.llm.runtime import ensure_backends\n"
    "from avatarchat.engines.llm.llama_cpp import default_model_path\n"
    "info = ensure_backends()\n"
    "from llama_cpp import Llama\n"
    "llm = Llama(model_path=str(default_model_path()), n_ctx=256, verbose=False)\n"
    "out = llm.create_completion('One, two, three, four, five,', max_tokens=6, temperature=0.0)\n"
    "print(info.loaded, '|', info.features, '|', out['usage']['prompt_tokens'], '|', out['choices'][0]['text'])\n"
)


def _count_in_child(variant: str | None = None) -> tuple[str, str, int, str]:
    """A multi-token prompt evaluated in a child (a crash must not take the test run with it), on the best
    CPU variant or the one named: (variant loaded, its instruction sets, prompt tokens, continuation)."""
    env = dict(os.environ)
    if variant is not None:
        env["AVATARCHAT_LLAMA_CPU_VARIANT"] = variant
    proc = subprocess.run([sys.executable, "-c", _COUNT], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded, features, prompt_tokens, text = (p.strip() for p in proc.stdout.strip().split("|"))
    return loaded, features, int(prompt_tokens), text


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@x86
def test_the_best_variant_for_this_cpu_is_loaded_and_evaluates_a_prompt() -> None:
    loaded, features, prompt_tokens, text = _count_in_child()
    flags = _cpu_flags()
    if "avx512f" in flags:
        assert loaded not in ("x64", "sse42", "sandybridge", "haswell"), loaded
        assert "AVX512" in features
    elif "avx2" in flags:
        assert "AVX2" in features
    assert prompt_tokens > 5
    assert "six" in text.lower() or "6" in text


@x86
@pytest.mark.parametrize("variant, needs", [("x64", set()), ("sse42", {"sse4_2"}), ("haswell", {"avx2", "fma", "f16c"}),
                                            ("skylakex", {"avx512f", "avx512bw"})])
def test_the_same_wheel_runs_on_lesser_cpus(variant: str, needs: set[str]) -> None:
    """Each CPU variant evaluates a prompt correctly: what a machine with only those instruction sets loads."""
    if not needs <= _cpu_flags():
        pytest.skip(f"this CPU lacks {needs - _cpu_flags()}")
    loaded, _, _, text = _count_in_child(variant)
    assert loaded == variant
    assert "six" in text.lower() or "6" in text


def test_an_unknown_cpu_variant_is_a_clear_error() -> None:
    code = "from avatarchat.engines.llm.runtime import ensure_backends\nensure_backends()\n"
    env = dict(os.environ, AVATARCHAT_LLAMA_CPU_VARIANT="pentium4")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1
    assert "AVATARCHAT_LLAMA_CPU_VARIANT=pentium4: no such CPU variant" in proc.stderr and "haswell" in proc.stderr


@pytest.mark.models
def test_doctor_runs_every_engine_for_real(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["doctor", "--engines"]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    for name in PROBES:
        assert f"engine {name} works" in out
    assert "tokens after a" in out and "rendered and encoded 5 frames" in out and "hello" in out.lower()


@pytest.mark.models
def test_a_crashing_engine_is_reported_and_the_others_still_checked(tmp_path: Path) -> None:
    """A real segmentation fault in the LLM's probe (as a native build on another CPU gives) becomes a
    FAIL naming the signal; a fresh child goes on with the next engine."""
    python = tmp_path / "python"
    python.write_text(
        "#!/bin/sh\n"
        f"exec {sys.executable} -c \"import sys, ctypes, avatarchat.probe as p; "
        "p.CHILD['llm'] = lambda s: ctypes.string_at(0); sys.exit(p.child_main(sys.argv[3:]))\" \"$@\"\n"
    )
    python.chmod(0o755)
    results = {r.name: r for r in run_probes(load_settings(), ["llm", "vad"], python=str(python))}
    assert not results["llm"].ok
    assert "SIGSEGV" in results["llm"].detail and "segmentation fault" in results["llm"].detail
    assert results["vad"].ok, results["vad"].detail


def test_a_probe_that_hangs_is_cut_off(tmp_path: Path) -> None:
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\necho START llm\nexec sleep 30\n")
    python.chmod(0o755)
    [result] = run_probes(load_settings(), ["llm"], python=str(python), timeout_s=1.0)
    assert not result.ok and "did not finish within 1 s" in result.detail


def test_a_probe_process_that_cannot_start_fails_every_engine(tmp_path: Path) -> None:
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 'No module named avatarchat' >&2\nexit 1\n")
    python.chmod(0o755)
    results = run_probes(load_settings(), ["tts", "asr"], python=str(python))
    assert [r.ok for r in results] == [False, False]
    assert all("exited with status 1" in r.detail and "No module named" in r.detail for r in results)


@pytest.mark.models
def test_make_run_refuses_to_start_when_an_engine_fails(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, AVATARCHAT_LLM__LLAMA_CPP__MODEL_PATH=str(tmp_path / "missing.gguf"),
               VENV=str(Path(sys.executable).parents[1]))
    proc = subprocess.run(["bash", str(root / "scripts" / "run.sh"), "--port", "0"], capture_output=True, text=True,
                          env=env, timeout=240, cwd=root)
    assert proc.returncode == 1
    assert "FAILED  engine llm works" in proc.stdout and "missing.gguf" in proc.stdout
    assert "not starting" in proc.stderr and "Uvicorn running" not in proc.stderr


def test_openmp_threads_wait_passively() -> None:
    """Spinning OpenMP threads made a decode step wait for a descheduled spinner whenever another process
    had a core (SmolLM2: 40 tokens in 26-58 s instead of 0.9 s). The runtime asks for passive waiting."""
    import subprocess
    import sys

    code = ("import os; os.environ.pop('OMP_WAIT_POLICY', None); from avatarchat.engines.llm.runtime import ensure_backends;"
            "ensure_backends(); print(os.environ['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "PASSIVE", out.stderr[-2000:]
