"""Regenerate the shipped default avatar from skimage.data.astronaut() (Eileen Collins, NASA, public domain)."""

from __future__ import annotations

from skimage import data

from avatarchat.engines.avatar.face import create_avatar, default_avatar_dir


def main() -> None:
    model = create_avatar(data.astronaut(), "default")
    model.save(
        default_avatar_dir(),
        meta={"source": "skimage.data.astronaut() — NASA portrait of Eileen Collins", "license": "public domain"},
    )
    print(f"wrote {default_avatar_dir()} ({len(model.landmarks)} landmarks)")


if __name__ == "__main__":
    main()
