"""What `geopush serve` refuses to start on beyond the settings' own validation: files that must
exist, folders it must write to, secrets left at their published default.

One function for both commands, so `geopush check` refuses exactly what `serve` would, with the
same lines. It reads the file system but opens no connection: a Redis that is down at start is
not a configuration error (the service starts and answers 503 until it is back).
"""

from __future__ import annotations

import os
from pathlib import Path

from geopush.config import DEFAULT_PSEUDONYM_KEY, Settings
from geopush.delivery.senders.build import service_account_problem
from geopush.durations import format_duration
from geopush.errors import GeopushError, Problem

MIN_SECRET_CHARS = 16


def deployment_problems(settings: Settings) -> list[Problem]:
    """Every reason `serve` would not start with these settings, one Problem each."""
    origin = settings.origin
    problems: list[Problem] = []

    def problem(loc: tuple[str, ...], message: str, expected: str, value: object = None) -> None:
        problems.append(Problem(origin.where(loc), message, field=".".join(loc), value=value,
                                expected=expected))

    if settings.auth.keys:
        key = settings.logging.pseudonym_key
        if key == DEFAULT_PSEUDONYM_KEY:
            problem(("logging", "pseudonym_key"),
                    f"logging.pseudonym_key is the published default {DEFAULT_PSEUDONYM_KEY!r} "
                    "while auth.keys are set: anyone could link log lines and erasure records "
                    "to device ids",
                    f"a random secret of {MIN_SECRET_CHARS}+ characters "
                    "(e.g. `openssl rand -hex 32`)", value="***")
        elif len(key) < MIN_SECRET_CHARS:
            problem(("logging", "pseudonym_key"),
                    f"logging.pseudonym_key = *** is shorter than {MIN_SECRET_CHARS} characters",
                    f"a random secret of {MIN_SECRET_CHARS}+ characters "
                    "(e.g. `openssl rand -hex 32`)", value="***")

    if settings.logging.pseudonym_key in settings.auth.device_token_secret:
        problem(("auth", "device_token_secret"),
                "auth.device_token_secret holds logging.pseudonym_key: one leaked secret "
                "would both forge device tokens and link log lines to device ids",
                "a secret of its own (e.g. `openssl rand -hex 32`)", value="***")

    # pushes older than retention.history are forgotten: a policy window looking further back
    # would be silently shorter (a rule's cap is a load error for the same reason)
    history = settings.retention.history
    policy = settings.policy
    windows: list[tuple[tuple[str, ...], float]] = [
        (("policy", "max_per_device", str(n), "per"), cap.per)
        for n, cap in enumerate(policy.max_per_device)]
    windows += [(("policy", "min_gap"), policy.min_gap),
                (("policy", "store_cooldown"), policy.store_cooldown),
                (("policy", "fatigue", "pause"), policy.fatigue.pause)]
    for loc, seconds in windows:
        if seconds > history:
            problem(loc, f"{'.'.join(loc)} = {format_duration(seconds)} is longer than retention.history "
                    f"({format_duration(history)}): pushes older than that are forgotten",
                    "at most retention.history, or a longer retention.history",
                    value=format_duration(seconds))

    if not settings.stores_file.is_file():
        problem(("stores_file",), f"stores_file = {str(settings.stores_file)!r}: "
                f"{_missing(settings.stores_file)}", "a readable GeoJSON file",
                value=str(settings.stores_file))

    delivery = settings.delivery
    account = delivery.fcm.service_account_file
    if delivery.sender == "fcm" and account is not None and not delivery.fcm.static_token:
        if not account.is_file():
            problem(("delivery", "fcm", "service_account_file"),
                    f"delivery.fcm.service_account_file = {str(account)!r}: "
                    f"{_missing(account)}",
                    "the service account JSON key file (sender fcm)", value=str(account))
        else:
            # what `serve` would refuse at start: the same check, the same line
            unusable = service_account_problem(account)
            if unusable is not None:
                problem(("delivery", "fcm", "service_account_file"), unusable,
                        "a Google service account JSON key file", value=str(account))

    if delivery.process == "separate" and settings.storage.backend != "redis":
        problem(("delivery", "process"),
                f"delivery.process = 'separate' needs storage.backend: redis (the "
                f"{settings.storage.backend} store lives in the serving process)",
                "inline or auto with the memory backend", value="separate")

    snapshot = settings.storage.snapshot_path
    if settings.storage.backend == "memory" and snapshot is not None:
        reason = _snapshot_problem(snapshot)
        if reason is None and snapshot.is_file():
            reason = _unreadable_snapshot(snapshot)
        if reason is not None:
            problem(("storage", "snapshot_path"),
                    f"storage.snapshot_path = {str(snapshot)!r}: {reason}",
                    "a file path in a folder geopush can write (the state is saved there on "
                    "shutdown)", value=str(snapshot))
    return problems


def _missing(path: Path) -> str:
    if path.is_dir():
        return "is a folder"
    return "not found" if not path.exists() else "not a regular file"


def _snapshot_problem(path: Path) -> str | None:
    """Why the state could not be read at start or written at shutdown, or None."""
    if path.exists():
        if not path.is_file():
            return "is not a regular file"
        if not os.access(path, os.R_OK):
            return "cannot be read (permissions)"
    # the parent folders are made at shutdown; the nearest one that exists must be writable
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {folder} is not writable: the state could not be saved on shutdown"
    return None


def _unreadable_snapshot(path: Path) -> str | None:
    """Read it as serve would at start (SnapshotError: serve refuses to start)."""
    from geopush.state.memory import MemoryStore

    try:
        MemoryStore.verify_files(path)
    except GeopushError as exc:
        return exc.message.removeprefix(f"{path}: ")
    return None
