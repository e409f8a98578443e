"""A copy of a wheel without the files under some of its package folders, its RECORD regenerated (every kept
file's sha256 and size), so that pip installs it as it installs the original: ``python3 scripts/strip_wheel.py
WHEEL OUT_DIR FOLDER [FOLDER ...]``. scripts/make-carry.sh drops pyautoattack's ``examples/`` (a 44 MB checkpoint)
this way."""
from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path


def strip_wheel(src: Path, out_dir: Path, folders: list[str]) -> Path:
    """Write ``out_dir/<src's name>`` without any member that has one of ``folders`` as a path component."""
    if not folders:
        raise SystemExit("strip_wheel: name at least one folder to drop")
    dst = out_dir / src.name
    if dst.resolve() == src.resolve():
        raise SystemExit(f"strip_wheel: {dst} would overwrite its source; give another OUT_DIR")
    with zipfile.ZipFile(src) as zin:
        records = [n for n in zin.namelist() if n.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            raise SystemExit(f"strip_wheel: {src} holds {len(records)} .dist-info/RECORD files; expected 1")
        keep = [n for n in zin.namelist() if n != records[0] and not set(n.split("/")[:-1]) & set(folders)]
        rows = []
        out_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
            for n in keep:
                data = zin.read(n)
                zout.writestr(zin.getinfo(n), data)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                rows.append(f"{n},sha256={digest},{len(data)}")
            rows.append(f"{records[0]},,")
            zout.writestr(records[0], "\n".join(rows) + "\n")
    return dst


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit("usage: python3 scripts/strip_wheel.py WHEEL OUT_DIR FOLDER [FOLDER ...]")
    src = Path(sys.argv[1])
    dst = strip_wheel(src, Path(sys.argv[2]), sys.argv[3:])
    print(f"{dst}: {dst.stat().st_size / 1e6:.2f} MB (was {src.stat().st_size / 1e6:.1f} MB)")
