"""Run folders: the one set of create / ``--force`` / ``--resume`` rules for every trainer and predictor.

A run folder holds what one command wrote: ``config.yaml`` (the resolved configuration),
``log.txt``, ``metrics.json``, weights, plots, predictions. Beside them, ``.pipeline-run.json``
lists every file the command wrote, so that:

- a new run refuses an existing, non-empty folder unless ``--force`` (replace) or ``--resume``
  (continue) is given, and never both;
- ``--force`` removes only the files a pipeline command wrote there (those in the list), and keeps
  anything else (a user's notes, a reviewed file) and says so;
- ``--resume`` needs the folder's resumable state (for a trainer, its last checkpoint) and says
  how to start again when there is none.

Usage::

    run = RunDir.open(out, kind="classifier", force=force, resume=resume, resume_file="weights/last.pt")
    ...validate every input...
    with run:                      # creates the folder, clears the old run's files on --force
        run.write_config(cfg)
        run.log("epoch 1 ...")
        run.write_metrics(metrics)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json, atomic_write_text, read_json

MANIFEST = ".pipeline-run.json"
# folders written by versions before the manifest existed: replaced whole on --force when they hold one
_LEGACY_MARKERS = ("config.yaml", "predictions.json", "model.pt")


class RunDir:
    """One run folder (see the module docstring). Build it with :meth:`open`."""

    def __init__(
        self,
        path: Path,
        *,
        kind: str,
        resume: bool,
        force: bool,
        resume_file: str | None,
        legacy_files: tuple[str, ...] | None = None,
    ):
        self.path = Path(path)
        self.legacy_files = legacy_files
        self.kind = kind
        self.resume = resume
        self.force = force
        self.resume_file = resume_file
        self.kept: list[str] = []
        self._user_files: set[str] = set()
        self._started = False
        self._created = False

    # ------------------------------------------------------------------ rules (nothing touched)
    @classmethod
    def open(
        cls,
        path: Path,
        *,
        kind: str,
        force: bool = False,
        resume: bool = False,
        resume_file: str | None = None,
        legacy_files: tuple[str, ...] | None = None,
    ) -> RunDir:
        """Check the rules for ``path`` without touching it.

        Args:
            path: the run folder.
            kind: what writes it (``"yolo"``, ``"classifier"``, ``"predict-sam"``, ...), recorded in
                the manifest; ``--force`` refuses to replace a run of another kind.
            force: replace the files an earlier pipeline command wrote there.
            resume: continue the run in ``path``.
            resume_file: the file, relative to ``path``, that ``resume`` needs (``None``: this
                command cannot resume).
            legacy_files: ``fnmatch`` patterns (relative POSIX paths, ``*`` crosses folders) of the
                files this command writes, for folders written before the manifest existed: on
                ``force`` only those are removed. ``None``: such a folder is replaced whole.

        Raises:
            PipelineError: ``force`` with ``resume``; ``resume`` without the resumable state;
                a non-empty folder without ``force``/``resume``; ``force`` on another kind's run
                or on a folder no pipeline command wrote.
        """
        path = Path(path)
        if force and resume:
            raise PipelineError(f"{path}: pass either --resume or --force, not both")
        if resume:
            if resume_file is None:
                raise PipelineError(f"{path}: this command cannot resume; pass --force to start again")
            if not (path / resume_file).is_file():
                raise PipelineError(
                    f"{path / resume_file}: nothing to resume (no checkpoint in the run folder); "
                    f"pass --force instead of --resume to start again"
                )
        elif path.exists():
            if path.is_file():
                raise PipelineError(f"{path}: is a file (expected a run folder)")
            if any(path.iterdir()):
                owner = _manifest(path)
                legacy = (
                    _matching(path, legacy_files)
                    if legacy_files
                    else [m for m in _LEGACY_MARKERS if (path / m).exists()]
                )
                if not force and owner is None and not legacy:
                    raise PipelineError(
                        f"{path}: output folder is not empty and no pipeline command wrote it (choose another --out)"
                    )
                if not force:
                    hint = " or --resume to continue it" if resume_file else ""
                    raise PipelineError(f"{path}: output already exists; pass --force to replace it{hint}")
                if owner is None and not legacy:
                    raise PipelineError(
                        f"{path}: not a folder a pipeline command wrote; refusing to replace it "
                        "even with --force (choose another --out)"
                    )
                if owner is not None and owner.get("kind") != kind:
                    raise PipelineError(
                        f"{path}: holds a {owner.get('kind')} run, not {kind}; refusing to replace "
                        "it (choose another --out)"
                    )
        return cls(path, kind=kind, resume=resume, force=force, resume_file=resume_file, legacy_files=legacy_files)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> RunDir:
        """Create the folder (after the caller validated its inputs); on ``--force`` remove the files
        the earlier run wrote and keep the rest (listed in :attr:`kept`)."""
        if self._started:
            return self
        old = _manifest(self.path) if self.path.is_dir() else None
        if self.force and self.path.is_dir():
            if old is None and not self.legacy_files:  # a run folder from before the manifest: all ours
                shutil.rmtree(self.path)
            else:
                ours = old.get("files", []) if old is not None else _matching(self.path, self.legacy_files)
                for rel in ours:
                    f = self.path / rel
                    if f.is_file() or f.is_symlink():
                        f.unlink()
                _remove_empty_dirs(self.path)
                (self.path / MANIFEST).unlink(missing_ok=True)
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        ours: set[str] = set()
        if self.resume:  # a resumed folder is this command's own, also one from before the manifest
            ours = set(old.get("files", [])) if old is not None else set(_files(self.path))
        self._user_files = {r for r in _files(self.path) if r not in ours and r != MANIFEST}
        self.kept = sorted(self._user_files)
        if self.force and self.kept:
            from pipeline.core.console import echo

            more = " ..." if len(self.kept) > 5 else ""
            echo(
                f"kept {len(self.kept)} file(s) in {self.path} that no pipeline command wrote: "
                f"{', '.join(self.kept[:5])}{more}",
                markup=False,
            )
        self._started = True
        self.save_manifest()
        return self

    def save_manifest(self) -> None:
        """Record every file now in the folder, except the user's, as written by this run."""
        files = sorted(r for r in _files(self.path) if r not in self._user_files and r != MANIFEST)
        atomic_write_json(self.path / MANIFEST, {"kind": self.kind, "files": files})

    def discard(self) -> None:
        """Remove what this run wrote (for a run stopped before anything resumable existed): the whole
        folder when this run created it and nothing else is in it, else only this run's files."""
        if not self._started:
            return
        if self._created and not self._user_files:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for rel in _files(self.path):
            if rel not in self._user_files:
                (self.path / rel).unlink(missing_ok=True)
        _remove_empty_dirs(self.path)

    def __enter__(self) -> RunDir:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        from pipeline.core.console import Interrupted

        stopped = exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, Interrupted))
        resumable = self.resume_file is not None and (self.path / self.resume_file).is_file()
        if stopped and not resumable:  # Ctrl-C before anything could be resumed: leave nothing behind
            self.discard()
        elif self.path.is_dir():
            self.save_manifest()

    # ------------------------------------------------------------------ writing
    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: dict[str, Any], name: str = "config.yaml") -> Path:
        """Write the resolved configuration as YAML (keys in the given order)."""
        import yaml

        from pipeline.core.io import to_json_plain

        atomic_write_text(self.path / name, yaml.safe_dump(to_json_plain(config), sort_keys=False))
        return self.path / name

    def write_metrics(self, metrics: dict[str, Any], name: str = "metrics.json") -> Path:
        """Write metrics as strict JSON (NaN -> null)."""
        atomic_write_json(self.path / name, metrics)
        return self.path / name

    def log(self, msg: str, *, echo: bool = True, name: str = "log.txt") -> None:
        """Append one line to the run's log (and print it unless ``echo`` is false)."""
        with open(self.path / name, "a", encoding="utf-8") as fh:
            fh.write(msg.rstrip("\n") + "\n")
        if echo:
            from pipeline.core.console import echo as say

            say(msg, markup=False)


def _manifest(path: Path) -> dict | None:
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    try:
        doc = read_json(f)
    except PipelineError:
        return None
    return doc if isinstance(doc, dict) else None


def _matching(root: Path, patterns) -> list[str]:
    from fnmatch import fnmatchcase

    return [r for r in _files(root) if any(fnmatchcase(r, p) for p in patterns)]


def _files(root: Path) -> list[str]:
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            out.append((Path(dirpath) / n).relative_to(root).as_posix())
    return out


def _remove_empty_dirs(root: Path) -> None:
    for dirpath, _dirs, _names in sorted(os.walk(root), key=lambda t: -len(t[0])):
        p = Path(dirpath)
        if p != root and not any(p.iterdir()):
            p.rmdir()
