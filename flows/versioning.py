"""DVC data versions of the image folder: import, push, list, check out and pull.

The DVC-tracked folder (params.yaml `data.raw_dir`, default `data/raw`) lives in a git + DVC repository. An
import copies new images into it, runs `dvc add`, pushes to the remote and commits the `.dvc` file to git, so
every import is a data version: the tracked directory's hash (`data_version`), which later stages record.

The remote URL (params.yaml `data.remote`, any DVC remote URL) is written to DVC's *local* config
(`.dvc/config.local`, not tracked): the default is a folder under the user's home, which must not be
committed for everyone; params.yaml is where the team shares it, and every command here applies it again.

DVC and git are driven through their command lines (`python -m dvc`, `git`), which are their most stable
interfaces; the user's source folder is only ever read.
"""

from __future__ import annotations

import filecmp
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class VersioningError(RuntimeError):
    """A data import, push, pull or checkout that cannot go ahead; the message says why and what to do."""


class ImportConflictError(VersioningError):
    """Files in the source differ from files already at the same path in the data folder."""


@dataclass
class ImportPlan:
    """What an import would do, worked out before anything is copied."""

    layout: str
    copy: list[str] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass
class ImportResult:
    """The outcome of `import_images`."""

    version: str | None
    copied: int
    identical: int
    skipped: list[str]
    commit: str | None
    pushed: bool


@dataclass
class DataVersion:
    """One committed data version."""

    commit: str
    date: str
    version: str
    files: int | None
    subject: str


def dvc_file(raw_dir: Path) -> Path:
    """The `.dvc` file that tracks `raw_dir` (`data/raw` -> `data/raw.dvc`)."""
    raw_dir = Path(raw_dir)
    return raw_dir.parent / f"{raw_dir.name}.dvc"


def data_version(raw_dir: Path) -> str | None:
    """The DVC data version of `raw_dir`: the tracked directory's md5 from its `.dvc` file, or None if untracked."""
    import yaml

    path = dvc_file(raw_dir)
    if not path.is_file():
        return None
    return _md5_of(yaml.safe_load(path.read_text(encoding="utf-8")))


def _md5_of(meta: object) -> str | None:
    outs = meta.get("outs") if isinstance(meta, dict) else None
    return str(outs[0].get("md5")) if outs and outs[0].get("md5") else None


def find_repo_root(start: Path) -> Path:
    """The DVC repository that contains `start`.

    Raises:
        VersioningError: outside a DVC repository.
    """
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    start = Path(start).resolve()
    while not start.exists():  # the data folder (and its parents) may not exist before the first import
        start = start.parent
    try:
        return Path(Repo.find_root(str(start)))
    except NotDvcRepoError:
        raise VersioningError(
            f"{start} is not inside a DVC repository: run `git init && dvc init` there, or run vitops from the "
            "vitops checkout"
        ) from None


def plan_import(src: Path, raw_dir: Path) -> ImportPlan:
    """Work out which files of `src` to copy into `raw_dir`, without changing anything.

    Raises:
        NotADirectoryError: if `src` is not a folder.
        data_checks.manifest.LayoutError: if `src` mixes layouts, or its layout differs from the data already there.
        ImportConflictError: if files at the same path differ.
    """
    from vitops.data_checks.manifest import LayoutError, list_entries

    src = Path(src)
    if not src.is_dir():
        raise NotADirectoryError(f"{src} is not a folder: give the folder that holds the label folders")
    src_real, raw_real = src.resolve(), Path(raw_dir).resolve()
    if src_real == raw_real or src_real.is_relative_to(raw_real) or raw_real.is_relative_to(src_real):
        raise VersioningError(f"{src} and the data folder {raw_dir} overlap: import from a folder outside {raw_dir}")
    layout, entries = list_entries(src_real)
    if layout == "empty" or not entries:
        raise VersioningError(f"{src} holds no label folders with files: expected {src}/<label>/<image>")
    if raw_real.is_dir() and any(raw_real.iterdir()):
        existing = _layout_of(raw_real)
        if existing not in ("empty", layout):
            raise LayoutError(
                f"{src} is {_describe(layout)} but {raw_dir} already holds {_describe(existing)} data: "
                "import the same layout as the earlier versions"
            )
    plan = ImportPlan(layout=layout)
    for entry in entries:
        if entry.is_link:
            plan.skipped.append(f"{entry.rel} (symbolic link: not followed; copy the image itself instead)")
        elif not entry.label:
            plan.skipped.append(f"{entry.rel} (not inside a label folder)")
        elif not (src_real / entry.rel).is_file():
            plan.skipped.append(f"{entry.rel} (not a regular file)")
        else:
            dest = raw_real / entry.rel
            if not dest.exists() and not dest.is_symlink():
                plan.copy.append(entry.rel)
            elif dest.is_file() and filecmp.cmp(src_real / entry.rel, dest, shallow=False):
                plan.identical.append(entry.rel)
            else:
                plan.conflicts.append(entry.rel)
    if plan.conflicts:
        shown = "\n  ".join(plan.conflicts[:10]) + ("\n  ..." if len(plan.conflicts) > 10 else "")
        raise ImportConflictError(
            f"{len(plan.conflicts)} file(s) in {src} differ from the file at the same path in {raw_dir}; nothing "
            f"was copied. Rename them in the source (or remove the old ones from {raw_dir}) and import again:\n  "
            f"{shown}"
        )
    return plan


def _layout_of(root: Path) -> str:
    from vitops.data_checks.manifest import detect_layout

    return detect_layout(root)


def _describe(layout: str) -> str:
    return "pre-split (train/val/test/<label>)" if layout == "split" else "flat (<label>/...)"


def import_images(
    src: Path,
    raw_dir: Path,
    remote: str | None,
    remote_name: str = "vitops",
    push: bool = True,
    git_commit: bool = True,
) -> ImportResult:
    """Copy an ImageFolder into the DVC-tracked folder and record it as a new data version.

    Steps: check everything (layout, conflicts) before copying; copy new files (each written to a temporary
    name, then renamed); `dvc add`; configure the remote; `dvc push`; `git commit` the `.dvc` file.

    Args:
        src: the user's ImageFolder; only read.
        raw_dir: the DVC-tracked folder, inside a git + DVC repository.
        remote: DVC remote URL (`~` is expanded); None leaves the configured remotes alone.
        remote_name: the name the remote is configured under.
        push: push the new version to the remote.
        git_commit: commit the `.dvc` file (and `.gitignore`), so this version can be checked out later.

    Raises:
        VersioningError: and its subclasses, with what to do.
    """
    raw_dir = Path(raw_dir)
    root = find_repo_root(raw_dir)
    plan = plan_import(src, raw_dir)
    for skipped in plan.skipped:
        log.warning("not imported: %s", skipped)
    raw_real = raw_dir.resolve()
    for rel in plan.copy:
        _copy_file(Path(src).resolve() / rel, raw_real / rel)
    log.debug("copied %d new file(s), %d already present", len(plan.copy), len(plan.identical))
    target = raw_real.relative_to(root)
    _dvc(root, "add", "--quiet", target.as_posix())
    version = data_version(raw_real)
    pushed = False
    if remote:
        configure_remote(root, remote_name, remote)
    if push:
        _dvc(root, "push", "--quiet", "-r", remote_name, dvc_file(target).as_posix())
        pushed = True
    commit = None
    if git_commit:
        try:
            commit = _git_commit_version(root, target, src, len(plan.copy), version)
        except VersioningError as err:
            raise VersioningError(
                f"data version {version} is added{' and pushed' if pushed else ''}, but committing "
                f"{dvc_file(target)} failed: {err}\nFix git (e.g. set user.name and user.email) and run the "
                "import again (files already copied are skipped), or commit the .dvc file yourself"
            ) from None
    return ImportResult(version, len(plan.copy), len(plan.identical), plan.skipped, commit, pushed)


def _copy_file(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.vitops-tmp")
    shutil.copy2(src, tmp, follow_symlinks=False)
    os.replace(tmp, dest)


def configure_remote(root: Path, name: str, url: str) -> str:
    """Set the default DVC remote in the repository's local config; local folders are created. Returns the URL."""
    url = os.path.expanduser(url)
    if "://" not in url:
        Path(url).mkdir(parents=True, exist_ok=True)
        url = str(Path(url).resolve())
    _dvc(root, "remote", "add", "--local", "--force", "--default", name, url)
    return url


def _git_commit_version(root: Path, target: Path, src: Path, copied: int, version: str | None) -> str | None:
    paths = [dvc_file(target).as_posix()]
    gitignore = target.parent / ".gitignore"
    if (root / gitignore).exists():
        paths.append(gitignore.as_posix())
    _git(root, "add", "--", *paths)
    staged = subprocess.run(["git", "diff", "--cached", "--quiet", "--", *paths], cwd=root, check=False)
    if staged.returncode == 0:
        log.info("data version %s is already committed", version)
        return None
    message = f"data: import {Path(src).name} ({copied} new files), version {version}"
    # Only these paths are committed; anything else the user has staged stays staged.
    _git(root, "commit", "--quiet", "-m", message, "--", *paths)
    return _git(root, "rev-parse", "HEAD").strip()


def list_versions(raw_dir: Path) -> list[DataVersion]:
    """The committed data versions of `raw_dir`, newest first."""
    import yaml

    raw_dir = Path(raw_dir).resolve()
    root = find_repo_root(raw_dir.parent)
    target = dvc_file(raw_dir.relative_to(root)).as_posix()
    log_out = _git(root, "log", "--format=%H%x09%aI%x09%s", "--", target)
    versions = []
    for line in log_out.splitlines():
        commit, date, subject = line.split("\t", 2)
        shown = subprocess.run(["git", "show", f"{commit}:{target}"], cwd=root, capture_output=True, text=True)
        if shown.returncode != 0:  # the commit deleted the file
            continue
        meta = yaml.safe_load(shown.stdout)
        files = meta["outs"][0].get("nfiles") if isinstance(meta, dict) and meta.get("outs") else None
        versions.append(DataVersion(commit, date, _md5_of(meta) or "", files, subject))
    return versions


def checkout_version(raw_dir: Path, rev: str, remote: str | None = None, remote_name: str = "vitops") -> str | None:
    """Make `raw_dir` hold the data version committed at git revision `rev`; returns that version.

    Only `<raw_dir>.dvc` is taken from `rev` (git shows it as modified until you commit or check out HEAD);
    the images come from the DVC cache, or from the remote when the cache lacks them.

    Raises:
        VersioningError: if `raw_dir` holds changes that are in no version (they would be lost), or `rev`
            has no data version.
    """
    raw_dir = Path(raw_dir).resolve()
    root = find_repo_root(raw_dir.parent)
    target = raw_dir.relative_to(root)
    shown = subprocess.run(
        ["git", "cat-file", "-e", f"{rev}:{dvc_file(target).as_posix()}"], cwd=root, check=False, capture_output=True
    )
    if shown.returncode != 0:
        raise VersioningError(
            f"git revision {rev!r} has no {dvc_file(target)}: list versions with `vitops data versions`"
        )
    if remote:
        configure_remote(root, remote_name, remote)
    _require_clean(root, target, remote_name)
    _git(root, "checkout", rev, "--", dvc_file(target).as_posix())
    _restore(root, target, remote_name)
    return data_version(raw_dir)


def pull_data(raw_dir: Path, remote: str | None = None, remote_name: str = "vitops") -> str | None:
    """Fetch the current data version from the remote into the cache and `raw_dir`; returns the version."""
    raw_dir = Path(raw_dir).resolve()
    root = find_repo_root(raw_dir.parent)
    target = raw_dir.relative_to(root)
    if not (root / dvc_file(target)).is_file():
        raise VersioningError(f"{dvc_file(target)} does not exist: import data first with `vitops data import SRC`")
    if remote:
        configure_remote(root, remote_name, remote)
    _dvc(root, "pull", "--quiet", "-r", remote_name, dvc_file(target).as_posix())
    return data_version(raw_dir)


def _require_clean(root: Path, target: Path, remote_name: str) -> None:
    import json

    if not (root / target).exists():
        return
    status = _dvc(root, "status", "--json", dvc_file(target).as_posix())
    if json.loads(status or "{}") and "not in cache" in status and "modified" not in status:
        # The data matches its version but the cache was cleared: fetch that version back first, so the
        # checkout below can never remove files that exist nowhere else.
        _dvc(root, "fetch", "--quiet", "-r", remote_name, dvc_file(target).as_posix())
        status = _dvc(root, "status", "--json", dvc_file(target).as_posix())
    if json.loads(status or "{}"):
        raise VersioningError(
            f"{target} differs from its recorded data version ({status.strip()}); checking out another version "
            f"would lose those changes. Record them first with `vitops data import` or `dvc add {target}` and a commit"
        )


def _restore(root: Path, target: Path, remote_name: str) -> None:
    checkout = subprocess.run(
        [sys.executable, "-m", "dvc", "checkout", "--quiet", dvc_file(target).as_posix()],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if checkout.returncode == 0:
        return
    log.info("cache incomplete, pulling from the remote")
    _dvc(root, "pull", "--quiet", "-r", remote_name, dvc_file(target).as_posix())


def _dvc(root: Path, *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], root, "dvc")


def _git(root: Path, *args: str) -> str:
    return _run(["git", *args], root, "git")


def _run(cmd: list[str], cwd: Path, tool: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        shown = " ".join([tool, *cmd[3 if tool == "dvc" else 1 :]])
        detail = (proc.stderr or proc.stdout).strip()
        raise VersioningError(f"`{shown}` failed in {cwd}:\n{detail}")
    return proc.stdout


CODE_DIRS = ("common", "data_checks", "vit", "deploy", "flows")


def code_version(root: Path | str | None = None) -> str:
    """The version of the pipeline's code: git's tree hashes of the code folders, plus a digest of their
    uncommitted changes (`<trees>-dirty-<digest>`). Data commits (`data/raw.dvc`) and docs do not change it;
    `unknown` outside git."""
    import hashlib

    root = Path(root) if root else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        trees = git("rev-parse", *(f"HEAD:{d}" for d in CODE_DIRS if (root / d).is_dir())).split()
        diff = git("diff", "HEAD", "--", *CODE_DIRS)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    version = hashlib.sha256(" ".join(trees).encode()).hexdigest()[:16]
    if diff:
        version += "-dirty-" + hashlib.sha256(diff.encode()).hexdigest()[:12]
    return version
