"""Print the config reference (every key, type, default, meaning) as Markdown, from the typed config.

    .venv/bin/python scripts/config_reference.py > docs/config.md
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, SecretStr

from avatarchat.config import Settings


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann: Any = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += rows(ann, key + ".")
            continue
        default = field.default
        shown = '""' if isinstance(default, SecretStr) else ("null" if default is None else repr(default))
        if len(shown) > 40:
            shown = shown[:37] + "…'"
        type_name = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
        out.append((key, type_name, shown, field.description or ""))
    return out


def main() -> None:
    print("# Configuration reference\n")
    print("Generated from `src/avatarchat/config.py` by `scripts/config_reference.py`. Every key can be set in the")
    print("YAML file (`--config FILE` or `AVATARCHAT_CONFIG`) or overridden by an environment variable named")
    print("`AVATARCHAT_` + the key in capitals with `__` between sections: `llm.openai.model` is")
    print("`AVATARCHAT_LLM__OPENAI__MODEL`. The defaults are the embedded, offline engines.\n")
    print("| key | type | default | meaning |")
    print("|---|---|---|---|")
    bar = "\\|"
    for key, t, d, desc in rows(Settings):
        print(f"| `{key}` | {t.replace('|', bar)} | `{d}` | {desc.replace('|', bar)} |")


if __name__ == "__main__":
    main()
