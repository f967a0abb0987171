"""`tagger taxonomy ...`: commands merchandisers and operators run on the taxonomies.

- ``validate``: check the files; every error names file, line and key.
- ``diff``: what changed since the version last applied (or ``--from DIR``), and how many products each change
  affects.
- ``apply``: record the new versions and re-tag only what changed, from the stored embeddings
  (``--watch``: apply each time the files change; invalid files are reported, not applied).
- ``history``: stored versions, which one is applied, and the log of applies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tagger.settings import Settings, get_settings
from tagger.taxonomy.diff import DROP, NONE, REDECIDE, RESCORE, TaxonomyDiff, affected_products, diff_taxonomies
from tagger.taxonomy.loader import validate_taxonomies
from tagger.taxonomy.model import TaxonomySet

EFFECT_TEXT = {RESCORE: "re-score", REDECIDE: "statuses only", DROP: "delete machine tags", NONE: "display only"}
SIGN = {"attribute_added": "+", "label_added": "+", "attribute_removed": "-", "label_removed": "-"}


def _directory(args: argparse.Namespace) -> Path:
    return Path(args.dir) if getattr(args, "dir", None) else get_settings().taxonomy_dir


def _print_errors(errors: Sequence[object], directory: Path) -> None:
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"{len(errors)} problem(s) found in {directory}; nothing was applied", file=sys.stderr)


def _resolved() -> Settings:
    from tagger import services

    return services.resolve(get_settings())


def cmd_validate(args: argparse.Namespace) -> int:
    directory = _directory(args)
    taxonomies, errors = validate_taxonomies(directory)
    if errors:
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        print(f"{len(errors)} problem(s) found in {directory}", file=sys.stderr)
        return 1
    assert taxonomies is not None
    for taxonomy in taxonomies.taxonomies:
        labels = sum(len(a.labels) for a in taxonomy.attributes)
        print(f"ok  {taxonomy.name:<12} version {taxonomy.version}  {len(taxonomy.attributes)} attribute(s), "
              f"{labels} label(s)  ({taxonomy.source})")
    return 0


# ---- diff ---------------------------------------------------------------------------------------------------------


def format_diff(diff: TaxonomyDiff, counts: tuple[dict[str, int], dict[tuple[str, str], int], int] | None,
                base_note: str = "") -> str:
    """The human-readable diff: one line per change with its effect and, with ``counts``, products affected."""
    if diff.empty:
        return f"no changes{base_note}"
    lines: list[str] = []
    names = sorted(set(diff.old_versions) | set(diff.new_versions))
    for name in names:
        before, after = diff.old_versions.get(name, "(none)"), diff.new_versions.get(name, "(removed)")
        changes = [c for c in diff.changes if c.taxonomy == name]
        if before == after and not changes:
            continue
        lines.append(f"taxonomy {name}: {before} -> {after}{base_note}")
        for change in changes:
            sign = SIGN.get(change.kind, "~")
            line = f"  {sign} {change.where:<28} {change.describe():<52} [{EFFECT_TEXT[change.effect]}]"
            if counts is not None:
                n = affected_products(change, *counts)
                line += f"  {n:,} product(s)"
            lines.append(line.rstrip())
    for attribute, cause in diff.dependants.items():
        line = f"  ~ {attribute:<28} {'re-scored because its applies_to uses ' + cause:<52} [re-score]"
        if counts is not None:
            line += f"  {counts[2]:,} product(s)"
        lines.append(line)
    plan = []
    if diff.rescore:
        plan.append(f"re-score {', '.join(diff.rescore)} from stored embeddings")
    if diff.redecide:
        plan.append(f"re-evaluate statuses of {', '.join(diff.redecide)} from stored scores")
    if diff.drop:
        plan.append(f"delete machine tags of {', '.join(diff.drop)}")
    lines.append("plan: " + ("; ".join(plan) if plan else "record the new version(s); no tag changes"))
    return "\n".join(lines)


def _counts(settings: Settings, diff: TaxonomyDiff) -> tuple[dict[str, int], dict[tuple[str, str], int], int]:
    from tagger.db import repository as repo
    from tagger.db.engine import get_engine

    assert settings.database_url
    attributes = sorted({c.attribute for c in diff.changes} | set(diff.dependants))
    with get_engine(settings.database_url).connect() as conn:
        per_attribute, per_value = repo.tag_counts(conn, attributes)
        embeddings = repo.embedding_count(conn)
    return per_attribute, per_value, embeddings


def cmd_diff(args: argparse.Namespace) -> int:
    directory = _directory(args)
    new, errors = validate_taxonomies(directory)
    if errors or new is None:
        _print_errors(errors, directory)
        return 1
    settings: Settings | None = None
    note = ""
    if args.from_dir:
        old, old_errors = validate_taxonomies(Path(args.from_dir))
        if old_errors or old is None:
            _print_errors(old_errors, Path(args.from_dir))
            return 1
        diff = diff_taxonomies(old, new)
    else:
        from tagger import retag
        from tagger.db.engine import get_engine

        settings = _resolved()
        assert settings.database_url
        diff, base = retag.plan(get_engine(settings.database_url), new)
        note = {"applied": " (applied version)", "tagged": " (version the stored tags carry; never applied)",
                "none": " (nothing applied yet)"}[base.source]
        note = f"  {note.strip()}" if not diff.empty else note
    counts = None
    if not args.no_counts and not diff.empty:
        settings = settings or _resolved()
        counts = _counts(settings, diff)
    if args.json:
        payload: dict[str, Any] = diff.to_json()
        if counts is not None:
            for item, change in zip(payload["changes"], diff.changes, strict=True):
                item["products"] = affected_products(change, *counts)
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        print(format_diff(diff, counts, note))
    return 0


# ---- apply ---------------------------------------------------------------------------------------------------------


def apply_directory(settings: Settings, taxonomies: TaxonomySet, *, progress: bool, chunk_size: int) -> Any:
    from tagger import retag
    from tagger.db.engine import get_engine
    from tagger.encoders.base import get_encoder

    assert settings.database_url
    return retag.apply_taxonomies(get_engine(settings.database_url), taxonomies,
                                  encoder=get_encoder(settings.model, settings.device), settings=settings,
                                  chunk_size=chunk_size, progress=progress)


def directory_stamp(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """What identifies the state of the taxonomy files: name, modification time and size of each."""
    if not directory.is_dir():
        return ()
    files = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
    stamp = []
    for path in files:
        try:
            st = path.stat()
        except FileNotFoundError:  # removed while we looked
            continue
        stamp.append((path.name, st.st_mtime_ns, st.st_size))
    return tuple(stamp)


def watch(directory: Path, apply_once: Callable[[TaxonomySet], object], *, interval_s: float = 2.0,
          debounce_s: float = 1.0, stop: Callable[[], bool] = lambda: False,
          report: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> None:
    """Apply now, then each time the files change and have stayed unchanged for ``debounce_s`` (an editor's
    several writes, or a ``git pull`` touching several files, give one apply). Invalid files are reported and
    not applied; the previous version stays live until they are fixed."""
    seen = directory_stamp(directory)
    pending_since: float | None = clock() - debounce_s
    while not stop():
        current = directory_stamp(directory)
        if current != seen:
            seen = current
            pending_since = clock()
        if pending_since is not None and clock() - pending_since >= debounce_s:
            pending_since = None
            taxonomies, errors = validate_taxonomies(directory)
            if errors or taxonomies is None:
                for error in errors:
                    report(f"error: {error}")
                report(f"{len(errors)} problem(s) in {directory}: not applied; fix the file(s) and save again")
            else:
                try:
                    result = apply_once(taxonomies)
                    report(getattr(result, "summary", lambda: str(result))())
                except Exception as exc:  # noqa: BLE001 - keep watching; the next edit (or save) retries
                    report(f"apply failed: {type(exc).__name__}: {exc}; will retry on the next change")
        sleep(interval_s)


def cmd_apply(args: argparse.Namespace) -> int:
    directory = _directory(args)
    settings = _resolved()
    if args.dir:
        settings = settings.with_overrides(taxonomy_dir=directory)
    if args.watch:
        print(f"watching {directory} every {args.interval:g} s (Ctrl-C stops)", file=sys.stderr)
        try:
            watch(directory, lambda t: apply_directory(settings, t, progress=not args.quiet,
                                                       chunk_size=args.chunk_size),
                  interval_s=args.interval, debounce_s=args.debounce)
        except KeyboardInterrupt:
            return 0
        return 0
    taxonomies, errors = validate_taxonomies(directory)
    if errors or taxonomies is None:
        _print_errors(errors, directory)
        return 1
    result = apply_directory(settings, taxonomies, progress=not args.quiet, chunk_size=args.chunk_size)
    if not result.diff.empty:
        print(format_diff(result.diff, None))
    print(result.summary())
    return 0


# ---- history -------------------------------------------------------------------------------------------------------


def cmd_history(args: argparse.Namespace) -> int:
    from tagger.db import repository as repo
    from tagger.db.engine import get_engine

    settings = _resolved()
    assert settings.database_url
    with get_engine(settings.database_url).connect() as conn:
        versions = repo.taxonomy_history(conn, args.taxonomy, args.limit)
        applies = repo.taxonomy_applies(conn, args.limit)
    print(f"{'taxonomy':<12} {'version':<13} {'stored':<20} {'applied':<20} {'tags':>8}")
    for v in versions:
        stored = v["created_at"].strftime("%Y-%m-%d %H:%M:%S") if v["created_at"] else ""
        applied = v["applied_at"].strftime("%Y-%m-%d %H:%M:%S") if v["applied_at"] else "never"
        mark = "  <- applied" if v["current"] else ""
        print(f"{v['taxonomy']:<12} {v['version']:<13} {stored:<20} {applied:<20} {v['tags']:>8}{mark}")
    if applies:
        print("\napplies (newest first):")
        for a in applies:
            changed = ", ".join(f"{k} {a['from_versions'].get(k, '(none)')} -> {v}"
                                for k, v in sorted(a["to_versions"].items()) if a["from_versions"].get(k) != v)
            plan = "; ".join(f"{k} {', '.join(v)}" for k, v in a["plan"].items() if v) or "no re-tagging"
            print(f"  #{a['id']} {a['applied_at']:%Y-%m-%d %H:%M:%S}  {changed or 'baseline'}  [{plan}]  "
                  f"{a['products']} products, {a['rows_written']} rows written, {a['rows_deleted']} deleted, "
                  f"{a['seconds']:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tagger taxonomy", description="Work with the taxonomies.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("validate", help="check every taxonomy file; errors name file, line and key")
    p.add_argument("--dir", help="taxonomy folder (TAGGER_TAXONOMY_DIR)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("diff", help="what changed since the applied version (or --from DIR), products affected")
    p.add_argument("--dir", help="taxonomy folder (TAGGER_TAXONOMY_DIR)")
    p.add_argument("--from", dest="from_dir", metavar="DIR", help="compare with this folder instead of the database")
    p.add_argument("--no-counts", action="store_true", help="do not count affected products in the database")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("apply", help="record the new version and re-tag only what changed (no image re-encoded)")
    p.add_argument("--dir", help="taxonomy folder (TAGGER_TAXONOMY_DIR)")
    p.add_argument("--watch", action="store_true", help="keep running; apply whenever the files change")
    p.add_argument("--interval", type=float, default=2.0, help="--watch: seconds between checks of the files")
    p.add_argument("--debounce", type=float, default=1.0, help="--watch: seconds files must stay unchanged")
    p.add_argument("--chunk-size", type=int, default=5_000, help="products scored and written per transaction")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("history", help="stored taxonomy versions, the applied one, and past applies")
    p.add_argument("--taxonomy", help="only this taxonomy")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_history)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
