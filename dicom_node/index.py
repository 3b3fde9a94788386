"""The index: patients, studies, series, instances, the association and PHI access audits, the outbox.

SQLite (WAL, synchronous=FULL) by default; PostgreSQL through the same SQLAlchemy URL.
Times are UTC epoch seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    bindparam,
    case,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from dicom_node import gil_held, migrations

log = logging.getLogger(__name__)

metadata = MetaData()
KNOWN_SERIES_LIMIT = 10_000

patients = Table(
    "patients",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("patient_id", String(64), nullable=False),
    Column("issuer", String(64), nullable=False, default=""),
    Column("patient_name", String(324), nullable=False, default=""),
    Column("birth_date", String(8), nullable=False, default=""),
    UniqueConstraint("patient_id", "issuer"),
)

studies = Table(
    "studies",
    metadata,
    Column("study_uid", String(64), primary_key=True),
    Column("patient_key", Integer, ForeignKey("patients.id"), nullable=False),
    Column("study_date", String(8), nullable=False, default=""),
    Column("study_time", String(16), nullable=False, default=""),
    Column("accession_number", String(16), nullable=False, default=""),
    Column("study_description", String(64), nullable=False, default=""),
    Column("modality", String(16), nullable=False, default=""),  # of the first image instance
    # receiving -> complete; a late image instance sets it back to receiving with reanalysis=True
    Column("state", String(16), nullable=False, default="receiving"),
    Column("reanalysis", Boolean, nullable=False, default=False),
    Column("is_prior", Boolean, nullable=False, default=False),
    Column("urgent", Boolean, nullable=False, default=False),  # STAT/HIGH request priority: jumps the GPU queue
    Column("first_received_at", Float, nullable=False),
    Column("last_received_at", Float, nullable=False),
    Column("completed_at", Float),
)

series = Table(
    "series",
    metadata,
    Column("series_uid", String(64), primary_key=True),
    Column("study_uid", String(64), ForeignKey("studies.study_uid"), nullable=False, index=True),
    Column("modality", String(16), nullable=False, default=""),
    Column("body_part", String(64), nullable=False, default=""),
    Column("series_number", String(12), nullable=False, default=""),
    Column("series_description", String(64), nullable=False, default=""),
)

instances = Table(
    "instances",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("series_uid", String(64), ForeignKey("series.series_uid"), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("transfer_syntax_uid", String(64), nullable=False),
    Column("instance_number", String(12), nullable=False, default=""),
    Column("view_position", String(16), nullable=False, default=""),
    Column("laterality", String(16), nullable=False, default=""),
    Column("analysable", Boolean, nullable=False),
    Column("path", Text, nullable=False),
    Column("size", Integer, nullable=False),
    Column("received_at", Float, nullable=False),
)

associations = Table(
    "associations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("calling_ae", String(16), nullable=False),
    Column("called_ae", String(16), nullable=False),
    Column("peer_host", String(64), nullable=False),
    Column("peer_port", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float),
    Column("instances_received", Integer, nullable=False, default=0),
    Column("failures", Integer, nullable=False, default=0),
    Column("result", String(16), nullable=False),  # accepted, released, aborted, rejected
    Column("reason", Text, nullable=False, default=""),
)

# Studies fetched from an archive as priors (registered before the retrieve starts, so
# their arrival never queues them for analysis); also the prior cache's LRU bookkeeping.
prior_studies = Table(
    "prior_studies",
    metadata,
    Column("study_uid", String(64), primary_key=True),
    Column("requested_at", Float, nullable=False),
    Column("last_used_at", Float, nullable=False),
    Column("in_use_until", Float, nullable=False, default=0.0),  # lease: never evicted before this time
)

# One row per (study, instance set) to analyse; the pipeline coordinator turns each into a job.
outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("reason", String(16), nullable=False),  # complete | reanalysis
    Column("instance_set_hash", String(64), nullable=False),
    Column("instance_count", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("published_at", Float),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=False, default=""),
    UniqueConstraint("study_uid", "instance_set_hash"),
)


# Pipeline jobs: one per (study, instance set, model version); see pipeline/jobs.py. The row is
# the single source of truth for progress: Celery messages only say "run stage S of job J".
jobs = Table(
    "jobs",
    metadata,
    Column("job_key", String(64), primary_key=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("outbox_id", Integer, nullable=False),
    Column("instance_set_hash", String(64), nullable=False),
    Column("model_version", String(128), nullable=False),
    Column("priority", String(16), nullable=False, default="routine"),
    # priors -> compare -> report -> deliver -> notify -> done; or failed, or superseded (a newer job of the study)
    Column("state", String(16), nullable=False, index=True),
    Column("attempts", Integer, nullable=False, default=0),  # failed attempts, all stages
    Column("stage_attempts", Integer, nullable=False, default=0),  # failed attempts of the current stage
    Column("unknown_attempts", Integer, nullable=False, default=0),  # of those, unknown-class ones (task_max_retries)
    Column("last_error", Text, nullable=False, default=""),
    Column("error_class", String(16), nullable=False, default=""),  # transient | permanent | unknown
    Column("first_error_at", Float),  # start of the current stage's run of failures (the retry horizon)
    Column("next_attempt_at", Float, nullable=False, default=0.0),  # the stage may run from then on
    Column("published_at", Float),  # last wake-up sent for the current stage (None: none since it became due)
    Column("lease_owner", String(200)),  # the worker running the stage now
    Column("lease_until", Float),  # renewed while it runs; past it, the reconciler gives the stage to another
    Column("artifacts", Text, nullable=False, default="{}"),  # {stage: path of its artifact}
    Column("timings", Text, nullable=False, default="{}"),  # {stage: {"started": t, "finished": t}}
    Column("result", Text, nullable=False, default="{}"),  # summary for status pages: SR UID, finding count...
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# Named leases (e.g. the one pipeline coordinator among several SCP replicas).
leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("owner", String(200), nullable=False),
    Column("until", Float, nullable=False),
)

# status: pending -> accepted, or pending -> committing -> committed (storage commitment on)
report_deliveries = Table(
    "report_deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sop_instance_uid", String(64), nullable=False, index=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("destination", String(64), nullable=False),
    Column("path", Text, nullable=False),
    Column("status", String(16), nullable=False, default="pending", index=True),
    Column("created_at", Float, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("last_attempt_at", Float),
    Column("last_error", Text, nullable=False, default=""),
    Column("response_status", Integer),  # last DIMSE status (or HTTP status for STOW-RS)
    Column("accepted_at", Float),
    Column("commitment_uid", String(64)),  # Transaction UID of the outstanding N-ACTION
    Column("committed_at", Float),
    UniqueConstraint("sop_instance_uid", "destination"),
)

# PHI access audit (dicom_node.audit): who read or disclosed whose data, to whom, when.
phi_access = Table(
    "phi_access",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(200), nullable=False),  # role, OS user, host, pid
    Column("action", String(32), nullable=False),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("patient", String(32), nullable=False),  # hashed patient ID, as in the logs
    Column("peer", String(200), nullable=False, default=""),  # archive, PACS or RIS involved
    Column("detail", Text, nullable=False, default=""),
)


@dataclass(frozen=True)
class InstanceRecord:
    """What the index keeps of one received instance (everything prior matching and analysis need)."""

    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    birth_date: str
    study_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_description: str
    series_uid: str
    modality: str
    body_part: str
    series_number: str
    series_description: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: str
    view_position: str
    laterality: str
    analysable: bool
    path: str
    size: int
    urgent: bool = False


def _insert_association(
    conn: Connection, calling_ae: str, called_ae: str, host: str, port: int, result: str, reason: str,
) -> int:
    now = time.time()
    row = conn.execute(
        associations.insert().values(
            calling_ae=calling_ae,
            called_ae=called_ae,
            peer_host=host,
            peer_port=port,
            started_at=now,
            ended_at=None if result == "accepted" else now,
            result=result,
            reason=reason,
        )
    )
    return int(row.inserted_primary_key[0])


def _end_association(conn: Connection, audit_id: int, result: str, received: int, failures: int, reason: str) -> None:
    conn.execute(
        update(associations)
        .where(associations.c.id == audit_id)
        .values(ended_at=time.time(), result=result, instances_received=received, failures=failures, reason=reason)
    )


# A new series' first instance, as warm_up writes it (and rolls it back).
_WARM_UP_RECORD = InstanceRecord(
    patient_id="warm-up", issuer_of_patient_id="", patient_name="", birth_date="", study_uid="0.0",
    study_date="", study_time="", accession_number="", study_description="", series_uid="0.0.0",
    modality="", body_part="", series_number="", series_description="", sop_instance_uid="0.0.0.0",
    sop_class_uid="", transfer_syntax_uid="", instance_number="", view_position="", laterality="",
    analysable=False, path="", size=0,
)


@dataclass(frozen=True)
class StudyActivity:
    """Assembly-relevant state of a study that is still receiving."""

    study_uid: str
    modality: str
    first_received_at: float
    last_received_at: float
    series_count: int
    reanalysis: bool


@dataclass(frozen=True)
class OutboxRow:
    id: int
    study_uid: str
    reason: str
    instance_set_hash: str
    instance_count: int
    created_at: float
    published_at: float | None
    attempts: int
    last_error: str


def _dialect_insert(dialect_name: str, table: Table):  # INSERT with ON CONFLICT support
    return (postgresql if dialect_name == "postgresql" else sqlite).insert(table)


def _insert(conn: Connection, table: Table):
    return _dialect_insert(conn.dialect.name, table)


# Only new images restart the idle timer or reopen a completed study; a report arriving
# later (e.g. our own SR routed back) is stored but triggers nothing.
_REOPENED = studies.c.state == "complete"
_STUDY_RECEIVED = (
    update(studies)
    .where(studies.c.study_uid == bindparam("b_study_uid"))
    .values(
        last_received_at=bindparam("b_now"),
        state="receiving",
        reanalysis=case((_REOPENED, True), else_=studies.c.reanalysis),
        first_received_at=case((_REOPENED, bindparam("b_now")), else_=studies.c.first_received_at),
        modality=case((studies.c.modality == "", bindparam("b_modality")), else_=studies.c.modality),
        urgent=studies.c.urgent | bindparam("b_urgent"),
    )
)


class _DriverStatement:
    """A statement compiled once for the engine's dialect and run as the driver's own SQL, for
    the two statements each received instance runs, where ``Connection.execute`` of the
    statement object cost about three times the driver's call. Values go through the same type
    processing (``bind_processor``). On SQLite the driver runs it directly on the transaction's
    connection, with the statement's own fixed values beside the given ones (SQLAlchemy's
    execution context around it was two thirds of the call; a file has no disconnects to
    handle), its errors wrapped as SQLAlchemy wraps them; so SQLAlchemy's statement logging
    (echo) and its cursor-execute and handle_error events do not see these two statements.
    Elsewhere ``construct_params`` and ``exec_driver_sql`` (errors wrapped and disconnects
    handled as for any statement)."""

    def __init__(self, statement, dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self._compiled = compiled
        self._sql = str(compiled)
        self._positions = compiled.positiontup if dialect.positional else None
        self._processors = {
            compiled.bind_names[bind]: processor
            for bind in compiled.binds.values()
            if (processor := bind.type.bind_processor(dialect)) is not None
        }
        # Values written into the statement itself (``state="receiving"``, a CASE's True).
        self._fixed = {compiled.bind_names[bind]: bind.effective_value for bind in compiled.binds.values()
                       if not bind.required and bind.callable is None}
        self._on_cursor = dialect.name == "sqlite" and self._positions is not None
        self._dbapi_error = dialect.loaded_dbapi.Error
        self._dialect = dialect

    def execute(self, conn: Connection, values: dict) -> int:
        """Run it with `values` (one for each of its bound names); the number of rows it
        inserted or changed."""
        params = self._fixed | values if self._on_cursor else self._compiled.construct_params(values)
        for name, processor in self._processors.items():
            params[name] = processor(params[name])
        if not self._on_cursor:
            ordered = tuple(params[name] for name in self._positions) if self._positions is not None else params
            return conn.exec_driver_sql(self._sql, ordered).rowcount
        ordered = tuple([params[name] for name in self._positions])
        try:
            return conn.connection.driver_connection.execute(self._sql, ordered).rowcount
        except self._dbapi_error as exc:
            raise DBAPIError.instance(self._sql, ordered, exc, self._dbapi_error, dialect=self._dialect) from exc


class Index:
    def __init__(self, url: str, fast_instance_commits: bool = False) -> None:
        """`fast_instance_commits`: instance rows (record_instances) are committed without
        waiting for the disk; only for a process that restores them after a power loss
        (the SCP: recovery.py, setting index_instance_commit)."""
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(url, connect_args=_connect_args(url))
        self._is_sqlite = self.engine.dialect.name == "sqlite"
        if self._is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        # SQLite has one writer at a time; serialising in-process avoids busy-wait retries, and a
        # lock file next to the database does the same between processes (several SCP
        # processes, workers): a writer waiting on it is woken when it is free, where SQLite's
        # busy handler sleeps 1, 2, 5, 10... ms between tries.
        self._write_lock = threading.Lock() if self._is_sqlite else None
        self._writer: Connection | None = None  # SQLite: the one connection writes go through
        self._writer_pid = 0
        self._writer_fast = False
        self.fast_instance_commits = fast_instance_commits
        self._file_lock = _FileLock(_lock_path(url) if self._is_sqlite else None)
        # The schema comes from dicom_node/migrations (Alembic): a new revision there for every
        # change to the tables above; tests/dicom_node/test_migrations.py checks they agree.
        migrations.upgrade(self.engine)
        # Series already written by this process: their patient/study/series rows exist.
        self._known_series: set[str] = set()
        # Built once: constructing a statement per instance cost more than executing it.
        self._insert_instance = _DriverStatement(
            _dialect_insert(self.engine.dialect.name, instances).on_conflict_do_nothing(index_elements=["sop_instance_uid"]),
            self.engine.dialect,
        )
        self._study_received = _DriverStatement(_STUDY_RECEIVED, self.engine.dialect)

    @contextmanager
    def _write(self, fast_commit: bool = False) -> Iterator[Connection]:
        """A write transaction. `fast_commit`: its commit returns without waiting for the disk
        (SQLite synchronous=NORMAL, PostgreSQL synchronous_commit off): it survives a crash of
        this process, not a power loss (recovery.py puts such instance rows back from the store)."""
        if self._write_lock is None:
            with self.engine.begin() as conn:
                if fast_commit:
                    conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                yield conn
            return
        with self._write_lock, self._file_lock:
            # SQLite: writes are serialised anyway, so they share one connection, kept open
            # (a pool check-out and check-in per transaction cost about a fifth of the commit).
            conn = self._writer_connection(fast_commit)
            try:
                with conn.begin():
                    yield conn
            except BaseException:
                self._close_writer()  # the next transaction starts on a fresh connection
                raise

    def _writer_connection(self, fast_commit: bool) -> Connection:
        if self._writer is None or self._writer_pid != os.getpid():  # never use one a fork inherited
            self._writer, self._writer_pid = self.engine.connect(), os.getpid()
            self._writer_fast = False  # the connect hook set synchronous=FULL
        if self._writer_fast != fast_commit:  # outside any transaction: takes effect for the next commit
            self._writer.connection.driver_connection.execute(
                f"PRAGMA synchronous={'NORMAL' if fast_commit else 'FULL'}")
            self._writer_fast = fast_commit
        return self._writer

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None and self._writer_pid == os.getpid():
            try:
                writer.close()
            except Exception:  # closing a broken connection: it is dropped all the same
                log.debug("index.writer_close_failed", exc_info=True)

    @property
    def write_lock_path(self) -> str | None:
        """The file the write lock is taken on; None: not SQLite, or in memory."""
        return self._file_lock.path

    # --- ingest -------------------------------------------------------------------------

    def newest_instance_received_at(self) -> float | None:
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(instances.c.received_at))).scalar()

    def instance_exists(self, sop_instance_uid: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(
                select(instances.c.sop_instance_uid).where(instances.c.sop_instance_uid == sop_instance_uid)
            ).first() is not None

    def record_instance(self, rec: InstanceRecord, now: float | None = None) -> bool:
        """Index one stored instance in a single transaction. Returns True if it was new."""
        return self.record_instances([rec], now)[0]

    def record_instances(self, recs: list[InstanceRecord], now: float | None = None) -> list[bool]:
        """Index stored instances in one transaction (a commit group); for each, whether it was new."""
        try:
            return self._record_instances(recs, now)
        except IntegrityError:
            if not any(rec.series_uid in self._known_series for rec in recs):
                raise
            # Another process deleted this series' rows (prior cache eviction) since this one
            # wrote them: forget them and write the parent rows again.
            for rec in recs:
                self._known_series.discard(rec.series_uid)
            return self._record_instances(recs, now)

    def _record_instances(self, recs: list[InstanceRecord], now: float | None) -> list[bool]:
        now = time.time() if now is None else now
        results = []
        with self._write(fast_commit=self.fast_instance_commits) as conn:
            written: set[str] = set()  # series whose parent rows this transaction wrote
            for rec in recs:
                if rec.series_uid not in self._known_series and rec.series_uid not in written:
                    self._insert_parents(conn, rec, now)
                    written.add(rec.series_uid)
                inserted = self._insert_instance.execute(
                    conn,
                    dict(
                        sop_instance_uid=rec.sop_instance_uid,
                        series_uid=rec.series_uid,
                        study_uid=rec.study_uid,
                        sop_class_uid=rec.sop_class_uid,
                        transfer_syntax_uid=rec.transfer_syntax_uid,
                        instance_number=rec.instance_number,
                        view_position=rec.view_position,
                        laterality=rec.laterality,
                        analysable=rec.analysable,
                        path=rec.path,
                        size=rec.size,
                        received_at=now,
                    ),
                )
                if inserted and rec.analysable:
                    self._study_received.execute(
                        conn, dict(b_study_uid=rec.study_uid, b_now=now, b_modality=rec.modality, b_urgent=rec.urgent),
                    )
                results.append(bool(inserted))
        if len(self._known_series) > KNOWN_SERIES_LIMIT:
            self._known_series.clear()  # bounded: memory stays flat however much arrives
        self._known_series.update(rec.series_uid for rec in recs)
        return results

    def _insert_parents(self, conn: Connection, rec: InstanceRecord, now: float) -> None:
        patient_key = self._upsert_patient(conn, rec)
        conn.execute(
            _insert(conn, studies)
            .values(
                study_uid=rec.study_uid,
                patient_key=patient_key,
                study_date=rec.study_date,
                study_time=rec.study_time,
                accession_number=rec.accession_number,
                study_description=rec.study_description,
                modality="",
                state="receiving",
                first_received_at=now,
                last_received_at=now,
            )
            .on_conflict_do_nothing(index_elements=["study_uid"])
        )
        conn.execute(
            _insert(conn, series)
            .values(
                series_uid=rec.series_uid,
                study_uid=rec.study_uid,
                modality=rec.modality,
                body_part=rec.body_part,
                series_number=rec.series_number,
                series_description=rec.series_description,
            )
            .on_conflict_do_nothing(index_elements=["series_uid"])
        )

    def _upsert_patient(self, conn: Connection, rec: InstanceRecord) -> int:
        stmt = (
            _insert(conn, patients)
            .values(
                patient_id=rec.patient_id,
                issuer=rec.issuer_of_patient_id,
                patient_name=rec.patient_name,
                birth_date=rec.birth_date,
            )
            .on_conflict_do_nothing(index_elements=["patient_id", "issuer"])
        )
        conn.execute(stmt)
        return conn.execute(
            select(patients.c.id).where(
                patients.c.patient_id == rec.patient_id, patients.c.issuer == rec.issuer_of_patient_id
            )
        ).scalar_one()

    def warm_up(self) -> None:
        """Run once what a fresh process would otherwise first run on its first association and
        series: SQLAlchemy compiles a statement the first time it executes it (then caches it
        for the engine), about 30 ms of CPU for the parent rows of a new series, the
        association's audit row and the study assembler's query. The writes are rolled back."""
        with self.engine.connect() as conn:
            transaction = conn.begin()
            try:
                self._insert_parents(conn, _WARM_UP_RECORD, time.time())
                audit_id = _insert_association(conn, "", "", "", 0, "accepted", "")
                _end_association(conn, audit_id, "released", 0, 0, "")
            finally:
                transaction.rollback()
        self.receiving_studies()

    # --- association audit ------------------------------------------------------------

    def open_association(self, calling_ae: str, called_ae: str, host: str, port: int, result: str, reason: str = "") -> int:
        """An association audit row. Only an accepted association stays open (close_association);
        any other result (rejected, cut before an association) is written ended, in one
        transaction, so that no reader sees it half-written."""
        with self._write() as conn:
            return _insert_association(conn, calling_ae, called_ae, host, port, result, reason)

    def close_association(self, audit_id: int, result: str, received: int, failures: int, reason: str = "") -> None:
        with self._write() as conn:
            _end_association(conn, audit_id, result, received, failures, reason)

    # --- PHI access audit (dicom_node.audit) ---------------------------------------------

    def record_phi_access(self, row: dict) -> None:
        with self._write() as conn:
            conn.execute(phi_access.insert().values(**row))

    def phi_accesses(self, study_uid: str | None = None, limit: int = 100) -> list[dict]:
        query = select(phi_access).order_by(phi_access.c.id.desc()).limit(limit)
        if study_uid:
            query = query.where(phi_access.c.study_uid == study_uid)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def patient_of(self, study_uid: str) -> str | None:
        """The PatientID of an indexed study (None when the study is not in the index)."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(patients.c.patient_id)
                .join(studies, studies.c.patient_key == patients.c.id)
                .where(studies.c.study_uid == study_uid)
            ).scalar_one_or_none()

    # --- study assembly ---------------------------------------------------------------

    def receiving_studies(self) -> list[StudyActivity]:
        series_count = (
            select(func.count(func.distinct(instances.c.series_uid)))
            .where(instances.c.study_uid == studies.c.study_uid, instances.c.analysable.is_(True))
            .scalar_subquery()
        )
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    studies.c.study_uid,
                    studies.c.modality,
                    studies.c.first_received_at,
                    studies.c.last_received_at,
                    series_count,
                    studies.c.reanalysis,
                ).where(studies.c.state == "receiving")
            ).all()
        return [StudyActivity(*row) for row in rows]

    def complete_study(self, study_uid: str, now: float | None = None) -> OutboxRow | None:
        """Mark a study complete and queue it for analysis, unless this instance set was queued before.

        Returns the new outbox row, or None when there is nothing new to analyse.
        """
        now = time.time() if now is None else now
        with self._write() as conn:
            study = conn.execute(
                select(studies.c.state).where(studies.c.study_uid == study_uid)
            ).first()
            if study is None or study.state != "receiving":
                return None
            if conn.execute(select(prior_studies.c.study_uid).where(prior_studies.c.study_uid == study_uid)).first():
                # A prior we fetched ourselves: kept for comparison, never analysed.
                conn.execute(
                    update(studies)
                    .where(studies.c.study_uid == study_uid)
                    .values(state="complete", completed_at=now, reanalysis=False, is_prior=True)
                )
                return None
            sop_uids = conn.execute(
                select(instances.c.sop_instance_uid)
                .where(instances.c.study_uid == study_uid, instances.c.analysable.is_(True))
                .order_by(instances.c.sop_instance_uid)
            ).scalars().all()
            conn.execute(
                update(studies)
                .where(studies.c.study_uid == study_uid)
                .values(state="complete", completed_at=now, reanalysis=False)
            )
            if not sop_uids:
                return None  # nothing an analysis could use (reports, presentation states...)
            set_hash = instance_set_hash(sop_uids)
            analysed_before = conn.execute(
                select(outbox.c.id).where(outbox.c.study_uid == study_uid).limit(1)
            ).first() is not None
            inserted = conn.execute(
                _insert(conn, outbox)
                .values(
                    study_uid=study_uid,
                    reason="reanalysis" if analysed_before else "complete",
                    instance_set_hash=set_hash,
                    instance_count=len(sop_uids),
                    created_at=now,
                )
                .on_conflict_do_nothing(index_elements=["study_uid", "instance_set_hash"])
                .execution_options(preserve_rowcount=True)  # see _insert_instance
            )
            if not inserted.rowcount:
                return None
            row = conn.execute(
                select(outbox).where(outbox.c.study_uid == study_uid, outbox.c.instance_set_hash == set_hash)
            ).one()
            return OutboxRow(**row._mapping)

    def mark_job_created(self, outbox_id: int) -> None:
        """The outbox row's job exists (published_at: when; the row is kept for audit)."""
        with self._write() as conn:
            conn.execute(update(outbox).where(outbox.c.id == outbox_id).values(published_at=time.time(), last_error=""))

    def outbox_rows(self, pending_only: bool = False) -> list[OutboxRow]:
        query = select(outbox).order_by(outbox.c.id)
        if pending_only:
            query = query.where(outbox.c.published_at.is_(None))
        with self.engine.connect() as conn:
            return [OutboxRow(**row._mapping) for row in conn.execute(query)]

    # --- priors -----------------------------------------------------------------------

    def mark_prior(self, study_uid: str, lease_seconds: float = 0.0, now: float | None = None) -> None:
        """Register a study as a fetched prior (call before retrieving it); renews its LRU time and lease."""
        now = time.time() if now is None else now
        with self._write() as conn:
            conn.execute(
                _insert(conn, prior_studies)
                .values(study_uid=study_uid, requested_at=now, last_used_at=now, in_use_until=now + lease_seconds)
                .on_conflict_do_update(
                    index_elements=["study_uid"], set_={"last_used_at": now, "in_use_until": now + lease_seconds}
                )
            )
            conn.execute(update(studies).where(studies.c.study_uid == study_uid).values(is_prior=True))

    # --- prior retrieval reads and cache eviction (dicom_node.priors) -------------------

    def study_overview(self, study_uid: str) -> dict | None:
        """A study with its patient fields and its series, each with the views, lateralities and
        instance counts of its instances: what prior matching needs of the current study."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(studies, patients.c.patient_id, patients.c.issuer, patients.c.patient_name, patients.c.birth_date)
                .join(patients, patients.c.id == studies.c.patient_key)
                .where(studies.c.study_uid == study_uid)
            ).first()
            if row is None:
                return None
            overview = dict(row._mapping)
            series_rows = conn.execute(select(series).where(series.c.study_uid == study_uid)).all()
            instance_rows = conn.execute(
                select(
                    instances.c.series_uid, instances.c.view_position, instances.c.laterality,
                    instances.c.analysable, instances.c.path,
                ).where(instances.c.study_uid == study_uid)
            ).all()
        by_series: dict[str, dict] = {}
        for srow in series_rows:
            entry = dict(srow._mapping)
            entry.update(views=set(), lateralities=set(), instance_count=0, analysable_count=0, paths=[])
            by_series[srow.series_uid] = entry
        for irow in instance_rows:
            entry = by_series.get(irow.series_uid)
            if entry is None:
                continue
            entry["instance_count"] += 1
            entry["analysable_count"] += int(bool(irow.analysable))
            entry["paths"].append(irow.path)
            if irow.view_position:
                entry["views"].add(irow.view_position)
            if irow.laterality:
                entry["lateralities"].add(irow.laterality)
        overview["series"] = list(by_series.values())
        return overview

    def prior_cache(self) -> list[dict]:
        """Fetched prior studies (LRU order) with their bytes on disk and lease. A study that was ever
        queued for analysis is left out: it arrived as a current study and is never evicted as a prior."""
        size = (
            select(func.coalesce(func.sum(instances.c.size), 0))
            .where(instances.c.study_uid == prior_studies.c.study_uid)
            .scalar_subquery()
        )
        analysed = select(outbox.c.id).where(outbox.c.study_uid == prior_studies.c.study_uid).exists()
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(prior_studies, size.label("bytes"))
                .where(~analysed)
                .order_by(prior_studies.c.last_used_at, prior_studies.c.study_uid)
            ).all()
        return [dict(row._mapping) for row in rows]

    def release_prior(self, study_uid: str, now: float | None = None) -> None:
        """End a prior's lease early (the comparison that used it is done); it stays cached."""
        now = time.time() if now is None else now
        with self._write() as conn:
            conn.execute(
                update(prior_studies)
                .where(prior_studies.c.study_uid == study_uid, prior_studies.c.in_use_until > now)
                .values(in_use_until=now)
            )

    def delete_prior_study(self, study_uid: str, now: float | None = None) -> list[str]:
        """Remove a fetched prior's instance, series, study and prior_studies rows in one transaction
        and return its file paths (the caller deletes the files after the commit). Does nothing and
        returns [] when the study is leased, was ever queued for analysis, or is not a fetched prior."""
        now = time.time() if now is None else now
        with self._write() as conn:
            entry = conn.execute(select(prior_studies).where(prior_studies.c.study_uid == study_uid)).first()
            if entry is None or entry.in_use_until > now:
                return []
            if conn.execute(select(outbox.c.id).where(outbox.c.study_uid == study_uid).limit(1)).first():
                return []
            paths = conn.execute(select(instances.c.path).where(instances.c.study_uid == study_uid)).scalars().all()
            series_uids = conn.execute(select(series.c.series_uid).where(series.c.study_uid == study_uid)).scalars().all()
            conn.execute(instances.delete().where(instances.c.study_uid == study_uid))
            conn.execute(series.delete().where(series.c.study_uid == study_uid))
            conn.execute(studies.delete().where(studies.c.study_uid == study_uid))
            conn.execute(prior_studies.delete().where(prior_studies.c.study_uid == study_uid))
        # Rows of these series must be written again if the study is ever fetched anew.
        self._known_series.difference_update(series_uids)
        return list(paths)

    # --- status -----------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            def count(query) -> int:
                return int(conn.execute(query).scalar_one())

            return {
                "patients": count(select(func.count()).select_from(patients)),
                "studies": count(select(func.count()).select_from(studies)),
                "studies_receiving": count(select(func.count()).where(studies.c.state == "receiving")),
                "studies_complete": count(select(func.count()).where(studies.c.state == "complete")),
                "series": count(select(func.count()).select_from(series)),
                "instances": count(select(func.count()).select_from(instances)),
                "outbox_pending": count(select(func.count()).where(outbox.c.published_at.is_(None))),
                "associations": count(select(func.count()).select_from(associations)),
                "associations_rejected": count(select(func.count()).where(associations.c.result == "rejected")),
            }

    def recent_associations(self, limit: int = 10) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(associations).order_by(associations.c.id.desc()).limit(limit))
            return [dict(row._mapping) for row in rows]

    def study_instances(self, study_uid: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(instances).where(instances.c.study_uid == study_uid))
            return [dict(row._mapping) for row in rows]

    def study(self, study_uid: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(studies).where(studies.c.study_uid == study_uid)).first()
            return dict(row._mapping) if row else None

    def dispose(self) -> None:
        if self._write_lock is not None:
            with self._write_lock:
                self._close_writer()
                self._file_lock.close()
        self.engine.dispose()


def instance_set_hash(sop_uids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(sop_uids)).encode()).hexdigest()


def _lock_path(url: str) -> str | None:
    path = url.removeprefix("sqlite:///")
    if not url.startswith("sqlite:///") or not path or path == ":memory:":
        return None
    return path + ".write-lock"


class _FileLock:
    """An exclusive flock(2) on a file next to the database for the duration of a write
    transaction (path None: no-op). The file stays open between transactions: an open and a
    close per commit cost a path walk and, under load, two hand-offs of the GIL. A forked
    process opens its own, since an inherited descriptor shares its lock with the parent's.
    One thread at a time (Index._write_lock)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._fd = -1
        self._pid = 0  # the process that opened _fd

    def __enter__(self) -> "_FileLock":
        if self.path is not None:
            if self._pid != os.getpid():
                if self._fd >= 0:
                    os.close(self._fd)  # the parent's: closing this copy leaves the parent's lock alone
                self._fd, self._pid = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640), os.getpid()
            gil_held.lock_exclusive(self._fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            gil_held.unlock(self._fd)

    def close(self) -> None:
        if self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid = -1, 0


def _connect_args(url: str) -> dict:
    if url.startswith("sqlite"):
        # Association threads share the engine; SQLite's own locking is serialised by Index._write.
        return {"check_same_thread": False, "timeout": 30}
    return {}


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # the C-STORE success promises the row survives a crash
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
