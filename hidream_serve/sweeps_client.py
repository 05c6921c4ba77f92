"""`hidream-serve sweep FILE.yaml --out DIR`: run a sweep from a YAML spec against a server and write its contact
sheet, table and images (docs/sweeps.md).

The YAML is the body of `POST /v1/sweeps` (`base`, `axes`, `n`, `max_cells`), except that a ref may name a file
(`{path: face.jpg, role: face}`, resolved relative to the YAML file) instead of carrying base64 `image`.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

from .client import (
    EXIT_INTERRUPTED,
    EXIT_JOB_ENDED_BADLY,
    EXIT_OK,
    ClientError,
    JobsClient,
    _run,
    _server_arg,
    parse_set,
)  # fmt: skip


def load_spec(path: Path, sets: list[str] = (), n: int | None = None) -> dict:
    """The sweep body of a YAML file: ref paths read (relative to the file) as base64; `sets` (KEY=VALUE, the
    value JSON where it parses) override fields of `base`; `n` overrides the seeds per cell."""
    import yaml

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ClientError(f"cannot read {path}: {e.strerror or e}", field="FILE") from None
    except yaml.YAMLError as e:
        raise ClientError(f"{path} is not valid YAML: {e}", field="FILE") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("base"), dict):
        raise ClientError(f"{path}: expected a mapping with a `base` request (and `axes`, `n`)", field="base")
    base = spec["base"]
    for i, ref in enumerate(base.get("refs") or []):
        if isinstance(ref, dict) and "path" in ref:
            file = (path.parent / ref.pop("path")).resolve()
            try:
                ref["image"] = base64.b64encode(file.read_bytes()).decode()
            except OSError as e:
                raise ClientError(f"cannot read {file}: {e.strerror or e}", field=f"base.refs[{i}].path") from None
    for item in sets:
        key, value = parse_set(item)
        base[key] = value
    if n is not None:
        spec["n"] = n
    return spec


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run a sweep (YAML spec) on a server; write its contact sheet, table, images")
    p.add_argument("file", type=Path, metavar="FILE.yaml", help="base request, axes and n (docs/sweeps.md)")
    p.add_argument("--out", required=True, type=Path, help="directory for contact-sheet.png, table.csv, "
                   "table.json, result.json and cells/<cell>/<seed>.png")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the base request; VALUE is JSON, or a string (repeat)")  # fmt: skip
    p.add_argument("--n", type=int, help="seeds per cell (overrides the file's n)")
    _server_arg(p)
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    def sweep() -> int:
        body = load_spec(args.file, args.set, args.n)
        client = JobsClient(args.server)
        try:
            created = client.submit_sweep(body)
            print(f"sweep {created['id']} {created['status']}", flush=True)
            return follow_and_save(client, created["id"], args.out)
        finally:
            client.close()

    return _run(sweep)


def _labels(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "the base"


def follow_and_save(client: JobsClient, job_id: str, out: Path) -> int:
    """A line per cell as it finishes; then the sheet, the tables, result.json and every image under `out`."""
    try:
        for event in client.follow(job_id):
            if event.kind == "started":
                print(f"started: {event.data['cells']} cells x {event.data['seeds']} seeds", flush=True)
            elif event.kind == "cell":
                print(f"cell {event.data['cell']} done ({_labels(event.data['values'])}): winner seed "
                      f"{event.data['winner']}", flush=True)  # fmt: skip
    except KeyboardInterrupt:
        print(f"\nstopped following; the sweep goes on (hidream-serve cancel {job_id})", file=sys.stderr)
        return EXIT_INTERRUPTED
    job = client.get(job_id)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(job, indent=2) + "\n")
    if job["status"] != "succeeded":
        err = job.get("error") or {}
        where = f"{err['field']}: " if err.get("field") else ""
        print(f"error: sweep {job_id} {job['status']}: {where}{err.get('message', '')}", file=sys.stderr)
        return EXIT_JOB_ENDED_BADLY
    result = job["result"]
    for name, url in (("contact-sheet.png", result["files"]["contact_sheet"]),
                      ("table.csv", result["files"]["table_csv"]), ("table.json", result["files"]["table_json"])):  # fmt: skip
        (out / name).write_bytes(client.download(url))
    images = 0
    for cell in result["cells"]:
        folder = out / "cells" / str(cell["cell"])
        folder.mkdir(parents=True, exist_ok=True)
        for c in cell["candidates"]:
            (folder / f"{c['seed']}.png").write_bytes(client.download(c["url"]))
            images += 1
    top = result["cells"][result["ranking"][0]]
    print(f"best cell {top['cell']} ({_labels(top['labels'])}): mean {top['mean']}, best {top['best']} (seed "
          f"{top['best_seed']}); wrote contact-sheet.png, table.csv, table.json, result.json and {images} images "
          f"to {out}")  # fmt: skip
    for w in result.get("warnings") or []:
        print(f"warning: {w}", file=sys.stderr)
    return EXIT_OK
