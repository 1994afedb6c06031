"""Talking to a Label Studio server through ``label_studio_sdk`` (imported inside the functions).

- Push: create or update a project by title, register the images' Local Storage, import tasks with
  predictions. Pull: tasks with predictions and annotations, and the project's JSON export.

The API token is read from an environment variable (default ``LABEL_STUDIO_API_KEY``, the SDK's own),
never from the command line, and never printed. Every server error becomes one
:class:`~pipeline.core.errors.PipelineError` line: unreachable server, rejected token, refused request.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.core.errors import PipelineError
from pipeline.review.brush import import_sdk
from pipeline.review.labeling_config import validate_tasks

TOKEN_ENV = "LABEL_STUDIO_API_KEY"
STORAGE_TITLE = "pipeline images"


# ----------------------------------------------------------------------------- connection, errors


def _short(body) -> str:
    if isinstance(body, dict):
        for k in ("detail", "validation_errors", "message", "error"):
            if k in body:
                body = body[k]
                break
    text = " ".join(str(body).split())
    return text[:300] + ("..." if len(text) > 300 else "")


@contextmanager
def api_errors(url: str, *, token_env: str = TOKEN_ENV, what: str = "request") -> Iterator[None]:
    """Turn SDK/HTTP failures into one-line :class:`PipelineError` (never showing the token)."""
    import httpx

    ApiError = import_sdk().core.api_error.ApiError

    try:
        yield
    except ApiError as exc:
        code = exc.status_code
        if code in (401, 403):
            raise PipelineError(
                f"Label Studio at {url} rejected the API token in ${token_env} (HTTP {code}: {_short(exc.body)})"
            ) from None
        raise PipelineError(f"Label Studio at {url}: {what} failed (HTTP {code}: {_short(exc.body)})") from None
    except httpx.InvalidURL as exc:
        raise PipelineError(f"--url {url!r}: not a valid URL ({exc})") from None
    except httpx.HTTPError as exc:
        raise PipelineError(
            f"cannot reach Label Studio at {url} ({type(exc).__name__}: {exc or 'no response'})"
        ) from None


def connect(url: str, *, token_env: str = TOKEN_ENV, timeout: float = 60.0):
    """An SDK client for ``url`` with the token from ``$token_env``, checked with one ``whoami`` call.

    Raises:
        PipelineError: the variable is unset, the server is unreachable or rejects the token.
    """
    LabelStudio = import_sdk().LabelStudio
    token = os.environ.get(token_env, "").strip()
    if not token:
        raise PipelineError(
            f"set the Label Studio API token in the environment variable {token_env} "
            f"(Label Studio: Account & Settings > Access Token)"
        )
    if not url.startswith(("http://", "https://")):
        raise PipelineError(f"--url {url!r}: expected http://HOST:PORT")
    with api_errors(url, token_env=token_env, what="login"):
        ls = LabelStudio(base_url=url.rstrip("/"), api_key=token, timeout=timeout)
        ls.users.whoami()
    return ls


def _dump(obj) -> dict:
    return obj if isinstance(obj, dict) else obj.model_dump(mode="json", warnings=False)


# ----------------------------------------------------------------------------- push


def find_project(ls, title: str):
    """The project with exactly this title (the newest if several), or None."""
    matches = [p for p in ls.projects.list(title=title) if p.title == title]
    return max(matches, key=lambda p: p.id) if matches else None


def _project_tasks(ls, project_id: int, *, fields: str | None = None) -> list[dict]:
    return [_dump(t) for t in ls.tasks.list(project=project_id, fields=fields, page_size=500)]


def push_tasks(
    tasks: list[dict],
    config_xml: str,
    *,
    url: str,
    title: str,
    token_env: str = TOKEN_ENV,
    storage_path: Path | None = None,
    source: str = "tasks",
) -> dict:
    """Create or update the project ``title`` and import ``tasks`` with their predictions.

    A new project gets ``config_xml`` as its labeling config. An existing project keeps its config, which
    must accept every result of ``tasks`` (tag names, types, labels); tasks whose ``data.file_name`` is
    already in the project get their data updated and their predictions of the same ``model_version``
    replaced, the others are imported. With ``storage_path`` (local files), a Local Storage with that path
    is registered (not synced) so that Label Studio serves the images.

    Everything that can be checked is checked before the first write; a project created by this call is
    deleted again when a later step fails.

    Returns:
        ``{"project_id", "project_url", "created", "n_imported", "n_updated"}``.

    Raises:
        PipelineError: unreachable server, rejected token, a project config that does not accept the
            tasks, a title under 3 characters, a refused request.
    """
    if len(title.strip()) < 3:
        raise PipelineError(f"--project {title!r}: Label Studio needs a title of at least 3 characters")
    validate_tasks(tasks, config_xml, source=source)
    ls = connect(url, token_env=token_env)
    with api_errors(url, token_env=token_env, what="push"):
        project = find_project(ls, title)
        created = project is None
        if not created:
            validate_tasks(
                tasks,
                project.label_config or "<View/>",
                source=f"{source} vs the labeling config of project {title!r} (id {project.id})",
            )
            existing = {t["data"].get("file_name"): t for t in _project_tasks(ls, project.id)}
        else:
            existing = {}
            project = ls.projects.create(title=title, label_config=config_xml)
        try:
            if storage_path is not None:
                _register_storage(ls, project.id, Path(storage_path))
            new = [t for t in tasks if t["data"].get("file_name") not in existing]
            old = [t for t in tasks if t["data"].get("file_name") in existing]
            if new:
                ls.projects.import_tasks(project.id, request=new, return_task_ids=True)
            for t in old:
                _update_task(ls, existing[t["data"]["file_name"]]["id"], t)
        except BaseException:
            if created:
                try:
                    ls.projects.delete(id=project.id)
                except Exception:  # the original error matters more
                    pass
            raise
    return {
        "project_id": project.id,
        "project_url": f"{url.rstrip('/')}/projects/{project.id}",
        "created": created,
        "n_imported": len(new),
        "n_updated": len(old),
    }


def _register_storage(ls, project_id: int, storage_path: Path) -> None:
    """Add a Local Storage for ``storage_path`` (absolute) unless the project has one; never synced."""
    path = str(storage_path.resolve())
    storages = [_dump(s) for s in ls.import_storage.local.list(project=project_id)]
    if not any(s.get("path") == path for s in storages):
        ls.import_storage.local.create(project=project_id, path=path, title=STORAGE_TITLE, use_blob_urls=True)


def _update_task(ls, task_id: int, task: dict) -> None:
    """Replace a task's data, and its predictions of the model versions ``task`` carries."""
    ls.tasks.update(id=str(task_id), data=task["data"])
    versions = {p["model_version"] for p in task.get("predictions", [])}
    for p in ls.predictions.list(task=task_id):
        if p.model_version in versions:
            ls.predictions.delete(id=p.id)
    for p in task.get("predictions", []):
        ls.predictions.create(task=task_id, result=p["result"], score=p.get("score"), model_version=p["model_version"])


def local_files_start_command(document_root: Path) -> str:
    """The shell command that starts Label Studio serving local files under ``document_root``.

    The path is shell-quoted (``shlex.quote``), so the line can be pasted as is.
    """
    import shlex

    return (
        f"LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true "
        f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={shlex.quote(str(document_root))} label-studio start"
    )


# ----------------------------------------------------------------------------- pull


def fetch_tasks(url: str, project_id: int, *, token_env: str = TOKEN_ENV) -> list[dict]:
    """A project's tasks with their predictions and annotations, as plain dicts, ordered by task id."""
    ls = connect(url, token_env=token_env)
    with api_errors(url, token_env=token_env, what="task list"):
        return sorted(_project_tasks(ls, project_id, fields="all"), key=lambda t: t["id"])


def export_project(url: str, project_id: int, *, token_env: str = TOKEN_ENV) -> list[dict]:
    """The project's JSON export (what Label Studio's Export > JSON gives): tasks with annotations."""
    ls = connect(url, token_env=token_env)
    with api_errors(url, token_env=token_env, what="export"):
        return ls.projects.exports.as_json(project_id)
