"""``deepatlas-fast info``: versions, the compiled extension and the backend of each op."""

from __future__ import annotations

import json


def run(args) -> int:
    from .. import build_info

    print(json.dumps(build_info(), indent=2))
    return 0


def add_parser(sub) -> None:
    info = sub.add_parser("info", help="print versions, the compiled extension and the backend of each op")
    info.set_defaults(run=run)
