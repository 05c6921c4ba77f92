#!/usr/bin/env bash
# Build a wheelhouse for a node without internet: hidream-serve[serve] (ray[serve]==2.60.0 pinned in pyproject)
# plus every dependency the target environment lacks, for another Python/platform than this one.
#
#   scripts/offline-bundle.sh --have target-freeze.txt [--python 3.12] [--platform manylinux2014_x86_64] [-o DIR]
#
# --have: `python -m pip freeze` (or `pip list --format=freeze`) of the target env. Its versions are used as
# constraints, so pip resolves against what is already there; a pinned package that a direct requirement of the
# project rejects (e.g. transformers 5.17 < 5.24) is dropped from the constraints and bundled. Wheels of packages the
# target already has at the resolved version are removed. torch is never bundled (the node has its CUDA build).
# Ray's wheel is repacked without parts Serve never loads (STRIP below; see docs/offline-install.md).
# On the node: pip install --no-index --find-links DIR "hidream-serve[serve]"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
HAVE="" PYVER=3.12 PLATFORM="manylinux_2_28_x86_64 manylinux2014_x86_64" OUT=dist/offline
while [ $# -gt 0 ]; do
  case "$1" in
    --have) HAVE=$2; shift 2 ;;
    --python) PYVER=$2; shift 2 ;;
    --platform) PLATFORM=$2; shift 2 ;;
    -o|--out) OUT=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
# Parts of the ray wheel that Ray Serve does not load: the Java worker jar (31 MiB compressed, only for Java
# workers), RLlib, and the dashboard's prebuilt web UI (the dashboard API still runs; Serve does not need the UI).
STRIP=${STRIP:-"ray/jars/ ray/rllib/ ray/dashboard/client/build/"}
ABI="cp${PYVER/./}"
rm -rf "$OUT" && mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# 1. the project itself
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" .

# 2. constraints from the target env, minus pins a direct requirement rejects; requirements minus torch
"$PY" - "$HAVE" "$WORK" <<'PYEOF'
import sys, tomllib, pathlib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
have_path, work = sys.argv[1], pathlib.Path(sys.argv[2])
proj = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
reqs = [Requirement(r) for r in proj["dependencies"] + proj["optional-dependencies"]["serve"]]
reqs = [r for r in reqs if canonicalize_name(r.name) != "torch"]
have = {}
if have_path:
    for line in pathlib.Path(have_path).read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, ver = line.split("==", 1)
            have[canonicalize_name(name.split("[")[0].strip())] = ver.strip()
by_name = {canonicalize_name(r.name): r for r in reqs}
cons = []
for name, ver in have.items():
    r = by_name.get(name)
    if r is not None and not r.specifier.contains(ver, prereleases=True):
        print(f"target has {name}=={ver}, project needs {r.specifier}: bundled")
        continue
    cons.append(f"{name}=={ver}")
(work / "constraints.txt").write_text("\n".join(cons) + "\n")
(work / "requirements.txt").write_text("\n".join(str(r) for r in reqs) + "\n")
(work / "have.txt").write_text("\n".join(f"{n}=={v}" for n, v in have.items()) + "\n")
PYEOF

# 3. download wheels for the target (binary only: the node may have no compiler)
"$PY" -m pip download -q --only-binary=:all: $(printf -- "--platform %s " $PLATFORM) --python-version "$PYVER" \
  --implementation cp --abi "$ABI" -c "$WORK/constraints.txt" -r "$WORK/requirements.txt" -d "$WORK/dl"

# 4. keep what the target lacks (torch is already excluded); repack ray without STRIP
"$PY" - "$WORK" "$OUT" "$STRIP" <<'PYEOF'
import sys, pathlib, zipfile, hashlib, base64, shutil
from packaging.utils import parse_wheel_filename
work, out, strip = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3].split()
have = set(l.strip() for l in (work / "have.txt").read_text().splitlines() if l.strip())
for whl in sorted((work / "dl").glob("*.whl")):
    name, ver, _, _ = parse_wheel_filename(whl.name)
    if f"{name}=={ver}" in have:
        continue
    if name != "ray":
        shutil.copy(whl, out / whl.name)
        continue
    src, dst = zipfile.ZipFile(whl), zipfile.ZipFile(out / whl.name, "w", zipfile.ZIP_DEFLATED)
    record, removed = [], 0
    for info in src.infolist():
        if any(info.filename.startswith(p) for p in strip):
            removed += info.compress_size
            continue
        if info.filename.endswith(".dist-info/RECORD"):
            record_name = info.filename
            continue
        data = src.read(info)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{info.filename},sha256={digest},{len(data)}")
        dst.writestr(info, data)
    record.append(f"{record_name},,")
    dst.writestr(record_name, "\n".join(record) + "\n")
    dst.close()
    print(f"ray: removed {removed / 2**20:.1f} MiB compressed ({' '.join(strip)})")
PYEOF
ls -1 "$OUT"
du -sh "$OUT"
echo "install on the node: pip install --no-index --find-links $OUT 'hidream-serve[serve]'"
