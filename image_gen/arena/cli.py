"""`image-gen arena export|ratings`: the arena's votes as JSONL battle records, and the ratings they give.

Both read the store alone (no model is loaded), so they run anywhere the store is reachable. `ratings --json`
writes the ratings file that `image-gen leaderboard` joins to the evaluation results by contender name.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from eval.ratings import BOOTSTRAP_ROUNDS
from image_gen.arena.service import ArenaLeaderboard, flag_outliers, rate_votes
from image_gen.arena.votes import VoteLog
from image_gen.errors import ImageGenError
from storage.objects import StorageError, open_store

PROG = "image-gen arena"


def _parser() -> argparse.ArgumentParser:
    from image_gen.cli import ArgumentParser

    parser = ArgumentParser(prog=PROG, description="Export the arena's votes and compute its ratings.")
    parser.add_argument(
        "--config", metavar="FILE", help="TOML or JSON settings file (default: $IMAGE_GEN_CONFIG)"
    )
    parser.add_argument(
        "--store", help="object store: path, file://PATH or s3://BUCKET/PREFIX (default: ./data)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    export = commands.add_parser(
        "export", help="write every vote as a JSONL battle record (FastChat's fields)"
    )
    export.add_argument("-o", "--output", type=Path, metavar="FILE", help="the JSONL file (default: stdout)")
    export.add_argument(
        "--exclude-flagged", action="store_true", help="leave out the votes of voters flagged as outliers"
    )
    ratings = commands.add_parser("ratings", help="Bradley-Terry ratings with 95%% intervals and ranks")
    ratings.add_argument(
        "--json", action="store_true", help="print JSON (a ratings file for `image-gen leaderboard`)"
    )
    ratings.add_argument(
        "--include-flagged", action="store_true", help="count the votes of voters flagged as outliers"
    )
    ratings.add_argument(
        "--anchor", metavar="CONTENDER", help="pin this contender at 1000 (default: arena_anchor)"
    )
    ratings.add_argument(
        "--rounds", type=int, default=BOOTSTRAP_ROUNDS, metavar="N", help="bootstrap rounds, at least 100"
    )
    return parser


def board_json(board: ArenaLeaderboard) -> dict:
    """The leaderboard as JSON: `leaderboard` rows (contender, rating, lower, upper, rank, battles, ...), what
    they were computed from, and the voters left out."""
    return {
        "leaderboard": [asdict(row) for row in board.rows],
        "votes": board.votes,
        "excluded_votes": board.excluded_votes,
        "flagged_voters": board.flagged_voters,
        "include_flagged": board.include_flagged,
        "anchor": board.anchor,
        "rounds": board.rounds,
        "computed_at": board.computed_at,
    }


def _table(board: ArenaLeaderboard) -> str:
    header = ("RANK", "CONTENDER", "RATING", "95% CI", "BATTLES", "WIN RATE")
    rows = [
        (
            str(row.rank),
            row.contender,
            f"{row.rating:.0f}",
            f"{row.lower:.0f}..{row.upper:.0f}",
            str(row.battles),
            "-" if math.isnan(row.win_rate) else f"{row.win_rate:.0%}",
        )
        for row in board.rows
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]  # fmt: skip
    anchor = f"{board.anchor} pinned at 1000" if board.anchor else "mean 1000"
    lines.append(
        f"{board.votes} votes ({anchor}, {board.rounds} bootstrap rounds); {board.excluded_votes} votes of "
        f"{len(board.flagged_voters)} flagged voters left out"
    )
    return "\n".join(lines)


def _run(argv: list[str]) -> int:
    from image_gen.settings import load_settings

    args = _parser().parse_args(argv)
    settings = load_settings(args.config, store=args.store)
    try:
        log = VoteLog(open_store(settings.store), battle_ttl_s=settings.arena_battle_ttl_s)
    except ValueError as error:
        raise ImageGenError(str(error), param="store") from error
    votes = log.votes()
    contenders = [contender.name for contender in settings.arena_contenders]
    if args.command == "export":
        if args.exclude_flagged:
            flagged = flag_outliers(votes)
            votes = [vote for vote in votes if vote.get("judge") not in flagged]
        if args.output is None:
            count = log.export(sys.stdout, votes)
        else:
            with args.output.open("w", encoding="utf-8") as out:
                count = log.export(out, votes)
        print(f"{count} battle records", file=sys.stderr)
        return 0
    if args.rounds < 100:
        raise ImageGenError(f"--rounds {args.rounds}: use at least 100 bootstrap rounds", param="rounds")
    anchor = args.anchor or settings.arena_anchor
    known = set(contenders) | {vote["model_a"] for vote in votes} | {vote["model_b"] for vote in votes}
    if anchor is not None and anchor not in known:
        raise ImageGenError(
            f"--anchor {anchor!r} is not a contender: use one of {', '.join(sorted(known)) or '(none yet)'}",
            param="anchor",
        )
    board = rate_votes(
        votes, contenders=contenders, anchor=anchor, include_flagged=args.include_flagged, rounds=args.rounds
    )
    print(json.dumps(board_json(board), indent=2) if args.json else _table(board))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`image-gen arena ...`; errors print one line and return 2."""
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except ImageGenError as error:
        message = str(error)
    except StorageError as error:
        message = f"store: {error}"
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2
