from pathlib import Path

import pytest

from avatarchat.config import ConfigError, load_settings


def test_defaults_are_the_embedded_engines() -> None:
    s = load_settings()
    assert (s.llm.engine, s.tts.engine) == ("llama_cpp", "piper")


def test_yaml_then_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  port: 9001\nllm:\n  engine: openai\n  openai:\n    model: m1\n")
    s = load_settings(cfg)
    assert (s.server.port, s.llm.engine, s.llm.openai.model) == (9001, "openai", "m1")
    monkeypatch.setenv("AVATARCHAT_SERVER__PORT", "9002")
    assert load_settings(cfg).server.port == 9002


@pytest.mark.parametrize(
    "text, needle",
    [
        ("server: [1, 2", "not valid YAML"),
        ("- a\n- b\n", "mapping"),
        ("server:\n  port: -5\n", "port"),
        ("bogus_section: 1\n", "bogus_section"),
        ("video:\n  audio_sample_rate: 12345\n", "AAC"),
        ("session:\n  target_utilization: 0\n", "target_utilization"),
        ("session:\n  target_utilization: 1.5\n", "target_utilization"),
        ("llm:\n  llama_cpp:\n    parallel: 0\n", "parallel"),
        ("llm:\n  llama_cpp:\n    n_batch: 4\n", "n_batch"),
        ("llm:\n  openai:\n    max_concurrent: 0\n", "max_concurrent"),
        ("pipeline:\n  first_video_target_ms: -1\n", "first_video_target_ms"),
    ],
)
def test_bad_config_is_rejected_with_a_precise_message(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_settings(cfg)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")


def test_api_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "sekrit")
    s = load_settings(llm={"openai": {"api_key_env": "MY_KEY"}})
    assert s.llm.openai.resolved_key() == "sekrit"


def test_config_reference_is_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    runpy.run_path(str(root / "scripts" / "config_reference.py"), run_name="__main__")
    assert capsys.readouterr().out == (root / "docs" / "config.md").read_text(encoding="utf-8"), (
        "docs/config.md is stale: run scripts/config_reference.py > docs/config.md"
    )


def test_the_example_config_loads_as_it_says() -> None:
    s = load_settings(Path(__file__).resolve().parent.parent / "avatarchat.example.yaml")
    assert s.tts.engine == "piper" and s.asr.engine == "whisper" and s.llm.engine == "llama_cpp"
    assert s.tts.openai.voice == "alloy" and s.asr.openai.model == "whisper-1" and s.tts.edge.voice == "zh-CN-XiaoxiaoNeural"
