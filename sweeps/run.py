"""Launch (or resume, or join) a sweep: `python -m sweeps.run sweeps/scoring_rule.yaml [key=value ...]`.

    python -m sweeps.run sweeps/block_length.yaml n_workers=2          # two worker processes
    python -m sweeps.run sweeps/lr_search.yaml storage=postgresql://...  # any SQLAlchemy RDB URL
    python -m sweeps.run sweeps/scoring_rule.yaml --validate            # check the file, run nothing

Relaunching the same command resumes the study: finished trials are not rerun. Every `key=value` overrides a
field of the sweep file (`n_trials=8`, `objective.metric=eval/cloze/acc`, `overrides=[model=small]`, ...).
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

SWEEPS = Path(__file__).resolve().parent


def shipped_sweeps(folder: Path = SWEEPS) -> list[tuple[str, str]]:
    """(path, one-line description) of every sweep file shipped in `sweeps/`: the first sentence of the comment
    that opens the file (each file says what it ablates there, so this list cannot go stale)."""
    out = []
    for path in sorted(folder.glob("*.yaml")):
        comment = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        text = " ".join(comment)
        # the first sentence: up to a full stop before a word, not the one of "Fig. 1", "Eq. 2", "et al."
        first = re.split(r"(?<!Fig|.Eq| al)\.\s+(?=[A-Za-z])", text, maxsplit=1)[0].rstrip(".") or "(no description)"
        out.append((f"sweeps/{path.name}", first))
    return out


def epilog() -> str:
    rows = shipped_sweeps()
    width = max(len(p) for p, _ in rows) + 2
    lines = ["shipped sweeps (the comment at the top of each file says more):"]
    for path, text in rows:
        wrapped = textwrap.wrap(text, 110 - width - 2) or [""]
        lines.append(f"  {path:<{width}}{wrapped[0]}")
        lines += [f"  {'':<{width}}{more}" for more in wrapped[1:]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps.run", description=__doc__.split("\n\n")[0],
                                     epilog=epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="sweep YAML file (sweeps/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the sweep file")
    parser.add_argument("--validate", action="store_true", help="check the sweep and exit without running trials")
    parser.add_argument("--max-trials", type=int, default=None, help="run at most this many trials per worker now")
    args = parser.parse_intermixed_args(argv)  # flags may come after key=value overrides
    # Imported after parsing, so `--help` and a bad flag are answered at once.
    from illada_lightning.config import ConfigError
    from illada_lightning.logs import configure_logging
    from illada_lightning.redact import mask_password
    from illada_lightning.sweeps import SweepError, load_sweep_spec, run_sweep, validate_sweep
    from illada_lightning.sweeps.multirun import result_text
    from illada_lightning.sweeps.runner import WorkerInterrupted, resolve_trial_fn

    configure_logging()
    try:
        spec = load_sweep_spec(args.spec, args.overrides)
        if args.validate:
            validate_sweep(spec, getattr(resolve_trial_fn(spec, None), "declared_metrics", None))
            print(f"sweep {spec.name!r} is valid: {len(spec.space)} keys, mode {spec.mode}, "
                  f"storage {mask_password(spec.resolved_storage)}")
            return 0
        result = run_sweep(spec, max_trials=args.max_trials)
    except (ConfigError, SweepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WorkerInterrupted as exc:  # a stop signal: the trial was checkpointed and recorded FAIL; rerun resumes
        print(f"error: {exc}; the sweep stopped (relaunch the same command to continue)", file=sys.stderr)
        return exc.exit_code
    print(result_text(result, spec))
    return 0 if result.n_pending == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
