"""Launch (or resume, or join) a sweep: `python -m sweeps.run sweeps/scoring_rule.yaml [key=value ...]`.

    python -m sweeps.run sweeps/block_length.yaml n_workers=2          # two worker processes
    python -m sweeps.run sweeps/lr_search.yaml storage=postgresql://...  # any SQLAlchemy RDB URL
    python -m sweeps.run sweeps/scoring_rule.yaml --validate            # check the file, run nothing

Relaunching the same command resumes the study: finished trials are not rerun. Every `key=value` overrides a
field of the sweep file (`n_trials=8`, `objective.metric=eval/cloze/acc`, `overrides=[model=small]`, ...).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps.run", description=__doc__.split("\n\n")[0])
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
    from illada_lightning.sweeps.multirun import format_result
    from illada_lightning.sweeps.runner import resolve_trial_fn

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
    print(format_result(result))
    return 0 if result.n_pending == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
