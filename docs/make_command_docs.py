"""Write docs/commands/COMMAND.md for every ``deepatlas-fast`` command from its own ``--help``.

    python docs/make_command_docs.py          # rewrite the pages
    python docs/make_command_docs.py --check  # exit 1 when a page differs from the current --help (CI)

Each page is the command's one-line summary, an example and its ``--help`` text verbatim, so the pages
cannot drift from the parser.
"""

from __future__ import annotations

import argparse
import os
import sys

EXAMPLES = {
    "demo": "deepatlas-fast demo --out deepatlas-demo --minutes 5",
    "bench": "deepatlas-fast bench --sizes 32 64 --ops lncc jacobian_var --out bench-out",
    "ops-tour": "deepatlas-fast ops-tour --size 40",
    "info": "deepatlas-fast info",
    "train": "deepatlas-fast train --images scans/ --out runs/mine --spacing 2 --max-minutes 60\n"
             "deepatlas-fast train --phantoms 32 --out runs/phantoms",
    "evaluate": "deepatlas-fast evaluate --pred seg.nii.gz --truth truth.nii.gz --labels names.json -o metrics.json",
    "segment": "deepatlas-fast segment --model runs/mine/model.pt --reference ref.nii.gz --reference-labels ref_labels.nii.gz \\\n"
               "    -i new.nii.gz -o new_labels.nii.gz --labels names.json --png new.png",
    "finetune": "deepatlas-fast finetune --model runs/mine/model.pt --reference a.nii.gz --reference-labels a_labels.nii.gz \\\n"
                "    --reference b.nii.gz --reference-labels b_labels.nii.gz -o runs/mine/finetuned.pt",
    "register": "deepatlas-fast register --fixed fixed.nii.gz --moving moving.nii.gz --moving-labels moving_labels.nii.gz \\\n"
                "    -o moved.nii.gz",
    "atlas": "deepatlas-fast atlas --model runs/mine/model.pt --images scans/ -o atlas.nii.gz",
    "crop": "deepatlas-fast crop --model runs/mine/model.pt --reference ref.nii.gz --reference-labels ref_labels.nii.gz \\\n"
            "    --label liver --labels names.json -i new.nii.gz -o liver_crop.nii.gz",
    "locate": "deepatlas-fast locate --model runs/mine/model.pt -i new.nii.gz -o region.json",
}

HERE = os.path.dirname(os.path.abspath(__file__))


def pages() -> dict:
    """``{file name: text}`` of every command page."""
    sys.path.insert(0, os.path.dirname(HERE))
    from deepatlas_fast.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal: fix it
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {choice.dest: choice.help for choice in sub._choices_actions}
    out = {}
    for name, command in sub.choices.items():
        command.prog = f"deepatlas-fast {name}"
        example = EXAMPLES.get(name)
        text = [f"# deepatlas-fast {name}", "", f"{summaries.get(name, '')}.", ""]
        if example:
            text += ["```bash", example, "```", ""]
        text += ["```text", command.format_help().rstrip(), "```", ""]
        out[f"{name}.md"] = "\n".join(text)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    folder = os.path.join(HERE, "commands")
    stale = []
    for name, text in pages().items():
        path = os.path.join(folder, name)
        current = open(path).read() if os.path.exists(path) else None
        if args.check:
            if current != text:
                stale.append(name)
        elif current != text:
            os.makedirs(folder, exist_ok=True)
            with open(path, "w") as handle:
                handle.write(text)
    if stale:
        print(f"docs/commands out of date: {', '.join(stale)} (run python docs/make_command_docs.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
