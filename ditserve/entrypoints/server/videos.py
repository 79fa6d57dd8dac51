"""Asynchronous video jobs: a small SQLite store, with each finished MP4 under ``--output-dir``.

A job is a row from the moment it is accepted. After a restart, finished jobs are still listed and
downloadable, and jobs that were queued or running are marked failed with the reason (the engine's work died
with the old process). Ids are ours (128 random bits) and validated before use: no path is ever built from
what a client sent.

One server per folder: the store holds an exclusive lock on ``<folder>/server.lock`` while it is open, and a
second server on the same folder refuses to start. Why a lock rather than a server id on each row: a
restarted server must fail the jobs its dead predecessor left running, and with ids it could not tell a dead
predecessor's rows from a live neighbour's without a liveness check of its own; the kernel releases a lock
when its process dies (kill -9 included), so holding the lock means every unfinished row is an orphan.

A job's status only moves forward (queued -> in_progress -> completed or failed); a write that fails (disk
full) ends the job failed with the error, removes its partial file, and marks the store degraded (``/health``)
until a write succeeds again. Finished jobs older than the retention period are removed with their files.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fastapi.concurrency import run_in_threadpool

from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.media import output_video_bytes
from ditserve.entrypoints.server.errors import APIError, api_error_from_engine
from ditserve.entrypoints.server.protocol import VIDEO_ID_PATTERN, VideoObject, json_safe
from ditserve.errors import DitServeError, InvalidParameterError, RequestAbortedError
from ditserve.request import Request, RequestOutput

logger = logging.getLogger(__name__)

DATABASE_NAME = "videos.sqlite3"
VIDEO_FOLDER = "videos"
LOCK_NAME = "server.lock"
PARTIAL_SUFFIX = ".mp4.partial"
ACTIVE_STATUSES = ("queued", "in_progress")
FINISHED_STATUSES = ("completed", "failed")
#: the stages a job's ``stage_durations`` reports, from the engine's ``<stage>_s`` timings
STAGES = ("encode", "denoise", "decode")
#: columns added after the first release: a folder written by an older server gets them when it is opened
ADDED_COLUMNS = {"peak_memory_mb": "REAL"}


def write_file(path: Path, data: bytes) -> None:
    """The one place video bytes reach the disk (tests replace it to simulate a full disk)."""
    path.write_bytes(data)


def describe_os_error(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "the disk of the output directory is full"
    return f"the output directory could not be written: {error.strerror or error}"


def new_video_id() -> str:
    return f"video_{secrets.token_hex(16)}"


def accelerator_peak_mb() -> float:
    """The CUDA device's peak allocated memory in this process, in MiB; 0 without CUDA (no accelerator memory
    was used). Requests share steps (batching), so a per-request peak does not exist: this is the process's
    peak so far."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def stage_durations(timings: dict[str, float] | None) -> dict[str, float]:
    """Seconds per stage (``STAGES``) from the engine's ``<stage>_s`` timings."""
    timings = timings or {}
    return {stage: timings[f"{stage}_s"] for stage in STAGES if f"{stage}_s" in timings}


def check_video_id(video_id: str) -> str:
    if re.fullmatch(VIDEO_ID_PATTERN, video_id) is None:
        raise APIError(400, "video_id must be 'video_' followed by 32 hex digits, as returned by POST /v1/videos",
                       param="video_id", code="invalid_video_id")
    return video_id


@dataclass
class VideoJob:
    id: str
    created_at: int
    status: str
    model: str
    prompt: str
    size: str
    seconds: str
    num_frames: int | None = None
    fps: int | None = None
    progress: int = 0
    completed_at: int | None = None
    inference_time_s: float | None = None
    seed: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    timings: dict[str, float] | None = None
    cache_stats: dict[str, Any] | None = None
    peak_memory_mb: float | None = None
    #: set by the store (creation order, the cursor of listings)
    seq: int | None = field(default=None, repr=False)

    def to_api(self, ttl_s: float | None = None, ignored_fields: list[str] | None = None) -> VideoObject:
        """The job as the API shows it; ``ttl_s``: the store's retention (sets ``expires_at`` once finished)."""
        error = {"code": self.error_code, "message": self.error_message or ""} if self.error_code else None
        values = {k: v for k, v in asdict(self).items() if k not in ("error_code", "error_message", "seq")}
        # a job not finished, or finished by a server that did not record it, has no measured peak: 0
        values["peak_memory_mb"] = self.peak_memory_mb or 0.0
        expires_at = int(self.completed_at + ttl_s) if ttl_s is not None and self.completed_at is not None else None
        return VideoObject(**values, error=error, stage_durations=stage_durations(self.timings) or None,
                           expires_at=expires_at,
                           file_name=f"{self.id}.mp4" if self.status == "completed" else None,
                           ignored_fields=ignored_fields)


_JSON_COLUMNS = ("timings", "cache_stats")
_COLUMNS = tuple(f.name for f in fields(VideoJob) if f.name != "seq")


class VideoStore:
    """Rows of video jobs in SQLite (one connection, serialised by a lock: the engine thread reports progress
    while the event loop reads) and their files in ``<directory>/videos/<id>.mp4``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        """Open (creating it) and lock the folder; an unusable or already used folder is an
        ``InvalidParameterError`` naming ``output_dir``, raised before anything else is done with it."""
        self.directory = Path(directory)
        self.files = self.directory / VIDEO_FOLDER
        #: why writes fail, while they do (reported by /health); None when the last write succeeded
        self.degraded: str | None = None
        try:
            self.files.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.directory / LOCK_NAME, "a+")  # noqa: SIM115 - held open while the store is
        except OSError as error:
            raise InvalidParameterError(f"output_dir {str(self.directory)!r} is not usable: "
                                        f"{error.strerror or error}", param="output_dir") from None
        self._take_lock()
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.directory / DATABASE_NAME, check_same_thread=False,
                                       isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS videos (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, "
                "created_at INTEGER, status TEXT, model TEXT, prompt TEXT, size TEXT, seconds TEXT, "
                "num_frames INTEGER, fps INTEGER, progress INTEGER, completed_at INTEGER, inference_time_s REAL, "
                "seed INTEGER, error_code TEXT, error_message TEXT, timings TEXT, cache_stats TEXT)")
            present = {row["name"] for row in self._db.execute("PRAGMA table_info(videos)")}
            for name, kind in ADDED_COLUMNS.items():
                if name not in present:
                    self._db.execute(f"ALTER TABLE videos ADD COLUMN {name} {kind}")
        except sqlite3.Error as error:
            self._lock_file.close()
            raise InvalidParameterError(f"output_dir {str(self.directory)!r}: its job database is not usable "
                                        f"({error})", param="output_dir") from None
        for partial in self.files.glob(f"*{PARTIAL_SUFFIX}"):
            partial.unlink(missing_ok=True)  # left by a crash mid-write: the folder is ours alone

    def _take_lock(self) -> None:
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.seek(0)
            owner = self._lock_file.read().strip() or "unknown"
            self._lock_file.close()
            raise InvalidParameterError(
                f"output_dir {str(self.directory)!r} is in use by another ditserve server (pid {owner}); give each "
                "server its own --output-dir", param="output_dir") from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()

    def video_path(self, video_id: str) -> Path:
        return self.files / f"{check_video_id(video_id)}.mp4"

    def fail_interrupted(self, code: str, message: str) -> int:
        """Mark every queued or running job failed (their work died with the process); returns how many."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE videos SET status='failed', error_code=?, error_message=?, completed_at=? "
                "WHERE status IN (?, ?)", (code, message, int(time.time()), *ACTIVE_STATUSES))
            return cursor.rowcount

    def insert(self, job: VideoJob) -> None:
        row = self._encode(asdict(job))
        with self._lock:
            self._db.execute(f"INSERT INTO videos ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                             [row[c] for c in _COLUMNS])

    def finish(self, video_id: str, status: str, **values: Any) -> bool:
        """End a queued or running job as ``completed`` or ``failed`` with some more columns; False when it is
        gone (deleted meanwhile) or already ended: a status never moves back, nor from failed to completed."""
        if status not in FINISHED_STATUSES:
            raise ValueError(f"finish() takes a final status {FINISHED_STATUSES}, not {status!r}")
        unknown = set(values) - set(_COLUMNS)
        if unknown:
            raise KeyError(f"unknown video job columns {sorted(unknown)}")
        row = self._encode({**values, "status": status})
        assignments = ", ".join(f"{name}=?" for name in row)
        with self._lock:
            cursor = self._db.execute(f"UPDATE videos SET {assignments} WHERE id=? AND status IN (?, ?)",
                                      [*row.values(), video_id, *ACTIVE_STATUSES])
            return cursor.rowcount > 0

    def expire(self, finished_before: float) -> int:
        """Remove the finished jobs (rows and files) that ended before ``finished_before``; returns how many."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM videos WHERE status IN (?, ?) AND completed_at < ?",
                                    (*FINISHED_STATUSES, finished_before)).fetchall()
        for row in rows:
            self.delete(row["id"])
        return len(rows)

    def update_progress(self, video_id: str, percent: int) -> None:
        """Progress of a job that is still queued or running (never revives one marked failed meanwhile)."""
        with self._lock:
            self._db.execute("UPDATE videos SET status='in_progress', progress=? WHERE id=? AND status IN (?, ?)",
                             (percent, video_id, *ACTIVE_STATUSES))

    def get(self, video_id: str) -> VideoJob | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM videos WHERE id=?", (check_video_id(video_id),)).fetchone()
        return self._decode(row) if row is not None else None

    def list(self, after: str | None, limit: int, order: str) -> tuple[list[VideoJob], bool]:
        """A page of jobs in creation order (``asc``) or newest first (``desc``), after the job ``after``."""
        direction, compare = ("ASC", ">") if order == "asc" else ("DESC", "<")
        with self._lock:
            if after is None:
                rows = self._db.execute(f"SELECT * FROM videos ORDER BY seq {direction} LIMIT ?",
                                        (limit + 1,)).fetchall()
            else:
                cursor_row = self._db.execute("SELECT seq FROM videos WHERE id=?", (after,)).fetchone()
                if cursor_row is None:
                    raise APIError(400, f"after={after!r} is not the id of a listed video", param="after",
                                   code="invalid_parameter")
                rows = self._db.execute(f"SELECT * FROM videos WHERE seq {compare} ? ORDER BY seq {direction} "
                                        "LIMIT ?", (cursor_row["seq"], limit + 1)).fetchall()
        jobs = [self._decode(row) for row in rows]
        return jobs[:limit], len(jobs) > limit

    def delete(self, video_id: str) -> bool:
        with self._lock:
            cursor = self._db.execute("DELETE FROM videos WHERE id=?", (check_video_id(video_id),))
        self.video_path(video_id).unlink(missing_ok=True)
        return cursor.rowcount > 0

    def write_video(self, video_id: str, data: bytes) -> Path:
        """Write atomically: a crash mid-write never leaves a truncated MP4 behind a completed job, and a failed
        write leaves no partial file (the error is raised; the store is marked degraded)."""
        target = self.video_path(video_id)
        partial = target.with_name(target.stem + PARTIAL_SUFFIX)
        try:
            write_file(partial, data)
            os.replace(partial, target)
        except OSError as error:
            partial.unlink(missing_ok=True)
            self.degraded = describe_os_error(error)
            raise
        self.degraded = None
        return target

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._lock_file.close()  # releases the folder's lock

    @staticmethod
    def _encode(values: dict[str, Any]) -> dict[str, Any]:
        return {k: (json.dumps(json_safe(v)) if k in _JSON_COLUMNS and v is not None else v)
                for k, v in values.items() if k != "seq"}

    @staticmethod
    def _decode(row: sqlite3.Row) -> VideoJob:
        values = dict(row)
        for name in _JSON_COLUMNS:
            if values[name] is not None:
                values[name] = json.loads(values[name])
        return VideoJob(**values)


class VideoJobRunner:
    """Turns accepted video requests into jobs: submits them to the engine, follows their progress, writes
    the MP4 and the final state when they end."""

    def __init__(self, engine: DiffusionEngine, store: VideoStore) -> None:
        self.engine = engine
        self.store = store
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def progress_callback(self, video_id: str) -> Callable[[int, int], None]:
        """Called on the engine thread after each step: write only when the percentage moves."""
        last = {"percent": -1}

        def report(done: int, total: int) -> None:
            percent = min(99, int(100 * done / max(total, 1)))  # 100 only once the file exists
            if percent == last["percent"]:
                return
            last["percent"] = percent
            try:
                self.store.update_progress(video_id, percent)
            except sqlite3.Error:
                # the store closed under a job being aborted: progress must never break the engine's batch
                logger.debug("progress of %s not recorded: the store is closed", video_id)

        return report

    def start(self, job: VideoJob, request: Request) -> None:
        """Record the job and submit it; a refused submission (full queue) leaves no row behind."""
        try:
            self.store.insert(job)
        except sqlite3.Error as error:
            self.store.degraded = f"the job database could not be written: {error}"
            logger.error("video job %s not recorded: %s", job.id, error)
            raise APIError(503, f"video jobs cannot be recorded now ({self.store.degraded}); try again later",
                           code="storage_unavailable") from None
        try:
            future = self.engine.submit(request)
        except DitServeError:
            self.store.delete(job.id)
            raise
        task = asyncio.get_running_loop().create_task(self._finish(job.id, future))
        self._tasks[job.id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(job.id, None))

    async def _finish(self, video_id: str, future: Any) -> None:
        try:
            output: RequestOutput = await asyncio.wrap_future(future)
        except RequestAbortedError as error:
            self._fail(video_id, "aborted", str(error))
        except DitServeError as error:
            api_error = api_error_from_engine(error)
            self._fail(video_id, api_error.code or "invalid_request", api_error.message)
        except Exception:  # noqa: BLE001 - a job must end failed, never stay "in_progress" forever
            logger.exception("video job %s failed", video_id)
            self._fail(video_id, "internal_error", "generation failed on the server")
        else:
            await self._store_output(video_id, output)

    def _fail(self, video_id: str, code: str, message: str) -> None:
        try:
            self.store.finish(video_id, "failed", error_code=code, error_message=message,
                              completed_at=int(time.time()))
        except sqlite3.Error as error:
            # the database cannot be written either (a full disk): the next start fails the job
            self.store.degraded = f"the job database could not be written: {error}"
            logger.error("video job %s could not be marked failed (%s): %s", video_id, code, error)

    async def _store_output(self, video_id: str, output: RequestOutput) -> None:
        try:
            data = await run_in_threadpool(output_video_bytes, output)
        except Exception:  # noqa: BLE001 - an encoder failure ends the job like any other
            logger.exception("video job %s could not be encoded", video_id)
            self._fail(video_id, "internal_error", "the generated frames could not be encoded as MP4")
            return
        try:
            path = await run_in_threadpool(self.store.write_video, video_id, data)
        except OSError as error:
            logger.error("video job %s could not be written: %s", video_id, error)
            self._fail(video_id, "storage_error", f"generation finished but the video could not be saved: "
                                                  f"{describe_os_error(error)}")
            return
        try:
            finished = self.store.finish(
                video_id, "completed", progress=100, completed_at=int(time.time()), seed=output.seed,
                inference_time_s=round(output.timings.get("total_s", 0.0), 4), timings=output.timings,
                cache_stats=output.cache_stats, peak_memory_mb=accelerator_peak_mb())
        except sqlite3.Error as error:
            self.store.degraded = f"the job database could not be written: {error}"
            logger.error("video job %s finished but could not be recorded: %s", video_id, error)
            finished = False
        if not finished:
            path.unlink(missing_ok=True)  # deleted or ended (failed) while it ran: its file is nobody's

    def cancel(self, video_id: str) -> None:
        """Stop a queued or running job (its row is deleted by the caller)."""
        self.engine.abort(video_id)

    async def shutdown(self) -> None:
        """Abort what is still running and mark it failed: a stopped server leaves no job 'in_progress'."""
        for video_id, task in list(self._tasks.items()):
            self.engine.abort(video_id)
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self.store.fail_interrupted("server_shutdown", "the server stopped before this job finished")
