"""Build a /v1/generate request from image paths, send it, save the winner PNG.

    python scripts/request.py t2i "a lighthouse at dusk" --out out.png
    python scripts/request.py edit "make it night" --ref ../shared/assets/edit/test.jpg --out edit.png
    python scripts/request.py ip "the toy on a beach" --ref ../shared/assets/IP/1.jpg:subject --n 4 --out ip.png
    python scripts/request.py t2i "a fox" --body-only > body.json   # then: curl -d @body.json ...

A ref is PATH or PATH:ROLE. Extra JSON fields go in --set KEY=JSON (e.g. --set steps=4). Standard library only.
"""

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def parse_ref(spec: str) -> dict:
    path, _, role = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    ref = {"image": base64.b64encode(Path(path).read_bytes()).decode()}
    if role:
        ref["role"] = role
    return ref


def build_body(args: argparse.Namespace) -> dict:
    body: dict = {"prompt": args.prompt}
    if args.ref:
        body["refs"] = [parse_ref(r) for r in args.ref]
    if args.boxes:
        body["layout_boxes"] = json.loads(args.boxes)
    if args.n is not None:
        body["n"] = args.n
    if args.seed is not None:
        body["seed"] = args.seed
    for item in args.set:
        key, _, value = item.partition("=")
        body[key] = json.loads(value)
    return body


def save_winner(response: dict, out: Path) -> str:
    out.write_bytes(base64.b64decode(response["winner"]["image"]))
    candidates = [(c["seed"], c.get("score")) for c in response.get("candidates", [])]
    winner = response["winner"]["seed"]
    return f"saved {out} (winner seed {winner}; candidates {candidates}; warnings {response.get('warnings')})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["t2i", "edit", "ip", "skeleton", "layout"])
    p.add_argument("prompt")
    p.add_argument("--ref", action="append", default=[], help="PATH or PATH:ROLE (repeatable)")
    p.add_argument("--boxes", help='layout boxes as JSON, e.g. \'[[0.1, 0.5, 0.1, 0.9]]\' (x1, x2, y1, y2)')
    p.add_argument("--n", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], help="extra field KEY=JSON (repeatable)")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--out", type=Path, default=Path("out.png"))
    p.add_argument("--body-only", action="store_true", help="print the JSON body instead of sending it")
    args = p.parse_args(argv)
    body = build_body(args)
    if args.body_only:
        json.dump(body, sys.stdout)
        return 0
    req = urllib.request.Request(f"{args.url}/v1/generate/{args.mode}", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            print(save_winner(json.load(resp), args.out))
    except urllib.error.HTTPError as err:
        print(f"HTTP {err.code}: {err.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
