"""Minimal in-tree PEP 517 build backend for the omw_hello test package (no setuptools, no index).

build_sdist writes omw_hello-1.0.tar.gz (package, pyproject.toml, this file, PKG-INFO);
build_wheel writes a pure-Python omw_hello-1.0-py3-none-any.whl with a valid RECORD."""
import base64
import hashlib
import io
import os
import tarfile
import zipfile

NAME, VERSION = "omw_hello", "1.0"
HERE = os.path.dirname(os.path.abspath(__file__))
METADATA = f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n"


def _package_files():
    out = []
    for root, dirs, files in os.walk(os.path.join(HERE, NAME)):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in sorted(files):
            if f.endswith(".py"):
                full = os.path.join(root, f)
                out.append((os.path.relpath(full, HERE), full))
    return out


def get_requires_for_build_sdist(config_settings=None):
    return []


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_sdist(sdist_directory, config_settings=None):
    base = f"{NAME}-{VERSION}"
    path = os.path.join(sdist_directory, base + ".tar.gz")
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for rel, full in _package_files() + [("pyproject.toml", os.path.join(HERE, "pyproject.toml")),
                                             ("omw_build.py", os.path.join(HERE, "omw_build.py"))]:
            tar.add(full, arcname=f"{base}/{rel}")
        data = METADATA.encode()
        info = tarfile.TarInfo(f"{base}/PKG-INFO")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return os.path.basename(path)


def _record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    filename = f"{NAME}-{VERSION}-py3-none-any.whl"
    dist_info = f"{NAME}-{VERSION}.dist-info"
    entries = [(rel, open(full, "rb").read()) for rel, full in _package_files()]
    entries.append((f"{dist_info}/METADATA", METADATA.encode()))
    entries.append((f"{dist_info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: omw_build\nRoot-Is-Purelib: true\n"
                                          b"Tag: py3-none-any\n"))
    record = [_record_line(n, d) for n, d in entries] + [f"{dist_info}/RECORD,,"]
    with zipfile.ZipFile(os.path.join(wheel_directory, filename), "w", zipfile.ZIP_DEFLATED) as zf:
        for n, d in entries:
            zf.writestr(n, d)
        zf.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return filename
