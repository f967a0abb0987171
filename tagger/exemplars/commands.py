"""`tagger exemplars ...`: manage a shop's labelled examples and re-tag from them.

- ``import FILE.csv``: add exemplars in bulk (columns sku, attribute, label); every bad row is reported with its
  line, and nothing is imported unless ``--skip-bad``; then the affected attributes are re-tagged.
- ``list``: exemplars per attribute and label, with whether the product has stored features.
- ``remove``: by SKU (optionally one attribute), or every exemplar of one label; then re-tag.
- ``check``: contradictions (a product under two labels; an exemplar nearer another label's exemplars).
- ``retag --attribute A``: re-tag an attribute from stored embeddings with its current exemplars.
- ``backfill``: encode the images of exemplar products that have no stored features yet.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from tagger.db import exemplar_repository as exrepo
from tagger.exemplars.validate import (ExemplarError, ExemplarImportError, GoodRow, nearer_other_label, read_rows,
                                       same_product_two_labels, validate_rows)
from tagger.settings import Settings, get_settings
from tagger.taxonomy.model import TaxonomySet


@dataclass(frozen=True)
class RetagResult:
    attributes: tuple[str, ...]
    products: int
    rows_written: int
    rows_deleted: int
    seconds: float

    def summary(self) -> str:
        if not self.attributes:
            return "nothing to re-tag"
        return (f"re-tagged {', '.join(self.attributes)} for {self.products} product(s) from stored embeddings: "
                f"{self.rows_written} tag row(s) written, {self.rows_deleted} deleted, {self.seconds:.1f} s")


@dataclass(frozen=True)
class ImportResult:
    good: int
    added: int  # new exemplar rows (good rows already stored are not added twice)
    skipped: int  # bad rows left out (--skip-bad)


def _context() -> tuple[Settings, Engine, TaxonomySet, str]:
    from tagger import services
    from tagger.db.engine import get_engine
    from tagger.encoders.base import get_encoder
    from tagger.taxonomy.loader import load_taxonomies

    settings = services.resolve(get_settings())
    assert settings.database_url
    engine = get_engine(settings.database_url)
    taxonomies = load_taxonomies(settings.taxonomy_dir)
    model_id = get_encoder(settings.model, "cpu").model_id
    return settings, engine, taxonomies, model_id


def import_file(engine: Engine, taxonomies: TaxonomySet, model_id: str, path: Path, *, skip_bad: bool,
                created_by: str | None) -> tuple[ImportResult, list[GoodRow], list]:
    """Validate every row, then add the good ones in one transaction (none at all if any is bad, unless
    ``skip_bad``). Returns the result, the good rows and the problems."""
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExemplarError(f"cannot read {path}: {exc}") from exc
    rows = read_rows(content, str(path))
    with engine.begin() as conn:
        products, with_features = exrepo.known_skus(conn, sorted({r.sku for r in rows}), model_id)
        good, problems = validate_rows(rows, taxonomies, products, with_features)
        if problems and not skip_bad:
            raise ExemplarImportError(problems, str(path))
        added = exrepo.add_exemplars(conn, [(g.sku, g.taxonomy, g.attribute, g.label) for g in good],
                                     source="import", created_by=created_by)
    return ImportResult(len(good), added, len(problems)), good, problems


def retag_attributes(engine: Engine, settings: Settings, taxonomies: TaxonomySet, attributes: Sequence[str],
                     *, progress: bool = False) -> RetagResult:
    """Re-score ``attributes`` for every product from stored embeddings and features with the current exemplars
    (``tagger.retag.rescore``: manual, approved and rejected tags are never touched)."""
    from tagger import retag
    from tagger.db import repository as repo
    from tagger.encoders.base import get_encoder

    from tagger.encoders.default import DefaultEncoder
    from tagger.taxonomy.diff import condition_closure

    names = tuple(sorted(set(attributes)))
    if not names:
        return RetagResult((), 0, 0, 0, 0.0)
    started = time.perf_counter()
    encoder = get_encoder(settings.model, "cpu")
    # Prototypes of the attributes and of the conditions they depend on (stored ones are reused, none encoded).
    owners = {taxonomies.attribute(n).taxonomy for n in condition_closure(taxonomies, names)}
    with engine.connect() as lock_conn:
        if not repo.try_apply_lock(lock_conn):
            raise retag.ApplyInProgress("a taxonomy apply or exemplar re-tag is running; run "
                                        f"`tagger exemplars retag --attribute {names[0]}` again when it is done")
        lock_conn.commit()
        try:
            with engine.begin() as conn:
                prototypes, _ = retag.ensure_label_embeddings(
                    conn, [t for t in taxonomies.taxonomies if t.name in owners], encoder)
            if not isinstance(encoder, DefaultEncoder):
                encoder.load()  # CLIP reads its temperature from the checkpoint; the default model's is in its config
            products, written, deleted = retag.rescore(engine, taxonomies, prototypes, names, encoder=encoder,
                                                       settings=settings, progress=progress)
        finally:
            repo.release_apply_lock(lock_conn)
            lock_conn.commit()
    return RetagResult(names, products, written, deleted, time.perf_counter() - started)


# ---- commands -----------------------------------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace) -> int:
    settings, engine, taxonomies, model_id = _context()
    try:
        result, good, problems = import_file(engine, taxonomies, model_id, Path(args.file), skip_bad=args.skip_bad,
                                             created_by=args.created_by)
    except ExemplarImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"skipped {args.file}:{problem.line}: {problem.reason}", file=sys.stderr)
    print(f"imported {result.added} new exemplar(s) from {result.good} good row(s)"
          + (f"; {result.skipped} bad row(s) skipped" if result.skipped else ""))
    if not args.no_retag and result.added:
        print(retag_attributes(engine, settings, taxonomies, [g.attribute for g in good],
                               progress=args.progress).summary())
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    _, engine, _, model_id = _context()
    with engine.connect() as conn:
        rows = exrepo.list_exemplars(conn, model_id, attribute=args.attribute, label=args.label, limit=args.limit)
    if not rows:
        print("no exemplars" + (" match" if args.attribute or args.label else ""))
        return 0
    counts: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        counts.setdefault((r.attribute, r.label), [0, 0])
        counts[(r.attribute, r.label)][0] += 1
        counts[(r.attribute, r.label)][1] += int(r.has_features)
    if args.summary:
        print(f"{'attribute':<16} {'label':<24} {'exemplars':>9} {'usable':>7}")
        for (attribute, label), (n, usable) in sorted(counts.items()):
            print(f"{attribute:<16} {label:<24} {n:>9} {usable:>7}")
        return 0
    print(f"{'sku':<20} {'attribute':<16} {'label':<20} {'source':<18} {'by':<12} {'added':<16} features")
    for r in rows:
        print(f"{r.sku:<20} {r.attribute:<16} {r.label:<20} {r.source:<18} {(r.created_by or '-'):<12} "
              f"{r.created_at:%Y-%m-%d %H:%M} {'yes' if r.has_features else 'no (not used)'}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    if args.sku is None and (args.attribute is None or args.label is None):
        raise ExemplarError("say what to remove: --sku S [--attribute A], or --attribute A --label L")
    settings, engine, taxonomies, _ = _context()
    with engine.begin() as conn:
        removed = exrepo.remove_exemplars(conn, sku=args.sku, attribute=args.attribute, label=args.label)
    print(f"removed {len(removed)} exemplar(s)")
    known = {a.name for a in taxonomies.attributes}
    if not args.no_retag and removed:
        print(retag_attributes(engine, settings, taxonomies, [a for _, a, _ in removed if a in known],
                               progress=args.progress).summary())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    _, engine, taxonomies, model_id = _context()
    with engine.connect() as conn:
        rows = exrepo.list_exemplars(conn, model_id)
        exemplars = exrepo.load_exemplars(conn, model_id)
    found = same_product_two_labels([(r.sku, r.attribute, r.label) for r in rows], taxonomies)
    found += nearer_other_label(exemplars, margin=args.margin)
    unusable = sum(not r.has_features for r in rows)
    for c in found:
        print(f"{c.attribute:<16} {c.kind:<13} {c.message}")
    print(f"{len(rows)} exemplar(s) checked, {len(found)} contradiction(s)"
          + (f"; {unusable} without stored features (not used; `tagger exemplars backfill`)" if unusable else ""))
    return 1 if found else 0


def cmd_retag(args: argparse.Namespace) -> int:
    settings, engine, taxonomies, _ = _context()
    known = [a.name for a in taxonomies.attributes]
    unknown = [a for a in args.attribute if a not in known]
    if unknown:
        raise ExemplarError(f"unknown attribute {', '.join(unknown)}; known: {', '.join(known)}")
    print(retag_attributes(engine, settings, taxonomies, args.attribute, progress=args.progress).summary())
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    """Encode exemplar products' images once more to store their backbone features."""
    from tagger.db import repository as repo
    from tagger.encoders.base import get_encoder
    from tagger.images import ImageLimits, decode_image, read_image_bytes

    settings, engine, _, model_id = _context()
    with engine.connect() as conn:
        skus = exrepo.exemplar_skus(conn, model_id)
    if not skus:
        print("every exemplar product has stored features")
        return 0
    encoder = get_encoder(settings.model, settings.device)
    limits = ImageLimits.from_settings(settings)
    done = failed = 0
    for sku in skus:
        with engine.connect() as conn:
            product = conn.exec_driver_sql("SELECT image_ref FROM products WHERE sku = %s", (sku,)).first()
            stored = repo.get_embedding(conn, sku, model_id)
        if product is None or product[0] is None or stored is None:
            print(f"{sku}: no stored image reference or embedding; re-send the product", file=sys.stderr)
            failed += 1
            continue
        try:
            image = decode_image(read_image_bytes(product[0], limits), limits)
        except Exception as exc:  # noqa: BLE001 - one unreadable image must not stop the others
            print(f"{sku}: {exc}", file=sys.stderr)
            failed += 1
            continue
        _, features = encoder.encode_images_with_features([image])
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE embeddings SET image_features = %s::halfvec WHERE sku = %s AND model_id = %s",
                                 (str(features[0].tolist()), sku, model_id))
        done += 1
    print(f"stored features of {done} exemplar product(s); {failed} failed")
    return 0 if not failed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tagger exemplars",
                                     description="A shop's labelled examples per attribute label (few-shot tagging).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("import", help="add exemplars from a CSV (sku, attribute, label), then re-tag")
    p.add_argument("file", help="CSV file with a header naming sku, attribute and label")
    p.add_argument("--skip-bad", action="store_true", help="import the good rows even when some rows are bad")
    p.add_argument("--created-by", help="who vouches for these examples (stored with each)")
    p.add_argument("--no-retag", action="store_true", help="do not re-tag the affected attributes")
    p.add_argument("--progress", action="store_true", help="show a progress bar while re-tagging")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("list", help="list exemplars")
    p.add_argument("--attribute")
    p.add_argument("--label")
    p.add_argument("--limit", type=int, help="at most this many rows")
    p.add_argument("--summary", action="store_true", help="counts per attribute and label only")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("remove", help="remove exemplars by SKU, or every exemplar of one label; then re-tag")
    p.add_argument("--sku")
    p.add_argument("--attribute")
    p.add_argument("--label")
    p.add_argument("--no-retag", action="store_true", help="do not re-tag the affected attributes")
    p.add_argument("--progress", action="store_true")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("check", help="report contradicting exemplars (exit status 1 when any is found)")
    p.add_argument("--margin", type=float, default=0.0,
                   help="report an exemplar only when another label's centroid is this much nearer (cosine)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("retag", help="re-tag attributes from stored embeddings with their current exemplars")
    p.add_argument("--attribute", action="append", required=True, help="attribute to re-tag (repeatable)")
    p.add_argument("--progress", action="store_true")
    p.set_defaults(func=cmd_retag)

    p = sub.add_parser("backfill", help="store the image features of exemplar products encoded before they were kept")
    p.set_defaults(func=cmd_backfill)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
