"""
bench/install_wheels.py: the offline install of the GPU check (bench/gpu.sh), apart from the check itself.

  install   puts what this Python lacks of the stage scripts' dependencies (diffusers, Pillow, ...) into a site
            folder from a folder of wheels, offline (pip --no-index --no-deps, or unzipped where pip is missing);
            never touches what the Python has (torch, transformers, ...). Imports nothing heavy.
  wheel     writes a wheel of an installed pure-Python distribution (no network: the tests make the diffusers
            wheel that the device installs this way)

  python bench/install_wheels.py install --wheels bench/wheels --site /tmp/site
  python bench/install_wheels.py wheel diffusers --out bench/wheels
"""

import argparse
import base64
import csv
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import time
import zipfile

# -----------------------------------------------------------------------------
# install: the wheels this Python lacks

# (module to import, distribution on PyPI, required): required ones must import after the install.
WANTED = [
    ("diffusers", "diffusers", True),  # installed over an image's own diffusers of another version than requirements.txt's (VERSIONS)
    ("PIL", "pillow", True),
    ("importlib_metadata", "importlib_metadata", False),  # diffusers' dependency (imported on Python < 3.8 only)
    ("zipp", "zipp", False),
    ("lazy_importer", "lazy-importer", False),  # importlib_metadata 10's
    ("tqdm", "tqdm", True),
    # diffusers checks at import that requests is installed; transformers 5 / huggingface_hub 1+ no longer bring it
    ("requests", "requests", True), ("urllib3", "urllib3", False), ("certifi", "certifi", False),
    ("charset_normalizer", "charset-normalizer", False), ("idna", "idna", False),
    ("filelock", "filelock", True), ("regex", "regex", True),
    # the real OCR reward (rewards._OcrScorer), only where its wheels were fetched (PREPARE_OCR=1: ~160 MB a Python)
    ("rapidocr", "rapidocr", False), ("onnxruntime", "onnxruntime", False), ("cv2", "opencv-python-headless", False),
    ("shapely", "shapely", False), ("pyclipper", "pyclipper", False), ("omegaconf", "omegaconf", False),
    ("antlr4", "antlr4-python3-runtime", False), ("colorlog", "colorlog", False), ("six", "six", False),
    ("flatbuffers", "flatbuffers", False), ("google.protobuf", "protobuf", False),
    ("scipy", "scipy", False),  # the tiny world's image maths (tiny_world imports it where used)
]


VERSIONS = {"diffusers": "0.42."}  # requirements.txt's pins (diffusers==0.42.*), as version prefixes


def _norm(name):
    return name.lower().replace("-", "_").replace(".", "_")


def _importable(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _compatible_wheels(folder):
    """{normalised distribution name: [wheel paths this interpreter can install]}."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    supported = set(sys_tags())
    found = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith(".whl"):
            continue
        try:
            dist, _, _, tags = parse_wheel_filename(name)
        except Exception:
            continue
        if tags & supported:
            found.setdefault(_norm(dist), []).append(os.path.join(folder, name))
    return found


def _unzip_wheel(path, site):
    """Install a wheel without pip: a wheel is a zip of its site-packages layout (its .data/ scripts are skipped)."""
    with zipfile.ZipFile(path) as z:
        for member in z.namelist():
            if not member.split("/", 1)[0].endswith(".data"):
                z.extract(member, site)


def _wrong_version(dist):
    """True when the distribution is installed at another version than VERSIONS pins (an image's older diffusers)."""
    import importlib.metadata as md

    if dist not in VERSIONS:
        return False
    try:
        return not md.version(dist).startswith(VERSIONS[dist])
    except md.PackageNotFoundError:
        return False


def cmd_install(args):
    start = time.perf_counter()
    missing = [(m, d, req) for m, d, req in WANTED if not _importable(m) or _wrong_version(d)]
    wheels = _compatible_wheels(args.wheels)
    todo = [(m, d, req) for m, d, req in missing if _norm(d) in wheels]
    lacking = [d for m, d, req in missing if req and _norm(d) not in wheels]
    if lacking:
        have = sorted({os.path.basename(p) for ps in wheels.values() for p in ps})
        raise SystemExit(f"error: this Python ({sys.version.split()[0]}) lacks {', '.join(lacking)} and {args.wheels} has no wheel "
                         f"of it that this Python can install ({len(have)} usable wheels there). Run `bash bench/gpu.sh --prepare` "
                         f"on a machine with network (it fetches for Python {os.environ.get('PREPARE_PYTHONS', '3.10-3.13')}) and carry "
                         "bench/wheels, or install them into this Python")
    os.makedirs(args.site, exist_ok=True)
    if todo:
        dists = [d for _, d, _ in todo]
        pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True)
        if pip.returncode == 0:
            cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--disable-pip-version-check",
                   "--no-warn-script-location", "-q", "--find-links", args.wheels, "--target", args.site, *dists]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"error: {' '.join(cmd)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
            how = "pip --no-index --no-deps"
        else:
            for _, d, _ in todo:
                _unzip_wheel(wheels[_norm(d)][0], args.site)
            how = "unzipped (this Python has no pip)"
        print(f"install: {', '.join(dists)} from {args.wheels} into {args.site} ({how}, {time.perf_counter() - start:.1f} s)")
    else:
        print("install: nothing to install (this Python has every needed package)")
    skipped = [d for m, d, req in missing if not req and _norm(d) not in wheels]
    if skipped:
        print(f"install: optional, neither here nor in {args.wheels}: {', '.join(skipped)}")


# -----------------------------------------------------------------------------
# wheel: a wheel of an installed pure-Python distribution, offline


def _record_hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def wheel_from_installed(name, out_dir, compress=False):
    """Zip an installed distribution's files (those its RECORD lists inside site-packages; no bytecode, no
    console scripts: pip makes those) with a fresh RECORD into <name>-<version>-<tag>.whl. Pure-Python only."""
    import importlib.metadata as md

    dist = md.distribution(name)
    wheel_meta = dist.read_text("WHEEL") or ""
    if "Root-Is-Purelib: true" not in wheel_meta:
        raise SystemExit(f"error: {name} is not a pure-Python distribution (its WHEEL file: {wheel_meta.strip()!r})")
    tags = [line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")]
    base = dist.locate_file("")
    info_dir = next(str(f).split("/")[0] for f in dist.files if str(f).split("/")[0].endswith(".dist-info"))
    skip = {f"{info_dir}/{n}" for n in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    files = [str(f) for f in dist.files
             if not str(f).startswith("..") and "__pycache__" not in str(f) and not str(f).endswith(".pyc") and str(f) not in skip]
    version = dist.metadata["Version"]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{_norm(dist.metadata['Name'])}-{version}-{tags[0] if tags else 'py3-none-any'}.whl")
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for rel in files:
            with open(os.path.join(base, rel), "rb") as f:
                data = f.read()
            z.writestr(rel, data)
            writer.writerow([rel, _record_hash(data), len(data)])
        writer.writerow([f"{info_dir}/RECORD", "", ""])
        z.writestr(f"{info_dir}/RECORD", record.getvalue())
    return path


def cmd_wheel(args):
    print(wheel_from_installed(args.name, args.out, compress=args.compress))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="install the missing wheels into a site folder, offline")
    p.add_argument("--wheels", required=True)
    p.add_argument("--site", required=True)
    p.set_defaults(func=cmd_install)
    p = sub.add_parser("wheel", help="a wheel of an installed pure-Python distribution")
    p.add_argument("name")
    p.add_argument("--out", required=True)
    p.add_argument("--compress", action="store_true")
    p.set_defaults(func=cmd_wheel)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
