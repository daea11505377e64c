"""Print the config reference (every key, type, default, env variable) as Markdown, from the typed config."""

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
        if isinstance(default, SecretStr):
            default = '""'
        type_name = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
        env = "AVATARCHAT_" + key.upper().replace(".", "__")
        out.append((key, type_name, repr(default) if default != '""' else default, f"`{env}`  " + (field.description or "")))
    return out


def main() -> None:
    print("| key | type | default | env variable, meaning |")
    print("|---|---|---|---|")
    bar = "\\|"
    for key, t, d, desc in rows(Settings):
        print(f"| `{key}` | {t.replace('|', bar)} | `{d}` | {desc.replace('|', bar)} |")


if __name__ == "__main__":
    main()
