"""Rewrite a wheel without the files a machine will not load, so that it fits the 64 MiB that travels to the GPU.

bitsandbytes' wheel holds one native library per CUDA, ROCm and XPU release (43 MB packed, 129 MB unpacked); the
GPU machine's torch is built for CUDA 13 and loads libbitsandbytes_cuda13x.so alone. The slimmed wheel holds every
other file as it was, and a RECORD that lists exactly what it holds, so pip installs it as it installs the original.

    python3 bench/gpu/slim_wheel.py WHEEL 'bitsandbytes/libbitsandbytes_(cuda1[0-2]|rocm|xpu).*\\.so'
"""

from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path


def slim(wheel: Path, drop: str) -> list[str]:
    """Remove from `wheel`, in place, the files whose names match the regular expression `drop`; returns them."""
    pattern = re.compile(drop)
    with zipfile.ZipFile(wheel) as source:
        infos = source.infolist()
        dropped = [i.filename for i in infos if pattern.fullmatch(i.filename)]
        if not dropped:
            return []
        kept = [i for i in infos if i.filename not in dropped]
        record = next(i for i in kept if i.filename.endswith(".dist-info/RECORD"))
        slimmed = wheel.with_suffix(".slim")
        with zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as target:
            for info in kept:
                data = source.read(info)
                if info is record:
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if line.split(",", 1)[0] not in dropped).encode()
                target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    slimmed.replace(wheel)
    return dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("drop", help="regular expression matched against each file's whole name in the wheel")
    args = parser.parse_args()
    before = args.wheel.stat().st_size
    dropped = slim(args.wheel, args.drop)
    print(
        f"{args.wheel.name}: {len(dropped)} files left out, {before >> 10} KiB -> {args.wheel.stat().st_size >> 10} KiB"
    )


if __name__ == "__main__":
    main()
