"""Merchandiser taxonomy edits end to end: diff, apply (re-tag only what changed, from stored embeddings),
history, manual tags, threshold-only edits, --watch, the Celery task, migration 0002 and the validation
errors test_taxonomy.py does not cover. Real Postgres; the tiny random CLIP embeds the products once."""

from __future__ import annotations

import itertools
import os
import shutil
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from tagger import retag
from tagger.db import migrate
from tagger.db.engine import get_engine, make_engine
from tagger.encoders.base import Encoder
from tagger.events import new_event
from tagger.pipeline import PROCESSED, UNCHANGED, Pipeline
from tagger.settings import REPO_ROOT, Settings, set_settings
from tagger.taxonomy import commands, load_taxonomies, validate_taxonomies
from tagger.taxonomy.diff import diff_taxonomies
from tests.conftest import CATALOG, DIM, WorkerProcess, create_database, pipeline_settings, wait_until, worker_env

IMAGES = [p.stem for p in sorted((CATALOG.parent / "images").glob("*.jpg"))[:6]]
COLUMNS = "id, sku, taxonomy, attribute, value, score, rank, path, model_id, taxonomy_version, source, status, updated_at"


class NoImageEncoder(Encoder):
    """Wraps the real encoder; applying a taxonomy must never encode an image."""

    def __init__(self, inner: Encoder):
        super().__init__()
        self.inner = inner
        self.model_id = inner.model_id
        self.dim = inner.dim
        self.texts_encoded = 0

    @property
    def logit_scale(self) -> float:  # type: ignore[override]
        return self.inner.logit_scale

    def _load(self) -> None:
        self.inner.load()

    def _encode_images(self, images: list[Any]) -> np.ndarray:
        raise AssertionError("apply must not encode images")

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        self.texts_encoded += len(texts)
        return self.inner.encode_texts(texts)


@dataclass
class Env:
    settings: Settings
    engine: Engine
    pipeline: Pipeline
    encoder: NoImageEncoder
    tax_dir: Path

    def apply(self, **kw: Any) -> retag.ApplyResult:
        return retag.apply_taxonomies(self.engine, load_taxonomies(self.tax_dir), encoder=self.encoder,
                                      settings=self.settings, chunk_size=kw.pop("chunk_size", 4), **kw)

    def rows(self, where: str = "true", **params: Any) -> dict[tuple[str, str, str], tuple[Any, ...]]:
        with self.engine.connect() as conn:
            result = conn.execute(text(f"SELECT {COLUMNS} FROM tags WHERE {where}"), params).all()
        return {(r[1], r[3], r[4]): tuple(r) for r in result}

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def execute(self, sql: str, **params: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(sql), params)

    def edit(self, file: str, old: str, new: str) -> None:
        path = self.tax_dir / file
        content = path.read_text(encoding="utf-8")
        assert old in content, old
        path.write_text(content.replace(old, new, 1), encoding="utf-8")


def copy_taxonomies(target: Path) -> Path:
    target.mkdir(parents=True)
    for path in (REPO_ROOT / "taxonomies").glob("*.yaml"):
        shutil.copy(path, target / path.name)
    return target


QUIET_LUXURY = ("      quiet_luxury: {name: Quiet luxury, prompts: [quiet luxury clothing, understated expensive "
                "minimalist outfit], translations: {fr: Luxe discret, de: Stiller Luxus}}\n")


def realistic_edit(env_or_dir: Env | Path) -> None:
    """Rename + new label + threshold change + new prompt."""
    directory = env_or_dir.tax_dir if isinstance(env_or_dir, Env) else env_or_dir

    def edit(file: str, old: str, new: str) -> None:
        path = directory / file
        content = path.read_text(encoding="utf-8")
        assert old in content, old
        path.write_text(content.replace(old, new, 1), encoding="utf-8")

    edit("style.yaml", "casual: {name: Casual,", "casual: {name: Everyday casual,")
    edit("style.yaml", "[formal wear, office wear, formal business attire]",
         "[formal wear, office wear, formal business attire, a tailored suit]")
    (directory / "style.yaml").write_text((directory / "style.yaml").read_text() + QUIET_LUXURY)
    edit("attributes.yaml", "name: Colour\n    kind: single\n    threshold: 0.35",
         "name: Colour\n    kind: single\n    threshold: 0.5")


_databases = itertools.count()


@pytest.fixture(scope="module")
def template_db(server_settings: Settings, image_dir: Path, tiny_clip_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database the pipeline tagged once (tiny CLIP, the shipped taxonomies); each test gets a copy of it."""
    assert server_settings.database_url
    name = f"tagger_edits_tmpl_{os.getpid()}"
    url = create_database(server_settings.database_url, name)
    migrate.upgrade(url, DIM)
    tax_dir = copy_taxonomies(tmp_path_factory.mktemp("template") / "taxonomies")
    pipeline = Pipeline(pipeline_settings(url, image_dir, model=str(tiny_clip_dir), taxonomy_dir=tax_dir))
    for stem in IMAGES:
        outcome = pipeline.handle(new_event("product.created", sku=f"P{stem}", title=f"product {stem}",
                                            image=str(CATALOG.parent / "images" / f"{stem}.jpg")))
        assert outcome.status == PROCESSED, outcome
    get_engine(url).dispose()
    yield name
    admin = make_engine(server_settings.database_url, register_vectors=False)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def env(template_db: str, server_settings: Settings, image_dir: Path, tiny_clip_dir: Path, tmp_path: Path
        ) -> Iterator[Env]:
    assert server_settings.database_url
    name = f"tagger_edits_{os.getpid()}_{next(_databases)}"
    admin = make_engine(server_settings.database_url, register_vectors=False)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"'))
    url = make_url(server_settings.database_url).set(database=name).render_as_string(hide_password=False)
    tax_dir = copy_taxonomies(tmp_path / "taxonomies")
    settings = pipeline_settings(url, image_dir, model=str(tiny_clip_dir), taxonomy_dir=tax_dir)
    engine = get_engine(url)
    pipeline = Pipeline(settings)
    yield Env(settings, engine, pipeline, NoImageEncoder(pipeline.encoder), tax_dir)
    engine.dispose()
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def run_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch, env: Env, capsys: pytest.CaptureFixture[str]
            ) -> tuple[int, str, str]:
    monkeypatch.setenv("TAGGER_DATABASE_URL", str(env.settings.database_url))
    monkeypatch.setenv("TAGGER_MODEL", env.settings.model)
    monkeypatch.setenv("TAGGER_TAXONOMY_DIR", str(env.tax_dir))
    set_settings(None)
    try:
        code = commands.main(argv)
    finally:
        set_settings(None)
    out, err = capsys.readouterr()
    return code, out, err


# ---- diff ---------------------------------------------------------------------------------------------------------


def test_diff_of_a_realistic_edit(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    before = copy_taxonomies(tmp_path / "before")
    realistic_edit(env)
    code, out, _ = run_cli(["diff", "--from", str(before)], monkeypatch, env, capsys)
    assert code == 0, out
    lines = out.splitlines()
    n = len(IMAGES)

    def line(fragment: str) -> str:
        found = [x for x in lines if fragment in x]
        assert len(found) == 1, (fragment, out)
        return found[0]

    renamed = line("style.casual")
    assert "renamed 'Casual' -> 'Everyday casual'" in renamed and "[display only]" in renamed
    added = line("style.quiet_luxury")
    assert added.lstrip().startswith("+") and "new label 'Quiet luxury'" in added and "[re-score]" in added
    assert f"{n} product(s)" in added  # every tagged product gets re-scored on style
    prompts = line("style.formal")
    assert "prompt texts changed" in prompts and "[re-score]" in prompts
    threshold = line("~ colour ")
    assert "threshold 0.35 -> 0.5" in threshold and "[statuses only]" in threshold and f"{n} product(s)" in threshold
    plan = line("plan:")
    assert "re-score style from stored embeddings" in plan and "re-evaluate statuses of colour" in plan
    assert sum(1 for x in lines if x.startswith("taxonomy ")) == 2  # style and attributes; category unchanged

    # Against the database: the pipeline tagged with the shipped version, so the same edit shows up.
    code, out_db, _ = run_cli(["diff"], monkeypatch, env, capsys)
    assert code == 0 and "style.quiet_luxury" in out_db and "never applied" in out_db
    code, as_json, _ = run_cli(["diff", "--json", "--from", str(before)], monkeypatch, env, capsys)
    assert '"rescore": [\n      "style"\n    ]' in as_json and '"products": 6' in as_json


def test_invalid_files_are_reported_and_not_diffed_or_applied(env: Env, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    env.edit("style.yaml", "threshold: 0.45", "threshold: 4.5")
    for action in ("diff", "apply"):
        code, _, err = run_cli([action], monkeypatch, env, capsys)
        assert code == 1
        assert "style.yaml:11 (attributes.style.threshold): threshold 4.5 is out of range" in err
        assert "nothing was applied" in err
    assert env.scalar("SELECT count(*) FROM taxonomy_state") == 0


# ---- apply --------------------------------------------------------------------------------------------------------


def test_first_apply_records_a_baseline_and_rerunning_is_a_noop(env: Env, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    before = env.rows()
    first = env.apply()
    assert first.base_source == "tagged" and first.diff.empty and first.rows_written == 0
    assert env.rows() == before  # nothing rewritten: the tags already follow these versions
    assert env.scalar("SELECT count(*) FROM taxonomy_state") == 3
    second = env.apply()
    assert second.noop and second.base_source == "applied"
    code, out, _ = run_cli(["diff"], monkeypatch, env, capsys)
    assert out.startswith("no changes")
    code, out, _ = run_cli(["apply", "-q"], monkeypatch, env, capsys)
    assert code == 0 and "nothing to apply" in out
    assert env.rows() == before and env.scalar("SELECT count(*) FROM taxonomy_applies") == 0


def test_apply_retags_only_the_changed_attribute_from_stored_embeddings(env: Env) -> None:
    env.apply()
    before = env.rows()
    old_style_version = env.scalar("SELECT version FROM taxonomy_state WHERE taxonomy = 'style'")
    env.edit("style.yaml", "[formal wear, office wear, formal business attire]",
             "[formal wear, office wear, formal business attire, a tailored suit]")
    (env.tax_dir / "style.yaml").write_text((env.tax_dir / "style.yaml").read_text() + QUIET_LUXURY)
    result = env.apply()
    assert result.diff.rescore == ("style",) and not result.diff.redecide
    assert result.products == len(IMAGES) and result.rows_written > 0
    assert env.encoder.texts_encoded == 2 * (4 + 2)  # only the changed label's and the new label's prompts
    after = env.rows()
    new_style_version = env.scalar("SELECT version FROM taxonomy_state WHERE taxonomy = 'style'")
    assert new_style_version != old_style_version
    for key, row in before.items():
        if key[1] != "style":
            assert after[key] == row, key  # same id, same values, same updated_at
    style = {k: v for k, v in after.items() if k[1] == "style"}
    assert style and all(v[9] == new_style_version for v in style.values())
    kept = [k for k in style if k in before]
    assert all(after[k][0] == before[k][0] for k in kept)  # same label, same row
    # The re-tag equals what the pipeline computes for a product event (which reuses the stored embedding).
    image = str(CATALOG.parent / "images" / f"{IMAGES[0]}.jpg")
    outcome = env.pipeline.handle(new_event("product.updated", sku=f"P{IMAGES[0]}", title=f"product {IMAGES[0]}",
                                            image=image))
    assert outcome.status == UNCHANGED
    fresh = env.rows("sku = :s AND attribute = 'style'", s=f"P{IMAGES[0]}")
    assert {k: (v[4], v[6], v[11]) for k, v in fresh.items()} == \
        {k: (v[4], v[6], v[11]) for k, v in style.items() if k[0] == f"P{IMAGES[0]}"}
    assert all(abs(fresh[k][5] - style[k][5]) < 1e-5 for k in fresh)
    # Re-running is a no-op: nothing rewritten.
    again = env.apply()
    assert again.noop and env.rows("attribute = 'style'") == env.rows("attribute = 'style'")
    assert env.scalar("SELECT count(*) FROM taxonomy_applies") == 1


def test_rename_keeps_rows_and_history(env: Env, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    env.apply()
    before = env.rows()
    old = env.scalar("SELECT version FROM taxonomy_state WHERE taxonomy = 'style'")
    env.edit("style.yaml", "casual: {name: Casual,", "casual: {name: Everyday casual,")
    result = env.apply()
    assert [c.kind for c in result.diff.changes] == ["label_renamed"] and not result.diff.retags
    assert env.encoder.texts_encoded == 0  # explicit prompts: the name is not a prompt, nothing to encode
    assert env.rows() == before  # tags keep their rows (the key is the identity)
    new = env.scalar("SELECT version FROM taxonomy_state WHERE taxonomy = 'style'")
    assert new != old
    assert env.scalar("SELECT count(*) FROM taxonomy_versions WHERE taxonomy = 'style' AND version IN (:a, :b) "
                      "AND applied_at IS NOT NULL", a=old, b=new) == 2
    content = env.scalar("SELECT content FROM taxonomy_versions WHERE taxonomy = 'style' AND version = :v", v=old)
    assert [lab["name"] for lab in content["attributes"][0]["labels"] if lab["key"] == "casual"] == ["Casual"]
    code, out, _ = run_cli(["history", "--taxonomy", "style"], monkeypatch, env, capsys)
    assert code == 0
    assert any(new in line and "<- applied" in line for line in out.splitlines())
    assert any(old in line and "<- applied" not in line for line in out.splitlines())
    assert f"style {old} -> {new}" in out

    # A label without explicit prompts is prompted by its name: renaming it re-scores, in the same rows.
    env.edit("category.yaml", "casual_shoes: {name: Casual shoes,", "casual_shoes: {name: Sneakers and loafers,")
    result = env.apply()
    assert result.diff.rescore[0] == "category" and "sleeve_length" in result.diff.dependants
    after = env.rows("attribute = 'category'")
    assert all(after[k][0] == before[k][0] for k in after.keys() & before.keys())


def test_manual_and_reviewed_tags_survive_apply(env: Env) -> None:
    env.apply()
    sku = f"P{IMAGES[0]}"
    machine = env.rows("sku = :s AND attribute = 'style'", s=sku)
    values = {k[2] for k in machine}
    manual = next(v for v in ("casual", "formal", "sporty", "ethnic", "party") if v not in values)
    env.execute("INSERT INTO tags (sku, taxonomy, attribute, value, score, rank, source, status) "
                "VALUES (:s, 'style', 'style', :v, 1, 1, 'manual', 'approved')", s=sku, v=manual)
    approved, rejected = sorted(machine, key=lambda k: machine[k][6])[:2]
    env.execute("UPDATE tags SET status = 'approved' WHERE sku = :s AND attribute = 'style' AND value = :v",
                s=sku, v=approved[2])
    env.execute("UPDATE tags SET status = 'rejected' WHERE sku = :s AND attribute = 'style' AND value = :v",
                s=sku, v=rejected[2])
    people = env.rows("source = 'manual' OR status IN ('approved', 'rejected')")
    assert len(people) == 3
    # Remove a label the person approved and rewrite every prompt: the machine wants other tags now.
    env.edit("style.yaml", "[casual wear, everyday casual clothing, a casual outfit]", "[plain everyday clothes]")
    (env.tax_dir / "style.yaml").write_text((env.tax_dir / "style.yaml").read_text() + QUIET_LUXURY)
    result = env.apply()
    assert "style" in result.diff.rescore
    assert env.rows("source = 'manual' OR status IN ('approved', 'rejected')") == people
    assert env.scalar("SELECT count(*) FROM tags WHERE sku = :s AND attribute = 'style' AND source = 'machine' "
                      "AND status NOT IN ('approved', 'rejected')", s=sku) >= 1  # suggestions stay beside them


def test_threshold_only_change_redecides_statuses_from_stored_scores(env: Env) -> None:
    env.apply()
    before = env.rows()
    env.edit("attributes.yaml", "name: Colour\n    kind: single\n    threshold: 0.35",
             "name: Colour\n    kind: single\n    threshold: 0.99")
    result = env.apply()
    assert result.diff.redecide == ("colour",) and not result.diff.rescore
    assert env.encoder.texts_encoded == 0  # same prompts: label embeddings reused, nothing encoded
    after = env.rows()
    version = env.scalar("SELECT version FROM taxonomy_state WHERE taxonomy = 'attributes'")
    for key, row in before.items():
        if key[1] != "colour":
            assert after[key] == row
            continue
        new = after[key]
        assert new[0] == row[0] and new[5] == row[5] and new[6] == row[6]  # same row, same score, same rank
        assert new[9] == version
        assert new[11] == ("needs_review" if row[6] == 1 else "alternative")
    # And back down: rank-1 scores at or above 0.01 are accepted again, from the same stored scores.
    env.edit("attributes.yaml", "threshold: 0.99", "threshold: 0.01")
    env.apply()
    final = env.rows("attribute = 'colour'")
    assert all(v[11] == ("accepted" if v[6] == 1 else "alternative") for v in final.values())
    assert all(final[k][5] == before[k][5] for k in final)


def test_padding_keeps_stored_ranks_when_a_person_holds_rank_one() -> None:
    taxonomies = load_taxonomies(REPO_ROOT / "taxonomies")
    style = taxonomies.attribute("style")
    # Rank 1 ("casual") is held by a manual tag, so only the machine's ranks 2 and 3 are stored.
    group = [("S", "style", "style", "formal", 0.3, 2, None, "m"), ("S", "style", "style", "party", 0.1, 3, None, "m")]
    keys, scores = retag._padded(style, group)
    from tagger import scoring

    decisions = scoring.decide(style, keys, scores, 0.5, len(keys))
    ranks = {d.value: (d.rank, d.status) for d in decisions}
    assert ranks["formal"] == (2, "alternative") and ranks["party"] == (3, "alternative")


def test_removed_attribute_and_label(env: Env) -> None:
    env.apply()
    sku = f"P{IMAGES[1]}"
    present = {v for v in ("leather", "cotton", "denim", "knit", "synthetic", "metal")
               if env.scalar("SELECT count(*) FROM tags WHERE sku = :s AND attribute = 'material' AND value = :v",
                             s=sku, v=v)}
    value = next(v for v in ("leather", "cotton", "denim", "knit", "synthetic", "metal") if v not in present)
    env.execute("INSERT INTO tags (sku, taxonomy, attribute, value, score, rank, source, status) "
                "VALUES (:s, 'attributes', 'material', :v, 1, 1, 'manual', 'approved')", s=sku, v=value)
    content = (env.tax_dir / "attributes.yaml").read_text()
    start = content.index("  material:\n")
    (env.tax_dir / "attributes.yaml").write_text(content[:start])
    result = env.apply()
    assert result.diff.drop == ("material",)
    assert env.scalar("SELECT count(*) FROM tags WHERE attribute = 'material'") == 1  # the person's tag stays
    assert env.scalar("SELECT count(*) FROM tags WHERE attribute = 'colour'") > 0


# ---- watch --------------------------------------------------------------------------------------------------------


def test_watch_applies_valid_edits_once_and_reports_invalid_ones(tmp_path: Path) -> None:
    directory = copy_taxonomies(tmp_path / "taxonomies")
    applied: list[str] = []
    reports: list[str] = []
    done = threading.Event()
    thread = threading.Thread(target=commands.watch, kwargs=dict(
        directory=directory, apply_once=lambda t: applied.append(t.versions["style"]) or "applied",
        interval_s=0.02, debounce_s=0.15, stop=done.is_set, report=reports.append), daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(applied) == 1, 10, "initial apply")
        style = directory / "style.yaml"
        style.write_text(style.read_text().replace("threshold: 0.45", "threshold: 7"))
        wait_until(lambda: any("not applied" in r for r in reports), 10, "invalid edit reported")
        assert any("style.yaml:11 (attributes.style.threshold)" in r for r in reports)
        assert len(applied) == 1
        for value in ("0.5", "0.55", "0.6"):  # several quick saves: one apply of the last one
            style.write_text(style.read_text().replace("threshold: 7", f"threshold: {value}")
                             .replace("threshold: 0.5\n", f"threshold: {value}\n")
                             .replace("threshold: 0.55\n", f"threshold: {value}\n"))
            time.sleep(0.03)
        wait_until(lambda: len(applied) == 2, 10, "apply after the fix")
        time.sleep(0.3)
        assert len(applied) == 2
        assert "threshold: 0.6\n" in style.read_text()
    finally:
        done.set()
        thread.join(5)


# ---- the Celery task ----------------------------------------------------------------------------------------------


def test_apply_task_through_a_real_worker(env: Env, server_settings: Settings, image_dir: Path,
                                          tmp_path: Path) -> None:
    from tagger.worker.taxonomy_tasks import send_apply

    env.apply()
    env.edit("style.yaml", "[formal wear, office wear, formal business attire]", "[formal wear, a tailored suit]")
    expected = load_taxonomies(env.tax_dir).versions["style"]
    worker = WorkerProcess(worker_env(server_settings, str(env.settings.database_url), image_dir,
                                      TAGGER_MODEL=env.settings.model, TAGGER_TAXONOMY_DIR=str(env.tax_dir)),
                           tmp_path / "maintenance.log", queues="tagger.maintenance")
    try:
        worker.wait_ready()
        send_apply()
        wait_until(lambda: env.scalar("SELECT version FROM taxonomy_state WHERE taxonomy = 'style'") == expected,
                   90, "the worker's apply", worker)
        wait_until(lambda: env.scalar("SELECT count(*) FROM taxonomy_applies") == 1, 30, "apply log", worker)
        assert env.scalar("SELECT count(*) FROM tags WHERE attribute = 'style' AND taxonomy_version = :v",
                          v=expected) > 0
    finally:
        worker.stop()


# ---- schema -------------------------------------------------------------------------------------------------------


def test_migration_0002_upgrades_and_downgrades(fresh_database: Callable[[], str]) -> None:
    url = fresh_database()
    migrate.upgrade(url, 512)

    def shape() -> tuple[set[str], set[str]]:
        engine = make_engine(url, register_vectors=False)
        with engine.connect() as conn:
            tables = {r[0] for r in conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))}
            columns = {r[0] for r in conn.execute(text(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'taxonomy_versions'"))}
        engine.dispose()
        return tables, columns

    tables, columns = shape()
    assert {"taxonomy_state", "taxonomy_applies"} <= tables and "applied_at" in columns
    migrate.downgrade(url, 512, "0001")
    tables, columns = shape()
    assert not {"taxonomy_state", "taxonomy_applies"} & tables and "applied_at" not in columns
    assert migrate.current_revision(url) == "0001"
    migrate.upgrade(url, 512)
    assert {"taxonomy_state", "taxonomy_applies"} <= shape()[0]


# ---- validation errors not covered by test_taxonomy.py ---------------------------------------------------------


def write_one(tmp_path: Path, body: str) -> Path:
    directory = tmp_path / "t"
    directory.mkdir()
    (directory / "x.yaml").write_text(textwrap.dedent(body).lstrip("\n"), encoding="utf-8")
    return directory


@pytest.mark.parametrize(("line", "yaml_text", "expected"), [
    (4, "kind: several", "(attributes.a.kind): kind 'several' is not known: use 'single'"),
    (4, "top_k: 0", "(attributes.a.top_k): top_k 0 must be a whole number of at least 1"),
    (4, "prompt_templates: [a photo]", "(attributes.a.prompt_templates): prompt_templates must be a non-empty list "
                                       "of texts, each containing '{}'"),
    (5, "labels:\n    x: {translations: {fr: [Robe]}}",
     "(attributes.a.labels.x.translations): translations must map a language code to a display name"),
    (5, "labels:\n    x: {synonyms: [ok, '']}", "(attributes.a.labels.x.synonyms): expected a list of non-empty texts"),
    (4, "labels: {}", "(attributes.a.labels): 'labels' must be a non-empty mapping of label key"),
])
def test_more_validation_errors_name_file_line_and_key(tmp_path: Path, line: int, yaml_text: str,
                                                        expected: str) -> None:
    body = "taxonomy: t\nattributes:\n  a:\n" + textwrap.indent(yaml_text, "    ") + "\n"
    if "labels" not in yaml_text:
        body += "    labels: {x: {}}\n"
    directory = write_one(tmp_path, body)
    _, errors = validate_taxonomies(directory)
    assert len(errors) == 1, [str(e) for e in errors]
    assert str(errors[0]).startswith(f"{directory / 'x.yaml'}:{line} "), str(errors[0])
    assert expected in str(errors[0])


def test_diff_is_empty_for_identical_sets_and_sees_templates() -> None:
    shipped = load_taxonomies(REPO_ROOT / "taxonomies")
    assert diff_taxonomies(shipped, shipped).empty
    assert {a.name for a in shipped.attributes} == set(diff_taxonomies(None, shipped).rescore)
