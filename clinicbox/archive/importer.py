"""``clinicbox import``: files, folders and DICOM media (CD/USB with a DICOMDIR), through the same ingest."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from clinicbox.archive.ingest import IMPORT_PREFIX, Archive, IngestError, StoreOutcome

log = logging.getLogger(__name__)

@dataclass
class ImportSummary:
    imported: int = 0
    duplicates: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)

    @property
    def reasons(self) -> Counter:
        return Counter(reason for _path, reason in self.rejected)


def _dicomdir_files(dicomdir: Path) -> list[Path]:
    ds = pydicom.dcmread(dicomdir)
    files = []
    for record in ds.get("DirectoryRecordSequence", []):
        ref = record.get("ReferencedFileID")
        if ref:
            parts = [ref] if isinstance(ref, str) else list(ref)
            files.append(dicomdir.parent.joinpath(*parts))
    return files


def collect(paths: Iterable[Path]) -> Iterator[Path]:
    """Every file to import: a folder with a DICOMDIR yields the files it references; other
    folders are walked; DICOMDIR files themselves are not instances and are skipped."""
    for path in paths:
        path = Path(path)
        if path.is_dir():
            dicomdir = next((path / n for n in ("DICOMDIR", "dicomdir") if (path / n).is_file()), None)
            if dicomdir is not None:
                try:
                    yield from _dicomdir_files(dicomdir)
                    continue
                except Exception as exc:
                    log.warning("DICOMDIR in %s unreadable (%s); walking the folder instead", path, exc)
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    if name.upper() != "DICOMDIR":
                        yield Path(root) / name
        elif path.name.upper() == "DICOMDIR" and path.is_file():
            yield from _dicomdir_files(path)
        else:
            yield path


def _is_part10(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(128)
        return fh.read(4) == b"DICM"


def _import_bare_dataset(archive: Archive, path: Path):
    """A data set without file meta (old media, some exports): add the meta, keep the encoding."""
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise IngestError("invalid", f"not DICOM: {exc}") from None
    if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
        raise IngestError("invalid", "not a DICOM object (no SOP Class/Instance UID)")
    implicit, little = ds.original_encoding
    syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    fd, tmp = archive.store.new_incoming(prefix=f"{IMPORT_PREFIX}{os.getpid()}-")
    with os.fdopen(fd, "wb") as fh:
        ds.save_as(fh, enforce_file_format=True)
    return archive.store_incoming(tmp, source="import")


def import_paths(archive: Archive, paths: Iterable[Path],
                 progress: Callable[[int, int], None] | None = None) -> ImportSummary:
    files = list(collect(paths))
    summary = ImportSummary()
    with archive.importing():
        _import_files(archive, files, summary, progress)
    if summary.rejected:
        log.info("import: %d file(s) rejected", len(summary.rejected))
    return summary


def _import_files(archive: Archive, files: list[Path], summary: ImportSummary, progress) -> None:
    for n, path in enumerate(files, 1):
        try:
            if not path.is_file():
                raise IngestError("invalid", "no such file")
            if _is_part10(path):
                result = archive.store_file(path)
            else:
                result = _import_bare_dataset(archive, path)
            if result.outcome in (StoreOutcome.STORED, StoreOutcome.REPLACED):
                summary.imported += 1
            else:
                summary.duplicates += 1
        except IngestError as exc:
            summary.rejected.append((str(path), exc.reason))
            log.debug("import rejected %s: %s", path, exc.reason)
        except (OSError, InvalidDicomError) as exc:
            summary.rejected.append((str(path), str(exc)))
        except Exception as exc:  # one bad file never stops an import
            log.exception("import of %s failed", path)
            summary.rejected.append((str(path), f"unexpected error: {exc}"))
        if progress:
            progress(n, len(files))
