"""The plan file: a zip of a JSON manifest, exported programs and safetensors weights.

A plan is what leaves the simulator for a device: the client's local train step and its
evaluation as ``torch.export`` programs (``.pt2``), the weights it starts from, the
local hyper-parameters, the input schema and the update format, all checksummed.

Loading executes no code from the file: the manifest is JSON, the weights safetensors,
and each ``.pt2`` archive is inspected before ``torch.export.load`` sees it (every tensor
payload raw bytes, no pickled payload and no pickled sample inputs, which
``torch.export.load`` would otherwise unpickle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

#: what this fedrec writes and reads; a plan with a larger number needs a newer fedrec
FORMAT_VERSION = 1
FORMAT_NAME = "fedrec-plan"
MANIFEST = "manifest.json"
CHECKSUM = "manifest.sha256"
WEIGHTS = "weights.safetensors"


class PlanError(ValueError):
    """A plan that cannot be run here; the message names the file and what is wrong."""


def fedrec_version() -> str:
    from fedrec import __version__

    return __version__


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass
class PlanFile:
    """A plan's members as bytes (read and checked, nothing executed yet)."""

    path: Path
    manifest: dict[str, Any]
    members: dict[str, bytes]

    @property
    def checksum(self) -> str:
        """The plan's identity: the sha256 of its manifest (which holds every member's)."""
        return sha256(self.members[MANIFEST])


def write_plan(path: Path, manifest: dict[str, Any], members: Mapping[str, bytes]) -> str:
    """Write the plan through a temporary file (never half-written); returns its checksum."""
    manifest = dict(manifest, files={name: sha256(data) for name, data in sorted(members.items())})
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(MANIFEST, manifest_bytes)
            archive.writestr(CHECKSUM, sha256(manifest_bytes) + "\n")
            for name, data in sorted(members.items()):
                archive.writestr(name, data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return sha256(manifest_bytes)


def read_plan(path: str | Path) -> PlanFile:
    """Read and verify a plan: a zip, its checksums, a format this fedrec can run."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan {path} does not exist (write one with: fedrec plan export)")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: archive.read(info) for info in archive.infolist()}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as err:
        raise PlanError(f"plan {path} is not a readable fedrec plan (truncated or corrupted: {err})") from None
    for name in (MANIFEST, CHECKSUM):
        if name not in members:
            raise PlanError(f"plan {path} has no {name}: not a fedrec plan, or a damaged one")
    if members[CHECKSUM].decode(errors="replace").strip() != sha256(members[MANIFEST]):
        raise PlanError(f"plan {path}: {MANIFEST} does not match its checksum ({CHECKSUM}); the file is corrupted")
    try:
        manifest = json.loads(members[MANIFEST])
    except ValueError as err:
        raise PlanError(f"plan {path}: {MANIFEST} is not JSON ({err})") from None
    check_compatible(manifest, path)
    files = manifest.get("files") or {}
    for name, digest in files.items():
        if name not in members:
            raise PlanError(f"plan {path} lacks {name}, which its manifest lists")
        if sha256(members[name]) != digest:
            raise PlanError(f"plan {path}: {name} does not match its checksum in {MANIFEST}; the file is corrupted")
    extra = sorted(set(members) - set(files) - {MANIFEST, CHECKSUM})
    if extra:
        raise PlanError(f"plan {path} holds files its manifest does not list: {extra}")
    return PlanFile(path, manifest, members)


def check_compatible(manifest: Mapping[str, Any], path: Path) -> None:
    """A plan states the format and fedrec version it needs; refuse what we cannot run."""
    if manifest.get("format") != FORMAT_NAME:
        raise PlanError(f"plan {path} is not a fedrec plan (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise PlanError(f"plan {path}: format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise PlanError(
            f"plan {path} has format version {version} (written by fedrec {manifest.get('fedrec_version')}), "
            f"but this fedrec {fedrec_version()} runs plan format version {FORMAT_VERSION} at most: "
            "upgrade fedrec on this client, or export the plan with this fedrec")
    if version < 1:
        raise PlanError(f"plan {path}: format version {version} is not one fedrec ever wrote")


# -- exported programs --------------------------------------------------------------------
_PT2_PREFIXES = ("models/", "data/weights/", "data/constants/", "data/sample_inputs/")
_PT2_FILES = ("archive_format", "archive_version", ".data/version", "byteorder", ".data/serialization_id")


def program_bytes(program: torch.export.ExportedProgram) -> bytes:
    """A ``.pt2`` archive of ``program`` without sample inputs (which would be pickled)."""
    program.example_inputs = None
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def load_program(data: bytes, name: str, plan: Path) -> torch.export.ExportedProgram:
    """``torch.export.load`` of a plan's program, after checking it unpickles nothing."""
    check_program_archive(data, name, plan)
    try:
        return torch.export.load(io.BytesIO(data))
    except Exception as err:  # noqa: BLE001 - any failure here is a bad plan, said once
        raise PlanError(f"plan {plan}: program {name} does not load with torch {torch.__version__} "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def check_program_archive(data: bytes, name: str, plan: Path) -> None:
    """Refuse a ``.pt2`` whose loading could unpickle: pickled weights or constants,
    script or opaque objects, sample inputs, or files we do not know."""
    where = f"plan {plan}: program {name}"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                filename = info.filename
                inner = filename.split("/", 1)[1] if "/" in filename else filename
                if not (inner.startswith(_PT2_PREFIXES) or inner in _PT2_FILES):
                    raise PlanError(f"{where} holds an unexpected file {filename}")
                if inner.startswith("data/sample_inputs/") and info.file_size:
                    raise PlanError(f"{where} carries pickled sample inputs; fedrec plans never do")
                if inner.endswith("_config.json"):
                    config = json.loads(archive.read(filename))
                    for key, payload in (config.get("config") or {}).items():
                        if payload.get("use_pickle") or not str(payload.get("path_name", "")).startswith(
                                ("weight_", "tensor_")):
                            raise PlanError(f"{where}: payload {key!r} is not a raw tensor (a pickle); refused")
    except zipfile.BadZipFile as err:
        raise PlanError(f"{where} is not a .pt2 archive ({err})") from None
    except ValueError as err:
        if isinstance(err, PlanError):
            raise
        raise PlanError(f"{where}: a config inside is not JSON ({err})") from None
