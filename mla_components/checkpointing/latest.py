"""``python -m mla_components.checkpointing.latest OUTPUT_DIR`` (used by slurm/launch.sh): print the newest resumable
epoch directory and exit 0; exit 1 when there is none, 2 on bad usage, 3 on errors (never mistaken for "none")."""

import sys


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m mla_components.checkpointing.latest OUTPUT_DIR", file=sys.stderr)
        return 2
    try:
        from mla_components.checkpointing import latest_resumable_epoch

        latest = latest_resumable_epoch(argv[0])
    except Exception as e:  # any failure must be distinguishable from "nothing to resume"
        print(f"cannot inspect {argv[0]}: {e!r}", file=sys.stderr)
        return 3
    if latest is None:
        return 1
    print(latest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
