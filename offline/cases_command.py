"""``guardrail cases``: the case store from the command line, read through the store protocol.

    guardrail cases replay [--file PATH]              the fallback file back into the store
    guardrail cases label ID --label VERDICT [--note TEXT]
    guardrail cases export --format jsonl|label-studio [--out FILE] [filters]
    guardrail cases import FILE                       labels from a Label Studio export

Every subcommand takes ``--config FILE`` (the proxy's own config: its ``store.url`` and
``store.fallback_path`` are the defaults) and ``--store URL`` (overrides the config's).
Filters: ``--since``/``--until`` (ISO 8601 date or time, UTC unless it says otherwise, or
seconds since the epoch), ``--actions a,b``, ``--labels confirmed,none`` (``none`` keeps
unreviewed cases), ``--model NAME``.

Exit status: 0 when everything was done; 1 when some of it was not (unreadable lines or rows,
unknown case ids, tasks without a usable label: each is counted and named); 2 when the command
could not start (a bad config, a store that does not answer, an unreadable input file).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import getpass
import json
import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, get_args

from guardrail.cases import CaseStore, build_store
from guardrail.cases.base import CaseQuery
from guardrail.cases.model import Action, ReviewLabel, ReviewVerdict
from guardrail.cases.recorder import UnreadableLine, iter_fallback
from guardrail.cases.scan import CaseScan
from guardrail.config import StoreConfig, load_config
from guardrail.errors import ConfigError, StoreError
from offline.label_studio import TaskLabel, read_labels, to_task

PROG = "guardrail cases"
ACTIONS: tuple[str, ...] = get_args(Action)
VERDICTS: tuple[str, ...] = get_args(ReviewVerdict)
UNREVIEWED = ("none", "unreviewed")


class CommandError(Exception):
    """Ends the command with a one-line message and exit status 2."""


# -- arguments --------------------------------------------------------------------------------


def _when(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither an ISO 8601 date/time nor seconds since the epoch") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def _actions(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in ACTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown action(s) {', '.join(unknown) or '(none given)'}; known: "
            f"{', '.join(ACTIONS)}")
    return names


def _labels(value: str) -> tuple[str | None, ...]:
    labels: list[str | None] = []
    for name in (part.strip() for part in value.split(",")):
        if name in UNREVIEWED:
            labels.append(None)
        elif name in VERDICTS:
            labels.append(name)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown label {name!r}; known: {', '.join(VERDICTS)}, none (unreviewed)")
    return tuple(labels)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="the proxy's YAML config (its store is the default)")
    parser.add_argument("--store", metavar="URL",
                        help="sqlite:///PATH or postgresql://... (default: the config's)")


def add_cases_parser(commands: Any) -> None:
    """Adds ``cases`` to the ``guardrail`` command's subcommands."""
    parser = commands.add_parser(
        "cases", help="replay, label, export and import case records",
        description="The case store from the command line: replay the fallback file, label "
                    "cases, export them (JSON lines or Label Studio tasks) and import labels.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    replay = verbs.add_parser(
        "replay", help="store the cases kept in the fallback file (never downgrading)",
        description="Store every case of the fallback file (store.fallback_path). A case the "
                    "store already holds complete is not replaced by an older, in-progress "
                    "copy; replaying twice changes nothing.")
    _common(replay)
    replay.add_argument("--file", help="the fallback file (default: the config's)")
    replay.set_defaults(handler=run_replay)

    label = verbs.add_parser("label", help="set a case's review label",
                             description="Store a review label with a case; the author is "
                                         "cli:<your user name>.")
    _common(label)
    label.add_argument("case_id", metavar="ID")
    label.add_argument("--label", required=True, choices=VERDICTS)
    label.add_argument("--note", help="why (optional)")
    label.set_defaults(handler=run_label)

    export = verbs.add_parser(
        "export", help="write cases as JSON lines or Label Studio tasks",
        description="Write the cases that match the filters, oldest first: full case records "
                    "as JSON lines, or Label Studio tasks (labelled cases carry their label "
                    "as an annotation).")
    _common(export)
    export.add_argument("--format", required=True, choices=("jsonl", "label-studio"))
    export.add_argument("--out", metavar="FILE", help="write here (default: stdout)")
    export.add_argument("--since", type=_when, help="created at or after (ISO 8601 or epoch)")
    export.add_argument("--until", type=_when, help="created before (ISO 8601 or epoch)")
    export.add_argument("--actions", type=_actions, default=(),
                        help=f"comma-separated, of {', '.join(ACTIONS)}")
    export.add_argument("--labels", type=_labels, default=(),
                        help="comma-separated, of confirmed, false_positive, bad_correction, "
                             "none (unreviewed)")
    export.add_argument("--model", help="only cases of this model")
    export.add_argument("--label-config", metavar="FILE",
                        help="also write the Label Studio labelling interface for the tasks")
    export.set_defaults(handler=run_export)

    imported = verbs.add_parser(
        "import", help="store the labels of a Label Studio export",
        description="Read a Label Studio export (JSON, or JSON-MIN) of tasks made by 'export "
                    "--format label-studio' and store each task's latest label with its case.")
    _common(imported)
    imported.add_argument("file", metavar="FILE")
    imported.set_defaults(handler=run_import)


# -- running ----------------------------------------------------------------------------------


def _say(message: str, stream: IO[str] | None = None) -> None:
    print(f"{PROG}: {message}", file=stream or sys.stdout, flush=True)


def _fail(message: str) -> int:
    _say(" ".join(message.split()), sys.stderr)
    return 2


def _store_config(args: argparse.Namespace) -> StoreConfig:
    config = load_config(args.config).store
    if args.store:
        config = config.model_copy(update={"url": args.store})
    return config


@contextlib.asynccontextmanager
async def _opened(config: StoreConfig, *, must_exist: bool) -> AsyncIterator[CaseStore]:
    """The store, opened; with ``must_exist`` a SQLite file that is not there is an error
    rather than a new, empty database left behind by a command that only reads."""
    if must_exist and config.url.startswith("sqlite"):
        from guardrail.cases.sqlite_store import sqlite_path

        path = sqlite_path(config.url)
        if path != ":memory:" and not await asyncio.to_thread(Path(path).exists):
            raise CommandError(f"no case store at {path} (store.url {config.url})")
    store = build_store(config)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()


def _run(args: argparse.Namespace, work: Callable[[StoreConfig], Coroutine[Any, Any, int]]
         ) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = _store_config(args)
        return asyncio.run(work(config))
    except ConfigError as error:
        return _fail(f"config error: {error}")
    except (StoreError, CommandError) as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        return _fail("interrupted")


def _skips(scan: CaseScan) -> str:
    if not scan.skipped:
        return ""
    shown = ", ".join(problem.case_id for problem in scan.problems[:5])
    more = "…" if scan.skipped > 5 else ""
    return f", {scan.skipped} unreadable record(s) skipped ({shown}{more})"


# -- replay -----------------------------------------------------------------------------------


def run_replay(args: argparse.Namespace) -> int:
    async def work(config: StoreConfig) -> int:
        path = Path(args.file or config.fallback_path)
        if not await asyncio.to_thread(path.exists):
            _say(f"no fallback file at {path}: nothing to replay")
            return 0
        replayed = older = unreadable = 0
        async with _opened(config, must_exist=False) as store:
            try:
                for entry in iter_fallback(path):
                    if isinstance(entry, UnreadableLine):
                        unreadable += 1
                        _say(f"{path} line {entry.number} is not a case, skipped: "
                             f"{entry.problem}", sys.stderr)
                    elif await store.put_unless_complete(entry):
                        replayed += 1
                    else:
                        older += 1
            except OSError as error:
                raise CommandError(f"{path}: cannot read ({error.strerror})") from error
        _say(f"{replayed} replayed, {older} skipped as older than the stored record, "
             f"{unreadable} unreadable line(s) (from {path})")
        return 1 if unreadable else 0

    return _run(args, work)


# -- label ------------------------------------------------------------------------------------


def cli_user() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no user name in the environment or the password database
        return "cli:unknown"


def run_label(args: argparse.Namespace) -> int:
    async def work(config: StoreConfig) -> int:
        review = ReviewLabel(label=args.label, by=cli_user(), note=args.note or None)
        async with _opened(config, must_exist=True) as store:
            case = await store.set_review(args.case_id, review)
        if case is None:
            _say(f"no case with id {args.case_id!r}", sys.stderr)
            return 1
        _say(f"{args.case_id} labelled {review.label} by {review.by}")
        return 0

    return _run(args, work)


# -- export -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _output(out: str | None) -> Iterator[IO[str]]:
    """stdout, or a temporary file beside ``out`` renamed onto it only once the export is
    whole: a failed export never leaves a partial file that looks complete."""
    if out is None:
        yield sys.stdout
        return
    target = Path(out)
    try:
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed or removed below
            "w", encoding="utf-8", dir=target.parent, prefix=f".{target.name}.", delete=False)
    except OSError as error:
        raise CommandError(f"{out}: cannot write ({error.strerror})") from error
    try:
        with handle:
            yield handle
        os.replace(handle.name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise


def run_export(args: argparse.Namespace) -> int:
    query = CaseQuery(since=args.since, until=args.until, actions=args.actions,
                      model=args.model, labels=args.labels)

    async def work(config: StoreConfig) -> int:
        async with _opened(config, must_exist=True) as store:
            scan = store.scan(query)
            try:
                with _output(args.out) as out:
                    if args.format == "jsonl":
                        async for case in scan:
                            out.write(case.model_dump_json() + "\n")
                    else:
                        # Streamed as one JSON array, a task at a time: memory stays flat.
                        out.write("[")
                        async for case in scan:
                            out.write(",\n" if scan.read > 1 else "\n")
                            out.write(json.dumps(to_task(case), ensure_ascii=False))
                        out.write("\n]\n")
            except OSError as error:
                raise CommandError(f"{args.out or 'stdout'}: cannot write "
                                   f"({error.strerror})") from error
        if args.label_config:
            from offline.label_studio import LABEL_CONFIG

            try:
                await asyncio.to_thread(Path(args.label_config).write_text, LABEL_CONFIG,
                                        encoding="utf-8")
            except OSError as error:
                raise CommandError(f"{args.label_config}: cannot write "
                                   f"({error.strerror})") from error
        _say(f"{scan.read} case(s) exported{_skips(scan)}"
             + (f" to {args.out}" if args.out else ""), sys.stderr)
        return 1 if scan.skipped else 0

    return _run(args, work)


# -- import -----------------------------------------------------------------------------------


def _load_json(path: str) -> Any:
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except OSError as error:
        raise CommandError(f"{path}: cannot read ({error.strerror})") from error
    except (ValueError, RecursionError) as error:
        raise CommandError(f"{path}: not a JSON export of Label Studio tasks "
                           f"({' '.join(str(error).split())[:200]})") from error


def run_import(args: argparse.Namespace) -> int:
    async def work(config: StoreConfig) -> int:
        document = await asyncio.to_thread(_load_json, args.file)
        labelled = unchanged = unlabelled = unknown = bad = 0
        async with _opened(config, must_exist=True) as store:
            for entry in read_labels(document):
                if not isinstance(entry, TaskLabel):
                    if entry.unlabelled:
                        unlabelled += 1
                        continue
                    bad += 1
                    where = f"task {entry.index}" + (f" ({entry.case_id})"
                                                     if entry.case_id else "")
                    _say(f"{args.file}: {where}: {entry.problem}", sys.stderr)
                    continue
                try:
                    current = await store.get(entry.case_id)
                except StoreError as error:
                    bad += 1
                    _say(str(error), sys.stderr)
                    continue
                if current is None:
                    unknown += 1
                    _say(f"{args.file}: no case with id {entry.case_id!r} in the store",
                         sys.stderr)
                    continue
                stored = current.review
                if (stored is not None and stored.label == entry.review.label
                        and stored.note == entry.review.note):
                    # A round trip with no change keeps who labelled it first, and when.
                    unchanged += 1
                    continue
                await store.set_review(entry.case_id, entry.review)
                labelled += 1
        _say(f"{labelled} labelled, {unchanged} unchanged, {unlabelled} task(s) without a "
             f"label yet, {unknown} unknown case id(s), {bad} bad task(s) (from {args.file})")
        return 1 if unknown or bad else 0

    return _run(args, work)


# -- standalone -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m offline.cases_command VERB ...``: the same command without the
    ``guardrail`` frame (its entry point is what ``guardrail cases`` runs)."""
    parser = argparse.ArgumentParser(prog="guardrail")
    add_cases_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cases", *(sys.argv[1:] if argv is None else argv)])
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
