"""``hierarcaps-finetune``: align a CLIP-style model to caption hierarchies (RE, EC or RCME).

Examples::

    hierarcaps-finetune --data out/build --output runs/re-b32     # a build's --output-dir
    hierarcaps-finetune --config paper_re.toml --set optim.lr=2e-7 --set run.mixed_precision=bf16
    hierarcaps-finetune --data train.csv --set loss.name=rcme --set data.images_dir=imgs/ \\
        --set model.backend=open-clip --set model.name_or_path=hf-hub:imageomics/bioclip
    accelerate launch -m finetune.cli --config run.toml      # several GPUs

Settings: defaults, then ``--config`` (TOML or YAML), then ``--data``/``--model``/``--output``/
``--resume`` shortcuts, then every ``--set KEY=VALUE`` (see ``finetune.config`` for the keys).
Prints the output folder and the final loss; exits 2 on a settings or data error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from finetune.backends import BackendError
from finetune.config import SettingsError, load_settings
from finetune.data import TrainDataError, plumbing_check_warning
from finetune.train import TrainError, read_log, train
from hierarcaps.models import quiet_library_progress


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hierarcaps-finetune",
        description="Fine-tune a CLIP-style model on HierarCaps-style caption hierarchies (RE / EC / RCME).",
    )
    parser.add_argument("--config", type=Path, help="settings file (.toml, .yaml)")
    parser.add_argument("--data", help="data.source: build output folder, dataset folder, release CSV or Hub dataset id")
    parser.add_argument("--model", help="model.name_or_path: hub id, folder or open_clip name")
    parser.add_argument("--backend", choices=("hf-clip", "open-clip", "text"), help="model.backend")
    parser.add_argument("--output", help="run.output_dir")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set optim.lr=1e-7 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_progress()
    shortcuts = {
        "data.source": args.data, "model.name_or_path": args.model, "model.backend": args.backend,
        "run.output_dir": args.output, "run.resume": "true" if args.resume else None,
    }
    overrides = [f"{k}={v}" for k, v in shortcuts.items() if v is not None] + list(args.overrides)
    try:
        settings = load_settings(args.config, overrides)
        warning = plumbing_check_warning(settings.data.source)
        if warning:
            print(f"hierarcaps-finetune: warning: {warning}", file=sys.stderr)
        result = train(settings, progress=not args.no_progress)
    except (SettingsError, TrainDataError, TrainError, BackendError) as err:
        print(f"hierarcaps-finetune: error: {err}", file=sys.stderr)
        return 2
    log = read_log(result.log_path)
    final = f"{log[-1]['loss/total']:.6f}" if log else "n/a"
    steps = f"{result.steps} step{'' if result.steps == 1 else 's'}"
    counts = json.loads(result.run_json.read_text(encoding="utf-8"))["counts"]
    if counts.get("skipped_items_without_image"):
        reasons = ", ".join(f"{reason} {n}" for reason, n in counts["skipped_by_reason"].items())
        print(f"skipped {counts['skipped_items_without_image']} items whose image was not fetched ({reasons}); "
              f"trained on {counts['items']}")
    print(f"trained {steps}; final loss {final}; model in {result.final_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
