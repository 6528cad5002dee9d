"""Ownership of ``OUT`` and the all-or-nothing swap of a staged output into it.

Ownership. vlaprep deletes only what it can prove it wrote: OUT must be new, empty, or hold a valid
vlaprep manifest, and then ``train/ heldout/ quarantine/ inputs/`` may hold only the files that manifest
lists; ``.staging-*`` and ``.old-*`` are vlaprep's only when they carry its record (``.owner.json``).
Anything else is refused before any Beam work, as one line naming the entries (``foreign_entries``).

Atomicity. Everything is built in ``OUT/.staging-<random>/``. Publishing (``publish``) is all or
nothing: a journal in ``OUT/.old-<random>/`` records each move (old manifest and entries parked there,
new ones renamed in, the new manifest last); any failure undoes the moves in reverse, so OUT is byte for
byte the previous output again. A process killed midway leaves the journal, and the next run (or a
retry of the pipeline's last step) undoes it, or finishes it when the new manifest had landed
(``recover_publish``). A reader trusts ``OUT`` only when ``manifest.json`` exists and lists what it
reads (``verify_output``).

Disk: while the pipeline runs, encoded episodes wait in ``OUT/.staging-*/.work/episodes`` (about the
rows' uncompressed size); they are deleted before publishing; the previous output stays on disk until
the new manifest is in place. A run killed hard (SIGKILL, power loss) may leave a ``.staging-*``
directory behind; it is never read. The next local run into the same ``OUT`` on the same host deletes
it (its owner process is gone, ``reclaim_stale_staging``); one from a remote or ``--no-wait`` job is
left alone and reported, to be deleted once that job is known to be dead.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from vlaprep import paths
from vlaprep.errors import environment_error
from vlaprep.paths import confined, fsync_dir, write_bytes_atomic
from vlaprep.pipelines.job import pid_alive
from vlaprep.pipelines.shards.options import ShardsArgumentError
from vlaprep.pipelines.shards.write import file_sha256
from vlaprep.schemas import layout
from vlaprep.schemas.layout import HELDOUT, INPUTS_DIR, MANIFEST_FILE, QUARANTINE_DIR, TRAIN

OUTPUT_ENTRIES = (TRAIN, HELDOUT, QUARANTINE_DIR, INPUTS_DIR)  # what a publish moves, besides the manifest
STAGING_PREFIX = ".staging-"
OLD_PREFIX = ".old-"
WORK_DIR = ".work"  # inside the staging: the pipeline's spilled episodes, removed before publishing
# vlaprep's record in each directory it creates inside OUT, written right after the directory. In
# ``.staging-*``: {"by", "host", "pid", "wait"} of the launcher; a later run on the same host deletes the
# staging of a waiting run that was killed (the pid is gone) and never one of a --no-wait job. In
# ``.old-*``: the publish journal (see ``publish``). A ``.staging-*``/``.old-*`` without it is not
# vlaprep's: it is never touched.
OWNER_FILE = ".owner.json"
_OWNER_BY = "vlaprep shards"
# An unfinished publish from another host is undone by the next run only once its journal has not moved
# for this long (publishing renames a few directories; an object store copies them server-side).
_STALE_PUBLISH_S = 6 * 3600
_log = logging.getLogger("vlaprep.shards")


class PublishRefused(ShardsArgumentError):
    """The pipeline's last step would not publish (no episode to publish, or entries in OUT that vlaprep
    did not write); OUT is left as it was. Raised on a worker; the launcher reports it as one line."""


def owner_record(wait: bool = True) -> dict:
    """vlaprep's record of this process, for ``OWNER_FILE`` (``wait``: the launcher waits for the job)."""
    return {"by": _OWNER_BY, "host": socket.gethostname(), "pid": os.getpid(), "wait": bool(wait)}


def _read_owner(directory: str) -> dict | None:
    """vlaprep's owner record (or publish journal) in ``directory``; None when there is none.

    Records written before ``by`` existed ({"host", "pid"} of a waiting local run) are accepted too."""
    try:
        record = json.loads(paths.read_bytes(paths.join(directory, OWNER_FILE)))
    except (OSError, ValueError):  # missing or not JSON (BeamIOError is an OSError)
        return None
    if not isinstance(record, dict) or record.get("by", _OWNER_BY) != _OWNER_BY:
        return None
    pid = record.get("pid")
    if not isinstance(record.get("host"), str) or not isinstance(pid, int) or isinstance(pid, bool):
        return None
    return record


def _empty_local_dir(path: str) -> bool:
    """A local directory with nothing in it (a run killed between creating it and writing its record)."""
    return not paths.is_remote(path) and os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def _present(path: str) -> bool:
    """A file, directory or symlink (local), or an object or a non-empty prefix (remote)."""
    if paths.is_remote(path):
        return paths.exists(path) or paths.isdir(path)
    return os.path.lexists(path)


def remove_owned(directory: str) -> None:
    """Delete one of vlaprep's own directories, its owner record last: an interrupted removal leaves a
    directory that is still recognisably vlaprep's (and so is removed by a later run, never refused)."""
    if not _present(directory):
        return
    for name in paths.listdir(directory):
        if name != OWNER_FILE:
            paths.remove_tree(paths.join(directory, name))
    paths.remove_tree(paths.join(directory, OWNER_FILE))
    if not paths.is_remote(directory):
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            pass


def reclaim_stale_staging(output_dir: str, log=print) -> list[str]:
    """Delete ``OUT/.staging-*`` left by killed local runs on this host; return their names.

    Only directories whose owner record names this host, a waiting run and a process that no longer
    exists are removed (a reused pid keeps a directory, which is the safe direction); an empty one (a run
    killed before writing its record) is removed with ``rmdir``, which cannot delete a file. Others are
    reported, not touched: without vlaprep's record a directory is not vlaprep's.
    """
    if paths.is_remote(output_dir) or not os.path.isdir(output_dir):
        return []
    host, removed = socket.gethostname(), []
    for name in sorted(os.listdir(output_dir)):
        if not name.startswith(STAGING_PREFIX):
            continue
        directory = os.path.join(output_dir, name)
        if _empty_local_dir(directory):
            os.rmdir(directory)
            removed.append(name)
            continue
        owner = _read_owner(directory)
        if owner is None:
            log(f"[shards] left alone: {directory} (no vlaprep owner record: not vlaprep's, or an older --no-wait job's)")
            continue
        if not owner.get("wait", True):
            log(f"[shards] left alone: {directory} (staging of a --no-wait job, which may still be running)")
            continue
        if owner["host"] == host and not pid_alive(owner["pid"]):
            remove_owned(directory)
            removed.append(name)
            log(f"[shards] removed {directory}: staging of an interrupted run (pid {owner['pid']} is gone)")
    return removed


def _own_manifest(output_dir: str) -> layout.Manifest | None:
    """OUT's manifest when it is a valid vlaprep shards manifest (the proof that OUT is vlaprep's)."""
    if not paths.isfile(paths.join(output_dir, MANIFEST_FILE)):
        return None
    try:
        return layout.read_manifest(output_dir)
    except (OSError, layout.ManifestError):
        return None


def foreign_entries(output_dir: str, log=print) -> list[str]:
    """Entries of ``output_dir`` that vlaprep cannot prove it wrote (relative names; [] when it may publish).

    Proof: a valid vlaprep manifest in OUT (then ``train/ heldout/ quarantine/ inputs/`` may hold only
    the files it lists) and vlaprep's owner record in ``.staging-*``/``.old-*``. Without a manifest only
    vlaprep's own staging and journal directories may be there (a new, empty or never-published OUT).
    A ``.staging-*``/``.old-*``/``.tmp-*`` without a record is left alone in a published OUT (publishing
    never touches it) and counts as foreign in any other.
    """
    if not paths.isdir(output_dir):
        return []
    manifest = _own_manifest(output_dir)
    listed = set()
    if manifest is not None:
        listed = {f.path for f in manifest.files()} | {manifest.quarantine["path"], manifest.statistics_relpath}
    foreign = []
    for name in paths.listdir(output_dir):
        full = paths.join(output_dir, name)
        if name.startswith((STAGING_PREFIX, OLD_PREFIX)) and (_read_owner(full) is not None or _empty_local_dir(full)):
            continue
        if manifest is None:
            foreign.append(name)
        elif name == MANIFEST_FILE:
            continue
        elif name.startswith((STAGING_PREFIX, OLD_PREFIX, ".tmp-")):
            log(f"[shards] left alone: {full} (vlaprep cannot prove it wrote it: no vlaprep owner record)")
        elif name in OUTPUT_ENTRIES:
            if paths.isfile(full) or (not paths.is_remote(full) and (os.path.islink(full) or not os.path.isdir(full))):
                foreign.append(name)  # publishing would move it aside and delete it
                continue
            names = (f"{name}/{rel}".replace(os.sep, "/") for rel, _ in paths.list_files(full))
            foreign.extend(n for n in names if n not in listed)
        else:
            foreign.append(name)
    return foreign


def refuse_foreign(output_dir: str, foreign: list[str], error=ShardsArgumentError) -> None:
    """Raise ``error`` naming the first entries of ``foreign`` (``foreign_entries``), if there are any."""
    if foreign:
        shown = repr(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise error(
            f"expected --output to be empty or a previous vlaprep shards output, got entries vlaprep did not write "
            f"{shown} in {output_dir!r}; hint: choose an empty or new directory (vlaprep deletes only files its own "
            "manifest lists, and those only when that manifest is valid)"
        )


def publish(staging: str, output_dir: str, manifest_data: bytes, log=_log.warning) -> None:
    """Swap the staged output into ``output_dir``, all or nothing; ``manifest.json`` lands last.

    The new manifest is written into ``staging`` (temp file + fsync + rename), then a journal
    (``OUT/.old-<random>/.owner.json``: the planned moves and the one started) is written before each
    move: park the old ``manifest.json`` and ``train/ heldout/ quarantine/ inputs/`` in ``.old-<random>/``,
    bring each staged one in, and last move the new manifest into place (one rename). Any exception at
    any step undoes the started moves in reverse order, the old manifest last, so OUT is again exactly
    what it was (same files, same bytes) and ``staging`` holds the new output again; then it propagates
    (the caller removes ``staging``). A process killed midway leaves the journal: ``recover_publish``
    (the next run, or a retry of the last step) undoes the same way, or finishes a publish whose
    manifest landed. Local outputs use atomic renames; on an object store a move copies then deletes, so
    every object is at its source or its destination at any time and the same undo applies.
    """
    staging_name = paths.basename(staging)
    if not staging_name.startswith(STAGING_PREFIX) or not _same_path(paths.dirname(staging), output_dir):
        raise ValueError(f"expected a {STAGING_PREFIX}* directory directly inside {output_dir!r}, got {staging!r}")
    write_bytes_atomic(paths.join(staging, MANIFEST_FILE), manifest_data)
    old = paths.make_temp_dir(output_dir, OLD_PREFIX)
    old_name = paths.basename(old)
    steps = [[MANIFEST_FILE, f"{old_name}/{MANIFEST_FILE}"]] if _present(paths.join(output_dir, MANIFEST_FILE)) else []
    for name in OUTPUT_ENTRIES:
        if _present(paths.join(output_dir, name)):
            steps.append([name, f"{old_name}/{name}"])
        if _present(paths.join(staging, name)):
            steps.append([f"{staging_name}/{name}", name])
    steps.append([f"{staging_name}/{MANIFEST_FILE}", MANIFEST_FILE])
    journal = {**owner_record(), "staging": staging_name, "steps": steps, "started": -1}
    try:
        _write_journal(old, journal)
    except BaseException:
        paths.remove_tree(old)  # created just above: nothing but an unfinished journal can be in it
        raise
    where = paths.join(old, OWNER_FILE)
    try:
        for index, (src, dst) in enumerate(steps):
            journal["started"] = index
            _write_journal(old, journal)
            _move(output_dir, src, dst, where)
    except BaseException as error:
        try:
            _undo(output_dir, journal, where)
        except BaseException as undo_error:
            log(f"[shards] could not restore the previous output of {output_dir} after a failed publish "
                f"({undo_error!r}); the next vlaprep shards run into it restores it from {old_name}")
            raise error
        try:
            remove_owned(old)
        except OSError as e:
            log(f"[shards] restored {output_dir}; could not remove {old} ({e}); the next run removes it")
        raise
    # Published (manifest.json is in place); the rest is cleanup, which the next run finishes if it stops.
    try:
        remove_owned(staging)
        remove_owned(old)
    except OSError as e:
        log(f"[shards] published {output_dir}; could not remove {staging_name} or {old_name} ({e}); the next run removes them")


def _same_path(a: str, b: str) -> bool:
    if paths.is_remote(a) or paths.is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def _write_journal(old_dir: str, journal: dict) -> None:
    journal["time"] = time.time()
    write_bytes_atomic(paths.join(old_dir, OWNER_FILE), json.dumps(journal, sort_keys=True).encode("utf-8"))


def _move(output_dir: str, src_rel: str, dst_rel: str, where: str) -> None:
    src, dst = confined(output_dir, src_rel, where), confined(output_dir, dst_rel, where)
    paths.move(src, dst)
    if not paths.is_remote(output_dir):  # make the rename durable before the journal moves on
        fsync_dir(os.path.dirname(src))
        fsync_dir(os.path.dirname(dst))


def _undo(output_dir: str, journal: dict, where: str) -> None:
    """Move back, in reverse order, whatever the started steps put at their destination."""
    staging = journal["staging"]
    for src_rel, dst_rel in reversed(journal["steps"][: journal["started"] + 1]):
        dst = confined(output_dir, dst_rel, where)
        if not _present(dst):
            continue
        if src_rel.startswith(staging + "/") and not _present(confined(output_dir, staging, where)):
            paths.remove_tree(dst)  # a new entry whose staging was already removed: nothing to go back to
            continue
        _move(output_dir, dst_rel, src_rel, where)


def _committed(output_dir: str, journal: dict, where: str) -> bool:
    """The journal's last step (the new manifest into place) has happened."""
    return journal["started"] == len(journal["steps"]) - 1 and _present(confined(output_dir, journal["steps"][-1][1], where))


def _check_publisher_gone(output_dir: str, name: str, journal: dict) -> None:
    age = time.time() - float(journal.get("time") or 0)
    if journal["host"] == socket.gethostname():
        if not pid_alive(journal["pid"]):
            return
        later = "once that process is gone"
    else:
        if age > _STALE_PUBLISH_S:
            return
        later = f"{_STALE_PUBLISH_S // 3600} h after its last step"
    raise ShardsArgumentError(
        f"expected no other vlaprep shards run publishing into {output_dir!r}, got the unfinished publish {name} of "
        f"host {journal['host']!r} pid {journal['pid']} (last step {age:.0f} s ago); hint: wait for that run to end "
        f"(a later run undoes an interrupted publish {later})"
    )


def recover_publish(output_dir: str, log=print, staging: str | None = None) -> bool:
    """Finish or undo the publishes into ``output_dir`` that a killed process left half done.

    Each is found by its journal (``.old-*/.owner.json``). One whose last step (the manifest) happened is
    finished: the previous output parked in ``.old-*`` and the emptied staging are deleted. Any other is
    undone step by step in reverse, so OUT is again exactly the previous output (its manifest last) and
    the new entries are back in their staging. The launcher (``staging=None``) handles journals whose
    process is provably gone (same host, pid gone; another host: silent for ``_STALE_PUBLISH_S``) and
    refuses while one may be live; a retried last step (``staging``) handles its own only. Returns True
    when the publish of ``staging`` had finished.
    """
    finished = False
    if not paths.isdir(output_dir):
        return False
    for name in paths.listdir(output_dir):
        if not name.startswith(OLD_PREFIX):
            continue
        directory = paths.join(output_dir, name)
        journal = _read_owner(directory)
        if journal is None or not isinstance(journal.get("steps"), list) or not isinstance(journal.get("staging"), str) \
                or not isinstance(journal.get("started"), int):
            continue  # not a journal: not vlaprep's, or a journal's directory before its first write
        mine = staging is not None and journal["staging"] == paths.basename(staging)
        if staging is not None and not mine:
            continue
        if not mine:
            _check_publisher_gone(output_dir, name, journal)
        where = paths.join(directory, OWNER_FILE)
        try:
            if _committed(output_dir, journal, where):
                remove_owned(confined(output_dir, journal["staging"], where))
                remove_owned(directory)
                finished = finished or mine
                log(f"[shards] finished the interrupted publish of {output_dir}: removed the previous output parked in {name}")
            else:
                _undo(output_dir, journal, where)
                remove_owned(directory)
                log(f"[shards] undid the interrupted publish {name}: {output_dir} holds its previous output again")
        except OSError as e:
            if environment_error(e) is not None:
                raise
            raise ShardsArgumentError(
                f"expected to undo the interrupted publish {name} in {output_dir!r}, got {type(e).__name__}: {e}; hint: "
                f"restore it by hand ({name}/{OWNER_FILE} lists the moves, in order) or choose a new directory"
            ) from e
    return finished


def verify_output(output_dir: str, manifest: dict | None = None) -> dict:
    """Every file the manifest names exists with its size and sha256 (what a careful reader does).

    ``manifest``: a document already read (default: ``output_dir``'s, read with ``vlaprep.schemas.layout``)."""
    checked = layout.read_manifest(output_dir) if manifest is None else layout.Manifest(output_dir, manifest)
    for entry in [*checked.document["files"], checked.quarantine]:
        path = checked.path(entry["path"])
        if not paths.isfile(path):
            raise RuntimeError(f"expected {entry['path']} listed in the manifest to exist in {output_dir!r}, got no such file")
        size = paths.getsize(path)
        if size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise RuntimeError(f"expected {entry['path']} to have {entry['bytes']} bytes and sha256 {entry['sha256']}, got {size} bytes / another digest")
    return checked.document
