"""A minimal PEP 517/660 build backend: an editable wheel with a .pth file and two console scripts."""

import base64
import hashlib
import os
import zipfile

DIST = "fake_rbees-0.0.1"
FILES = {
    f"{DIST}.dist-info/METADATA": "Metadata-Version: 2.1\nName: fake-rbees\nVersion: 0.0.1\n",
    f"{DIST}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: fake\nRoot-Is-Purelib: true\n"
    "Tag: py3-none-any\n",
    f"{DIST}.dist-info/entry_points.txt": "[console_scripts]\nrbees-pool = fake_rbees:main\n"
    "hf = fake_rbees:main\n",
}


def get_requires_for_build_wheel(config_settings: object = None) -> list[str]:
    return []


def build_wheel(
    wheel_directory: str, config_settings: object = None, metadata_directory: object = None
) -> str:
    files = {**FILES, "fake_rbees.pth": os.path.abspath(".") + "\n"}
    name = f"{DIST}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as whl:
        for path, text in files.items():
            data = text.encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(data)}")
            whl.writestr(path, data)
        record.append(f"{DIST}.dist-info/RECORD,,")
        whl.writestr(f"{DIST}.dist-info/RECORD", "\n".join(record) + "\n")
    return name


get_requires_for_build_editable = get_requires_for_build_wheel
build_editable = build_wheel
