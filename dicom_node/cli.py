"""The `dicom-node` command line."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import audit
from .config import load_settings
from .logs import configure_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, help="PACS-integrated DICOM inference node.")


from .references.cli import app as _references_app  # noqa: E402

app.add_typer(_references_app, name="references")


def _compare_references(current: Path, library: Path, as_json: bool) -> None:
    from inference.errors import InputError

    from .references.cli import compare_against_library, print_reference_result
    from .references.library import ReferenceRefused

    try:
        result, _ = compare_against_library(current, library)
    except (InputError, ReferenceRefused) as exc:
        typer.echo(f"cannot compare: {exc}", err=True)
        raise typer.Exit(2)
    print_reference_result(result, as_json)


@app.callback()
def _every_command(ctx: typer.Context) -> None:
    audit.set_role(f"dicom-node {ctx.invoked_subcommand}")  # the actor in PHI access audit rows


@app.command()
def serve(
    dispatch: Annotated[bool, typer.Option(help="coordinate the pipeline: create jobs, republish stalled ones (Redis)")] = True,
) -> None:
    """Run the DICOM SCP (C-ECHO, C-STORE), the study assembler and the pipeline coordinator until SIGTERM/SIGINT."""
    import shutil

    from .scp_processes import ExtraListeners, share_metrics

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    metrics_dir = share_metrics() if settings.scp_processes > 1 else None  # before prometheus_client loads

    from .scp import DicomNode
    from .startup import freeze_startup_heap, prepare, warn_about_configuration

    prepare(settings)
    warn_about_configuration(settings)
    node = DicomNode(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    coordinator = None
    if dispatch:
        from .pipeline.reconciler import Coordinator

        # Built (Celery and the stages imported, ~0.3 s of CPU) before the port opens: the first
        # images after a start-up must not wait on it.
        coordinator = Coordinator(node.index, settings)
    node.start()
    listeners = None
    if node.front_door.handoff is not None:  # scp_processes > 1: start the other scp_processes - 1
        listeners = ExtraListeners(settings, node.front_door.counts, node.front_door.handoff)
        listeners.start()
    if coordinator:
        coordinator.start()
    freeze_startup_heap()
    stop.wait()
    if coordinator:
        coordinator.stop()
    if listeners:
        listeners.stop()
    node.stop()
    if metrics_dir:
        shutil.rmtree(metrics_dir, ignore_errors=True)


@app.command("scp-listener", hidden=True)
def scp_listener(
    counts_fd: Annotated[int, typer.Option(help="the socket to the first process, which keeps the connection counts")],
    connections_fd: Annotated[int, typer.Option(help="the socket the first process passes connections over")],
) -> None:
    """One of the extra SCP processes `serve` starts when scp_processes > 1 (not for direct use)."""
    from .scp_processes import run_listener

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    run_listener(settings, counts_fd, connections_fd)


@app.command()
def worker(
    queues: Annotated[str, typer.Option("--queues", "-Q", help="io, gpu, or io,gpu")] = "io",
    concurrency: Annotated[Optional[int], typer.Option("--concurrency", "-c", help="default: 1 for gpu, 2 for io")] = None,
    hostname: Annotated[Optional[str], typer.Option("--hostname", "-n")] = None,
    pool: Annotated[Optional[str], typer.Option(help="prefork (default), or threads to batch VLM comparisons (default for gpu with vlm_backend openai)")] = None,
    restart_on_exit: Annotated[bool, typer.Option(help="run the worker in a child process and restart it when it exits non-zero or its heartbeat goes stale (hosts without a supervisor)")] = False,
) -> None:
    """Run a Celery worker for the pipeline queues (prefetch 1, tasks acknowledged late).

    It retries a lost broker forever; what it cannot recover from exits non-zero. Its liveness
    is `dicom-node worker-alive`."""
    from .pipeline import worker as worker_process

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    from .startup import prepare, warn_about_configuration

    prepare(settings)
    warn_about_configuration(settings)
    served = "gpu" in queues.split(",") and settings.vlm_backend == "openai"
    # A model server batches what is in flight: the gpu worker keeps vlm_max_concurrency requests going (threads).
    pool = pool or ("threads" if served else "prefork")
    concurrency = concurrency or (settings.vlm_max_concurrency if served else None)
    if restart_on_exit:
        name = worker_process.node_name(hostname)
        argv = ["worker", "-Q", queues, "--pool", pool, "--hostname", name] + (["-c", str(concurrency)] if concurrency else [])
        raise typer.Exit(worker_process.supervise(worker_process.worker_command(argv), worker_process.heartbeat_path(settings, name),
                                                  settings.worker_heartbeat_max_age_seconds))
    from . import patches
    from .pipeline.app import configure

    patches.apply()
    celery_app = configure(settings)
    worker_process.install_liveness(celery_app, settings)
    # One comparison per GPU at a time: the model fills the device.
    default = 1 if "gpu" in queues.split(",") else 2
    argv = ["worker", "-Q", queues, "-c", str(concurrency or default), "-P", pool, "--prefetch-multiplier", "1", "-l", settings.log_level]
    if hostname:
        argv += ["-n", hostname]
    raise typer.Exit(worker_process.run_worker(celery_app, argv))


@app.command("worker-alive")
def worker_alive(
    hostname: Annotated[Optional[str], typer.Option("--hostname", "-n", help="the worker's --hostname (%h allowed); default: every worker named ...@<this host>")] = None,
    max_age: Annotated[Optional[float], typer.Option(help="seconds without progress before a worker is not alive (default: setting worker_heartbeat_max_age_seconds)")] = None,
) -> None:
    """Liveness of a worker on this host: exit 0 if its consumer consumed or reconnected recently, 1 if not."""
    from .pipeline import worker as worker_process

    settings = load_settings()
    limit = max_age if max_age is not None else settings.worker_heartbeat_max_age_seconds
    directory = worker_process.heartbeat_dir(settings)
    paths = [worker_process.heartbeat_path(settings, hostname)] if hostname else worker_process.heartbeats_for_this_host(directory)
    if not paths:
        typer.echo(f"not alive: no worker heartbeat for this host in {directory}", err=True)
        raise typer.Exit(1)
    results = [worker_process.check_heartbeat(path, limit) for path in paths]
    for result in results:
        typer.echo(result.message if result.ok else f"not alive: {result.message}", err=not result.ok)
    raise typer.Exit(0 if all(result.ok for result in results) else 1)


@app.command()
def jobs(
    state: Annotated[Optional[str], typer.Option(help="only jobs in this state")] = None,
    limit: int = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List pipeline jobs with their state, stage timings and last error."""
    from .pipeline.runtime import Runtime

    rt = Runtime.build(load_settings())
    rows = rt.jobs.list(limit, state)
    if as_json:
        typer.echo(json.dumps([job.__dict__ for job in rows], indent=2, default=str))
        return
    for job in rows:
        seconds = {stage: round(t["finished"] - t["started"], 2) for stage, t in job.timings.items() if "finished" in t and "started" in t}
        typer.echo(f"{job.job_key}  {job.state:10} {job.priority:7} study={job.study_uid} attempts={job.attempts} seconds={seconds}")
        if job.last_error:
            retrying = "" if job.finished else f", next attempt in {max(0.0, job.next_attempt_at - time.time()):.0f} s"
            typer.echo(f"    last error ({job.error_class or 'superseded'}{retrying}): {job.last_error}")


@app.command()
def deliveries(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Reports waiting in the delivery outbox, with their destination, attempts and last error."""
    from .index import Index
    from .pipeline.reporting import queue_for

    settings = load_settings()
    queue = queue_for(settings, Index(settings.database_url))
    rows = queue.pending()
    if as_json:
        typer.echo(json.dumps({"counts": queue.counts(), "pending": [row.__dict__ for row in rows]}, indent=2, default=str))
        return
    typer.echo(f"deliveries: {queue.counts()}")
    for row in rows:
        typer.echo(f"  {row.sop_instance_uid} -> {row.destination}: {row.status}, attempts {row.attempts}, last error: {row.last_error or '-'}")


@app.command()
def retry(job_key: str) -> None:
    """Run a failed job again from the start (same inputs, same output UIDs)."""
    from .pipeline.app import configure
    from .pipeline.runtime import Runtime
    from .pipeline.tasks import retry_job

    settings = load_settings()
    configure(settings)
    job = retry_job(Runtime.build(settings), job_key)
    if job is None:
        typer.echo(f"no job {job_key}", err=True)
        raise typer.Exit(2)
    typer.echo(f"job {job_key} queued again")


@app.command("audit")
def audit_log(
    study: Annotated[Optional[str], typer.Option("--study", help="only this study's accesses")] = None,
    limit: Annotated[int, typer.Option("--limit")] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """PHI accesses, newest first: who queried, read or sent whose data, and to whom."""
    from .index import Index

    index = Index(load_settings().database_url)
    rows = index.phi_accesses(study, limit)
    index.dispose()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        peer = f" -> {row['peer']}" if row["peer"] else ""
        typer.echo(f"{_utc(row['at'])}  {row['action']:16} {row['study_uid']}  patient {row['patient'] or '-'}{peer}\n"
                   f"    by {row['actor']}: {row['detail']}")


@app.command()
def pseudonym(
    patient_id: str,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The pseudonym of PATIENT_ID in logs and audit rows, under every key in pseudonym_key_file
    (current key first), to find a patient's rows from before and after a key rotation."""
    from . import pseudonyms

    settings = load_settings()
    try:
        keys = pseudonyms.load(settings.pseudonym_key_file, settings.storage_dir, create=False)
    except pseudonyms.PseudonymKeyError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2)
    values = keys.all_pseudonyms(patient_id)
    if as_json:
        typer.echo(json.dumps(values, indent=2))
        return
    for key_id, value in values.items():
        typer.echo(f"{value}{'  (current key)' if key_id == keys.current.key_id else ''}")


def _utc(epoch: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


@app.command()
def priors(
    study_uid: str,
    series: Annotated[Optional[list[str]], typer.Option("--series", help="current series being analysed")] = None,
) -> None:
    """Print every prior candidate of STUDY_UID with the rule that kept or dropped it (queries only)."""
    from .priors import ArchiveUnavailable, RetrieveRefused, explain_priors

    try:
        typer.echo(explain_priors(load_settings(), study_uid, series or None))
    except LookupError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2)
    except (ArchiveUnavailable, RetrieveRefused) as exc:
        typer.echo(f"priors failed: {exc}", err=True)
        raise typer.Exit(3)


def _deformable(choice: str | None) -> bool:
    choice = choice or load_settings().analysis_registration
    if choice not in ("affine", "bspline"):
        typer.echo(f"--registration must be affine or bspline, not {choice!r}", err=True)
        raise typer.Exit(2)
    return choice == "bspline"


@app.command()
def compare(
    current: Annotated[Path, typer.Argument(help="DICOM file or folder (a volume's slices) of the current study")],
    priors: Annotated[Optional[list[Path]], typer.Argument(help="DICOM file or folder of each prior study, any order: the most "
                                                       "recent usable one is compared with, every one is measured on")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    overlay: Annotated[Optional[Path], typer.Option(help="write the change heat map as PNG")] = None,
    registration: Annotated[Optional[str], typer.Option(
        help="affine or bspline (radiographs; volumes are always rigid); default: the analysis_registration setting")] = None,
    vlm: Annotated[bool, typer.Option("--vlm", help="also run the configured model (vlm_model / vlm_backend, or a model server)")] = False,
    references: Annotated[Optional[Path], typer.Option(
        help="no prior: compare against the normal reference library in this folder (see dicom-node references)")] = None,
) -> None:
    """Compare two images or volumes offline (no network, but a configured model server) with the analysis engine."""
    if not priors:
        if references is None:
            typer.echo("give a PRIOR, or --references DIR to compare against normal references", err=True)
            raise typer.Exit(2)
        _compare_references(current, references, as_json)
        return
    import inference
    from inference.errors import InputError
    from inference.overlay import save_overlay_png
    from inference.pixels import load_path
    from inference.serialize import result_to_dict

    try:
        current_image, prior_images = load_path(current), [load_path(p) for p in priors]
        result = inference.compare(current_image, prior_images, deformable=_deformable(registration))
        prior_image = next((p for p in prior_images if p.source == result.prior_source), prior_images[0])
    except InputError as exc:
        typer.echo(f"cannot compare: {exc}", err=True)
        raise typer.Exit(2)
    if overlay is not None:
        save_overlay_png(result, overlay)
    reading = None
    if vlm:
        from .pipeline.vlm import offline_reading

        reading = offline_reading(load_settings(), current_image, prior_image, result)
    if as_json:
        doc = result_to_dict(result)
        if reading is not None:
            doc["vlm"] = reading.to_dict()
        typer.echo(json.dumps(doc, indent=2, default=str))
        return
    typer.echo(result.summary)
    for flag in result.sanity_flags:
        typer.echo(f"  sanity: {flag.code}{' (refused)' if flag.blocking else ''}: {flag.reason}")
    for line in result.findings:
        typer.echo(f"  - {line}")
    if reading is not None:
        typer.echo(reading.text())


@app.command()
def models(
    root: Annotated[Optional[Path], typer.Option(help="model repository (default: settings models_root)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List the model repository and whether each model is ready (weights present, engine built)."""
    from inference.vlm import list_models

    statuses = list_models(root or load_settings().models_root)
    if as_json:
        typer.echo(json.dumps([s.to_dict() for s in statuses], indent=2, default=str))
        return
    for s in statuses:
        typer.echo(f"{s.name:28} {s.family:12} weights={'yes' if s.weights_present else 'no':3} engine={'yes' if s.engine_ready else 'no':3} {s.detail}")


@app.command("build-engine")
def build_engine(
    model: str,
    root: Annotated[Optional[Path], typer.Option(help="model repository (default: settings models_root)")] = None,
    force: bool = False,
) -> None:
    """Export the vision encoder to ONNX and build its TensorRT engine into the model's cache."""
    from inference.vlm import VLMError, build_engine as do_build, resolve_model

    try:
        result = do_build(resolve_model(model, root or load_settings().models_root), force=force)
    except VLMError as exc:
        typer.echo(f"build-engine failed: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{'built' if result.built else 'already built'}: {result.directory} (key {result.key})")


@app.command()
def echo(
    host: str,
    port: int,
    called_ae: Annotated[str, typer.Option("--called-ae", "-c", help="AE title of the peer")] = "ANY-SCP",
    calling_ae: Annotated[Optional[str], typer.Option("--calling-ae", "-a", help="our AE title (default: settings)")] = None,
) -> None:
    """C-ECHO a peer."""
    from .scu import AssociationFailed, Peer
    from .scu import echo as do_echo

    settings = load_settings()
    try:
        status = do_echo(Peer(host, port, called_ae), calling_ae or settings.ae_title)
    except AssociationFailed as exc:
        typer.echo(f"echo failed: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"C-ECHO {called_ae}@{host}:{port}: status 0x{status:04X}")
    raise typer.Exit(0 if status == 0 else 1)


@app.command()
def send(
    host: str,
    port: int,
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched recursively)")],
    called_ae: Annotated[str, typer.Option("--called-ae", "-c")] = "ANY-SCP",
    calling_ae: Annotated[Optional[str], typer.Option("--calling-ae", "-a")] = None,
    decompress: Annotated[bool, typer.Option(
        "--decompress/--no-decompress",
        help="where the peer accepts a SOP class only uncompressed, decode compressed files and send them so "
             "(--no-decompress: such files fail as refused)")] = True,
) -> None:
    """C-STORE files and folders to a peer, as stored; goes on after refusals and ends with a summary.

    Exit status: 0 all sent (or skipped as not DICOM), 1 some failed, 2 no association could be made."""
    from collections import Counter

    from .scu import Peer
    from .scu import send as do_send

    settings = load_settings()
    report = do_send(Peer(host, port, called_ae), paths, calling_ae or settings.ae_title, decompress=decompress)
    for path, reason in report.skipped:
        typer.echo(f"skipped {path}: {reason}", err=True)
    for path, how in report.converted:
        typer.echo(f"converted {path}: {how}")
    for path, status in report.warned:
        typer.echo(f"warning {path}: {status}")
    for path, reason in report.failed:
        typer.echo(f"FAILED {path}: {reason}", err=True)
    for reason in report.association_failures:
        typer.echo(f"send failed: {reason}", err=True)
    typer.echo(f"sent {report.sent} ({report.warnings} with warnings, {len(report.converted)} converted), "
               f"failed {len(report.failed)}, skipped {len(report.skipped)}, "
               f"associations {report.associations}")
    if report.failed:
        typer.echo("failures by reason:")
        for reason, count in Counter(reason for _, reason in report.failed).most_common():
            typer.echo(f"  {count} x {reason}")
    if report.association_failures and not report.associations:
        raise typer.Exit(2)
    raise typer.Exit(1 if report.failed else 0)


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Counts from the index, jobs by state, pending outbox rows and the latest associations."""
    from .index import Index
    from .pipeline.jobs import JobStore

    settings = load_settings()
    index = Index(settings.database_url)
    data = {
        "ae_title": settings.ae_title,
        "port": settings.port,
        "storage_dir": str(settings.storage_dir),
        "counts": index.counts(),
        "jobs_by_state": JobStore(index).counts(),
        "outbox_pending": [row.__dict__ for row in index.outbox_rows(pending_only=True)],
        "recent_associations": index.recent_associations(),
    }
    index.dispose()
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    typer.echo(f"node {settings.ae_title} port {settings.port}, store {settings.storage_dir}")
    for key, value in data["counts"].items():
        typer.echo(f"  {key:22} {value}")
    typer.echo("  jobs: " + (", ".join(f"{n} {state}" for state, n in sorted(data["jobs_by_state"].items())) or "none"))
    if data["jobs_by_state"].get("failed"):
        typer.echo("  failed jobs need a look: dicom-node jobs --state failed")
    for row in data["recent_associations"]:
        typer.echo(
            f"  assoc #{row['id']} {row['calling_ae']}@{row['peer_host']} {row['result']}"
            f" received={row['instances_received']} failures={row['failures']} {row['reason']}"
        )


@app.command()
def quickstart(
    stop: Annotated[bool, typer.Option("--stop", help="stop what an earlier quickstart started")] = False,
    workdir: Annotated[Path, typer.Option(help="where the quickstart keeps its services' data and logs")] = Path("var/quickstart"),
    change: Annotated[str, typer.Option(help="the synthetic change in the new study, e.g. new_nodule, stable")] = "new_nodule",
) -> None:
    """Run the whole product end to end on loopback: PACS, routing, priors, comparison, SR back in the PACS."""
    from .local_stack import quickstart as qs

    if stop:
        stopped = qs.stop(workdir)
        typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return
    try:
        typer.echo(qs.run(workdir, change, echo=typer.echo))
    except (RuntimeError, TimeoutError) as exc:
        typer.echo(f"quickstart failed: {exc}\nlogs: {workdir}/*.log", err=True)
        raise typer.Exit(1)
